{{/*
Expand the name of the chart.
*/}}
{{- define "falco-api.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name, truncated to 63 characters (DNS label limit). The component names
(e.g. "-operator-webhook") are appended to it, so it is kept to 40 characters to leave room.
*/}}
{{- define "falco-api.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version as used by the helm.sh/chart label.
*/}}
{{- define "falco-api.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels, on every resource.
*/}}
{{- define "falco-api.labels" -}}
helm.sh/chart: {{ include "falco-api.chart" . }}
{{ include "falco-api.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: falco-api
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels shared by every component.
*/}}
{{- define "falco-api.selectorLabels" -}}
app.kubernetes.io/name: {{ include "falco-api.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Selector labels of one component. Usage: include "falco-api.componentSelectorLabels" (dict "ctx" . "component" "operator")
*/}}
{{- define "falco-api.componentSelectorLabels" -}}
{{ include "falco-api.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Labels of one component's resources. Usage as componentSelectorLabels.
*/}}
{{- define "falco-api.componentLabels" -}}
{{ include "falco-api.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Labels of the Falco pods: the chart's selector labels plus the discovery labels the operator and
relay look for. The discovery labels win on a clash, since the operator depends on them.
*/}}
{{- define "falco-api.falcoPodLabels" -}}
{{- $labels := fromYaml (include "falco-api.componentSelectorLabels" (dict "ctx" . "component" "falco")) }}
{{- $labels = merge (deepCopy .Values.discovery.sidecarSelector) $labels }}
{{- $labels = merge $labels (deepCopy .Values.falco.podLabels) }}
{{- toYaml $labels }}
{{- end }}

{{/*
The discovery selector as the operator and relay take it: k1=v1,k2=v2 (sorted, so renders are stable).
*/}}
{{- define "falco-api.sidecarSelectorArg" -}}
{{- $pairs := list }}
{{- range $key, $value := .Values.discovery.sidecarSelector }}
{{- $pairs = append $pairs (printf "%s=%s" $key $value) }}
{{- end }}
{{- join "," $pairs }}
{{- end }}

{{/*
Resource names.
*/}}
{{- define "falco-api.falcoName" -}}
{{- printf "%s-falco" (include "falco-api.fullname" .) }}
{{- end }}
{{- define "falco-api.operatorName" -}}
{{- printf "%s-operator" (include "falco-api.fullname" .) }}
{{- end }}
{{- define "falco-api.relayName" -}}
{{- printf "%s-relay" (include "falco-api.fullname" .) }}
{{- end }}
{{- define "falco-api.webhookServiceName" -}}
{{- printf "%s-operator-webhook" (include "falco-api.fullname" .) }}
{{- end }}
{{- define "falco-api.authzConfigMapName" -}}
{{- printf "%s-authz" (include "falco-api.fullname" .) }}
{{- end }}
{{- define "falco-api.caIssuerName" -}}
{{- printf "%s-ca" (include "falco-api.fullname" .) }}
{{- end }}

{{/*
Secrets holding each component's certificate (tls.crt, tls.key and the CA as ca.crt).
*/}}
{{- define "falco-api.sidecarTlsSecret" -}}
{{- printf "%s-sidecar-tls" (include "falco-api.fullname" .) }}
{{- end }}
{{- define "falco-api.operatorTlsSecret" -}}
{{- printf "%s-operator-tls" (include "falco-api.fullname" .) }}
{{- end }}
{{- define "falco-api.relayTlsSecret" -}}
{{- printf "%s-relay-tls" (include "falco-api.fullname" .) }}
{{- end }}
{{- define "falco-api.webhookTlsSecret" -}}
{{- printf "%s-webhook-tls" (include "falco-api.fullname" .) }}
{{- end }}

{{/*
Certificate identities (subject common names): the sidecar's authz config grants roles by them, so
they are fixed here rather than values that could drift apart from authz.yaml.
*/}}
{{- define "falco-api.operatorIdentity" -}}falco-api-operator{{- end }}
{{- define "falco-api.relayIdentity" -}}falco-api-relay{{- end }}

{{/*
Image references.
*/}}
{{- define "falco-api.image" -}}
{{- with .Values.image.registry }}{{ . }}/{{ end }}
{{- .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}
{{- define "falco-api.falcoImage" -}}
{{- with .Values.falco.image.registry }}{{ . }}/{{ end }}
{{- .Values.falco.image.repository }}:{{ .Values.falco.image.tag }}
{{- end }}
{{- define "falco-api.driverLoaderImage" -}}
{{- with .Values.falco.driver.loader.image }}
{{- with .registry }}{{ . }}/{{ end }}
{{- .repository }}:{{ .tag | default $.Values.falco.image.tag }}
{{- end }}
{{- end }}

{{/*
kopf peering is needed as soon as two operators could run at once.
*/}}
{{- define "falco-api.peeringEnabled" -}}
{{- if or .Values.operator.peering.enabled (gt (int .Values.operator.replicas) 1) }}true{{ end }}
{{- end }}

{{/*
Where the sidecar sees Falco's files (all read-only): falco.yaml (the ConfigMap volume `falco-yaml`,
which the falcosecurity/falco chart's pods have under the same name) and the rules files Falco loads
before the managed ones.
*/}}
{{- define "falco-api.sidecarFalcoConfigDir" -}}/etc/falco-api/falco-config{{- end }}
{{- define "falco-api.sidecarBaseRulesDir" -}}/etc/falco-api/base-rules{{- end }}

{{/*
Falco's default ruleset is in the Falco image, not in ours: the sidecar validates managed rules that
use its macros and lists against a copy. Only when Falco loads it (it is in falco.rulesFiles).
*/}}
{{- define "falco-api.copiesDefaultRules" -}}
{{- if has "/etc/falco/falco_rules.yaml" .Values.falco.rulesFiles }}true{{ end }}
{{- end }}

{{/*
The falco-api sidecar container. Shared by the chart's own DaemonSet and by the values printed for the
falcosecurity/falco chart (falco.enabled=false), so both run the sidecar the same way.
Usage: include "falco-api.sidecarContainer" (dict "ctx" . "baseRulesVolume" "<volume holding falco_rules.yaml, or empty>")

It runs as a native sidecar (an init container with restartPolicy: Always) with a startup probe, so
that Falco starts only once the sidecar is up: the sidecar creates <managed root>/falco-api.yaml when
it opens its store, and Falco neither loads nor watches a config_files entry missing at its start.
*/}}
{{- define "falco-api.sidecarContainer" -}}
{{- $ := .ctx -}}
{{- $values := $.Values -}}
name: falco-api
image: {{ include "falco-api.image" $ }}
imagePullPolicy: {{ $values.image.pullPolicy }}
restartPolicy: Always
command:
  - falco-api-sidecar
args:
  - --grpc-listen
  - 0.0.0.0:{{ $values.sidecar.grpcPort }}
  - --ingest-listen
  - 127.0.0.1:{{ $values.sidecar.ingestPort }}
  - --falco-url
  - http://127.0.0.1:{{ $values.falco.webserver.port }}
  - --metrics-listen
  - 0.0.0.0:{{ $values.sidecar.metricsPort }}
  - --tls-cert
  - /etc/falco-api/tls/tls.crt
  - --tls-key
  - /etc/falco-api/tls/tls.key
  - --tls-ca
  - /etc/falco-api/tls/ca.crt
  - --node-name
  - $(NODE_NAME)
  - --managed-root
  - {{ $values.managed.root }}
  - --falco-config
  - {{ include "falco-api.sidecarFalcoConfigDir" $ }}/falco.yaml
  {{- if .baseRulesVolume }}
  - --base-rules
  - {{ include "falco-api.sidecarBaseRulesDir" $ }}/falco_rules.yaml
  {{- end }}
  - --authz-config
  - /etc/falco-api/authz/authz.yaml
  - --k8saudit-url
  - {{ $values.sidecar.k8sauditUrl }}
  {{- with $values.sidecar.extraArgs }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
env:
  - name: NODE_NAME
    valueFrom:
      fieldRef:
        fieldPath: spec.nodeName
ports:
  - name: falco-api
    containerPort: {{ $values.sidecar.grpcPort }}
    protocol: TCP
  - name: metrics
    containerPort: {{ $values.sidecar.metricsPort }}
    protocol: TCP
{{- /* kubelet gRPC probes cannot present a client certificate, so probe the plain metrics port. The
sidecar binds it after its managed store is open, i.e. after falco-api.yaml exists. */}}
startupProbe:
  tcpSocket:
    port: metrics
  periodSeconds: 2
  failureThreshold: 60
readinessProbe:
  tcpSocket:
    port: metrics
  periodSeconds: 10
livenessProbe:
  tcpSocket:
    port: metrics
  periodSeconds: 20
  failureThreshold: 3
resources:
  {{- toYaml $values.sidecar.resources | nindent 2 }}
securityContext:
  {{- toYaml $values.sidecar.securityContext | nindent 2 }}
volumeMounts:
  - name: falco-api-managed
    mountPath: {{ $values.managed.root }}
  - name: falco-yaml
    mountPath: {{ include "falco-api.sidecarFalcoConfigDir" $ }}
    readOnly: true
  {{- with .baseRulesVolume }}
  - name: {{ . }}
    mountPath: {{ include "falco-api.sidecarBaseRulesDir" $ }}
    readOnly: true
  {{- end }}
  - name: falco-api-tls
    mountPath: /etc/falco-api/tls
    readOnly: true
  - name: falco-api-authz
    mountPath: /etc/falco-api/authz
    readOnly: true
  - name: falco-api-tmp
    mountPath: /tmp
{{- end }}

{{/*
The init container that copies Falco's default ruleset out of the Falco image for the sidecar. It
overrides the image's entrypoint and runs `cp` only, unprivileged.
*/}}
{{- define "falco-api.baseRulesInitContainer" -}}
name: falco-api-base-rules
image: {{ include "falco-api.falcoImage" . }}
imagePullPolicy: {{ .Values.falco.image.pullPolicy }}
command:
  - cp
  - /etc/falco/falco_rules.yaml
  - {{ include "falco-api.sidecarBaseRulesDir" . }}/falco_rules.yaml
resources:
  requests:
    cpu: 10m
    memory: 16Mi
  limits:
    cpu: 100m
    memory: 64Mi
securityContext:
  {{- toYaml .Values.sidecar.securityContext | nindent 2 }}
volumeMounts:
  - name: falco-api-base-rules
    mountPath: {{ include "falco-api.sidecarBaseRulesDir" . }}
{{- end }}

{{/*
The volumes the sidecar needs, in whichever pod it runs (`falco-yaml` and the base rules volume are
the pod's own: the chart's DaemonSet defines them, the falcosecurity/falco chart has them).
*/}}
{{- define "falco-api.sidecarVolumes" -}}
- name: falco-api-managed
  emptyDir: {}
- name: falco-api-tls
  secret:
    secretName: {{ include "falco-api.sidecarTlsSecret" . }}
- name: falco-api-authz
  configMap:
    name: {{ include "falco-api.authzConfigMapName" . }}
- name: falco-api-tmp
  emptyDir: {}
{{- end }}

{{/*
The one managed file Falco is told about (listed as a file in config_files, strategy append): the
sidecar replaces it atomically on every apply, and it names the current generation's rules folder.
*/}}
{{- define "falco-api.managedConfigFile" -}}
{{- printf "%s/falco-api.yaml" (trimSuffix "/" .Values.managed.root) }}
{{- end }}

{{/*
The falco.yaml settings that connect Falco to the sidecar. Applied over falco.config, so a user value
cannot silently disconnect them.
*/}}
{{- define "falco-api.falcoWiring" -}}
{{- /* No managed folder here: falco-api.yaml appends the current generation's rules folder. */}}
rules_files:
  {{- range .Values.falco.rulesFiles }}
  - {{ . }}
  {{- end }}
config_files:
  - {{ include "falco-api.managedConfigFile" . }}
watch_config_files: true
json_output: true
json_include_output_property: true
json_include_output_fields_property: true
json_include_tags_property: true
http_output:
  enabled: true
  url: http://127.0.0.1:{{ .Values.sidecar.ingestPort }}/
webserver:
  enabled: true
  listen_address: 127.0.0.1
  listen_port: {{ .Values.falco.webserver.port }}
  k8s_healthz_endpoint: /healthz
  prometheus_metrics_enabled: true
  ssl_enabled: false
metrics:
  enabled: true
  interval: {{ .Values.falco.metrics.interval }}
  output_rule: {{ .Values.falco.metrics.outputRule }}
  rules_counters_enabled: true
  resource_utilization_enabled: true
  state_counters_enabled: true
  kernel_event_counters_enabled: true
{{- end }}

{{/*
Driver and plugins part of falco.yaml (only for the chart's own Falco).
*/}}
{{- define "falco-api.falcoEngine" -}}
{{- $driver := .Values.falco.driver -}}
engine:
  kind: {{ $driver.kind }}
  {{- if eq $driver.kind "modern_ebpf" }}
  modern_ebpf:
    buf_size_preset: {{ $driver.bufSizePreset }}
    drop_failed_exit: {{ $driver.dropFailedExit }}
    cpus_for_each_buffer: {{ $driver.cpusForEachBuffer }}
  {{- else }}
  kmod:
    buf_size_preset: {{ $driver.bufSizePreset }}
    drop_failed_exit: {{ $driver.dropFailedExit }}
  {{- end }}
{{- $plugins := list }}
{{- $load := list }}
{{- if .Values.falco.containerPlugin.enabled }}
{{- $engines := dict "cri" (dict "enabled" true "sockets" .Values.falco.containerPlugin.sockets) }}
{{- $plugins = append $plugins (dict "name" "container" "library_path" "libcontainer.so" "init_config" (dict "label_max_len" 100 "with_size" false "hooks" (list "create") "engines" $engines)) }}
{{- $load = append $load "container" }}
{{- end }}
{{- if .Values.falco.k8saudit.enabled }}
{{- $url := urlParse .Values.sidecar.k8sauditUrl }}
{{- $plugins = append $plugins (dict "name" "k8saudit" "library_path" "libk8saudit.so" "init_config" "" "open_params" (printf "http://%s%s" $url.host $url.path)) }}
{{- $plugins = append $plugins (dict "name" "json" "library_path" "libjson.so" "init_config" "") }}
{{- $load = concat $load (list "k8saudit" "json") }}
{{- end }}
{{- if $plugins }}
plugins:
  {{- toYaml $plugins | nindent 2 }}
load_plugins:
  {{- toYaml $load | nindent 2 }}
{{- end }}
{{- end }}

{{/*
Falco container security context: what the driver needs, unless the user set one.
*/}}
{{- define "falco-api.falcoSecurityContext" -}}
{{- $ctx := dict "privileged" true }}
{{- if and .Values.falco.driver.leastPrivileged (eq .Values.falco.driver.kind "modern_ebpf") }}
{{- $ctx = dict "capabilities" (dict "add" (list "BPF" "SYS_RESOURCE" "PERFMON" "SYS_PTRACE")) }}
{{- end }}
{{- toYaml (default $ctx .Values.falco.containerSecurityContext) }}
{{- end }}

{{/*
Helm-generated CA and certificates (certManager.enabled=false), as YAML:
{ca: {tls.crt, tls.key}, <component>: {secret, tls.crt, tls.key}}, all base64. Existing Secrets signed
by the same CA are reused, so an upgrade does not rotate certificates under running pods. Offline
renders (helm template, tests) have no cluster to look in and always generate fresh ones.
Called once per render, by webhook.yaml, because the webhook's caBundle must be this very CA.
*/}}
{{- define "falco-api.generatedCerts" -}}
{{- $ns := .Release.Namespace }}
{{- $fullname := include "falco-api.fullname" . }}
{{- $days := int .Values.tls.validityDays }}
{{- $caSecret := lookup "v1" "Secret" $ns (printf "%s-ca" $fullname) }}
{{- $ca := dict }}
{{- $caData := dict }}
{{- if and $caSecret (index $caSecret "data") (index $caSecret.data "tls.crt") (index $caSecret.data "tls.key") }}
{{- $ca = buildCustomCert (index $caSecret.data "tls.crt") (index $caSecret.data "tls.key") }}
{{- $caData = dict "tls.crt" (index $caSecret.data "tls.crt") "tls.key" (index $caSecret.data "tls.key") }}
{{- else }}
{{- $ca = genCA "falco-api-ca" $days }}
{{- $caData = dict "tls.crt" ($ca.Cert | b64enc) "tls.key" ($ca.Key | b64enc) }}
{{- end }}
{{- $webhookService := include "falco-api.webhookServiceName" . }}
{{- $relayName := include "falco-api.relayName" . }}
{{- $wanted := dict
  "sidecar" (dict "secret" (include "falco-api.sidecarTlsSecret" .) "cn" .Values.tls.sidecarServerName "dns" (list .Values.tls.sidecarServerName))
  "operator" (dict "secret" (include "falco-api.operatorTlsSecret" .) "cn" (include "falco-api.operatorIdentity" .) "dns" (list (include "falco-api.operatorIdentity" .)))
  "webhook" (dict "secret" (include "falco-api.webhookTlsSecret" .) "cn" (printf "%s.%s.svc" $webhookService $ns) "dns" (list (printf "%s.%s.svc" $webhookService $ns) (printf "%s.%s.svc.cluster.local" $webhookService $ns))) }}
{{- if .Values.relay.enabled }}
{{- $_ := set $wanted "relay" (dict "secret" (include "falco-api.relayTlsSecret" .) "cn" (include "falco-api.relayIdentity" .) "dns" (list (include "falco-api.relayIdentity" .) $relayName (printf "%s.%s.svc" $relayName $ns) (printf "%s.%s.svc.cluster.local" $relayName $ns))) }}
{{- end }}
{{- $out := dict "ca" $caData }}
{{- range $component, $spec := $wanted }}
{{- $existing := lookup "v1" "Secret" $ns $spec.secret }}
{{- if and $existing (index $existing "data") (eq (index $existing.data "ca.crt" | default "") (index $caData "tls.crt")) }}
{{- $_ := set $out $component (dict "secret" $spec.secret "tls.crt" (index $existing.data "tls.crt") "tls.key" (index $existing.data "tls.key")) }}
{{- else }}
{{- $cert := genSignedCert $spec.cn nil $spec.dns $days $ca }}
{{- $_ := set $out $component (dict "secret" $spec.secret "tls.crt" ($cert.Cert | b64enc) "tls.key" ($cert.Key | b64enc)) }}
{{- end }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{/*
Values for the falcosecurity/falco chart that add the sidecar to its pods (falco.enabled=false).
The sidecar joins as a native sidecar (an init container with restartPolicy: Always), as in the chart's
own DaemonSet; that chart takes extra init containers, placed before its own. Its webserver keeps listening on all addresses there,
since that chart's kubelet probes call it.
*/}}
{{- define "falco-api.falcoChartValues" -}}
{{- $wiring := fromYaml (include "falco-api.falcoWiring" .) }}
{{- $_ := unset $wiring.webserver "listen_address" }}
{{- $_ = set $wiring "rules_files" (list "/etc/falco/falco_rules.yaml" "/etc/falco/falco_rules.local.yaml" "/etc/falco/rules.d") }}
{{- $_ = set $wiring "config_files" (list "/etc/falco/config.d" (include "falco-api.managedConfigFile" .)) }}
{{- /* falcoctl installs falco_rules.yaml into that chart's rulesfiles-install-dir (its /etc/falco). */}}
{{- $sidecar := fromYaml (include "falco-api.sidecarContainer" (dict "ctx" . "baseRulesVolume" "rulesfiles-install-dir")) }}
{{- $values := dict
  "podLabels" .Values.discovery.sidecarSelector
  "falco" $wiring
  "metrics" (dict "enabled" true "interval" .Values.falco.metrics.interval "outputRule" .Values.falco.metrics.outputRule)
  "extra" (dict "initContainers" (list $sidecar))
  "mounts" (dict
    "volumes" (fromYamlArray (include "falco-api.sidecarVolumes" .))
    "volumeMounts" (list (dict "name" "falco-api-managed" "mountPath" .Values.managed.root "readOnly" true))) }}
{{- toYaml $values }}
{{- end }}
