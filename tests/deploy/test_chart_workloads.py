"""What the chart deploys: the Falco pod and its sidecar, the operator, the relay, the webhook."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from .chart import NAMESPACE, Rendered, container, falco_yaml, flag, render

SIDECAR_TLS = ("/etc/falco-api/tls/tls.crt", "/etc/falco-api/tls/tls.key", "/etc/falco-api/tls/ca.crt")


def _pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def _sidecar(rendered: Rendered) -> dict[str, Any]:
    return container(_pod_spec(rendered.one("DaemonSet")), "falco-api", init=True)


def _mounts(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in c.get("volumeMounts", [])}


def _volumes(pod_spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in pod_spec["volumes"]}


# --- Falco and the sidecar -------------------------------------------------------------------------


def test_falco_runs_the_unmodified_upstream_image_with_its_tag_as_a_value() -> None:
    falco = container(_pod_spec(render().one("DaemonSet")), "falco")
    assert falco["image"] == "docker.io/falcosecurity/falco:0.44.1"
    custom = container(_pod_spec(render({"falco": {"image": {"tag": "0.45.0"}}}).one("DaemonSet")), "falco")
    assert custom["image"].endswith("falcosecurity/falco:0.45.0")


def test_sidecar_gets_its_real_flags() -> None:
    args = _sidecar(render())["args"]
    assert flag(args, "--grpc-listen") == "0.0.0.0:5060"
    assert flag(args, "--ingest-listen") == "127.0.0.1:2801"
    assert flag(args, "--falco-url") == "http://127.0.0.1:8765"
    assert flag(args, "--metrics-listen") == "0.0.0.0:9376"
    assert (flag(args, "--tls-cert"), flag(args, "--tls-key"), flag(args, "--tls-ca")) == SIDECAR_TLS
    assert flag(args, "--managed-root") == "/etc/falco/falco-api"
    assert flag(args, "--falco-config") == "/etc/falco-api/falco-config/falco.yaml"
    assert flag(args, "--base-rules") == "/etc/falco-api/base-rules/falco_rules.yaml"
    assert flag(args, "--authz-config") == "/etc/falco-api/authz/authz.yaml"
    assert flag(args, "--k8saudit-url") == "http://127.0.0.1:9765/k8s-audit"
    assert flag(args, "--node-name") == "$(NODE_NAME)"


def test_sidecar_node_name_comes_from_the_downward_api() -> None:
    env = {e["name"]: e for e in _sidecar(render())["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


def test_sidecar_image_defaults_to_the_app_version() -> None:
    assert _sidecar(render())["image"] == "ghcr.io/falco-api/falco-api:0.1.0"
    assert _sidecar(render({"image": {"tag": "dev"}}))["image"] == "ghcr.io/falco-api/falco-api:dev"


def test_sidecar_ports_are_named_for_discovery_and_metrics() -> None:
    ports = {p["name"]: p["containerPort"] for p in _sidecar(render())["ports"]}
    assert ports == {"falco-api": 5060, "metrics": 9376}


def test_sidecar_security_context_is_locked_down() -> None:
    context = _sidecar(render())["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] != 0
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert "add" not in context["capabilities"]
    assert not context.get("privileged", False)


def test_sidecar_resources_are_values() -> None:
    resources = {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}}
    assert _sidecar(render({"sidecar": {"resources": resources}}))["resources"] == resources
    default = _sidecar(render())["resources"]
    assert default["requests"] and default["limits"]


def test_managed_files_are_shared_on_an_emptydir_falco_only_reads() -> None:
    rendered = render()
    pod = _pod_spec(rendered.one("DaemonSet"))
    falco_mount = _mounts(container(pod, "falco"))["/etc/falco/falco-api"]
    sidecar_mount = _mounts(container(pod, "falco-api", init=True))["/etc/falco/falco-api"]
    assert falco_mount["name"] == sidecar_mount["name"]
    assert falco_mount.get("readOnly") is True
    assert not sidecar_mount.get("readOnly", False)
    assert _volumes(pod)[falco_mount["name"]] == {"name": falco_mount["name"], "emptyDir": {}}


def test_falco_pods_carry_the_discovery_label() -> None:
    labels = render().one("DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == "falco"
    # Helm merges maps with the defaults: null removes the default label.
    custom = render(
        {
            "discovery": {
                "sidecarSelector": {"falco-api.io/sidecar": "yes", "app.kubernetes.io/component": None}
            }
        }
    )
    custom_labels = custom.one("DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert custom_labels["falco-api.io/sidecar"] == "yes"
    args = container(_pod_spec(custom.one("Deployment", "-operator")), "operator")["args"]
    assert flag(args, "--sidecar-selector") == "falco-api.io/sidecar=yes"


def test_daemonset_selector_matches_its_pods() -> None:
    daemonset = render().one("DaemonSet")
    selector = daemonset["spec"]["selector"]["matchLabels"]
    labels = daemonset["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()


def test_falco_uses_modern_ebpf_privileged_by_default() -> None:
    rendered = render()
    pod = _pod_spec(rendered.one("DaemonSet"))
    assert falco_yaml(rendered)["engine"]["kind"] == "modern_ebpf"
    assert container(pod, "falco")["securityContext"] == {"privileged": True}
    init_names = [c["name"] for c in pod["initContainers"]]
    assert "falco-driver-loader" not in init_names, "modern_ebpf needs no driver loader"
    for host_path in ("/proc", "/etc"):
        assert any(v.get("hostPath", {}).get("path") == host_path for v in pod["volumes"]), host_path


def test_least_privileged_modern_ebpf_uses_capabilities() -> None:
    pod = _pod_spec(render({"falco": {"driver": {"leastPrivileged": True}}}).one("DaemonSet"))
    context = container(pod, "falco")["securityContext"]
    assert "privileged" not in context
    assert set(context["capabilities"]["add"]) == {"BPF", "SYS_RESOURCE", "PERFMON", "SYS_PTRACE"}


def test_kmod_adds_the_driver_loader_and_its_host_mounts() -> None:
    rendered = render({"falco": {"driver": {"kind": "kmod"}}})
    pod = _pod_spec(rendered.one("DaemonSet"))
    loader = container(pod, "falco-driver-loader", init=True)
    assert loader["args"] == ["kmod"]
    assert loader["image"] == "docker.io/falcosecurity/falco-driver-loader:0.44.1"
    assert "/host/lib/modules" in _mounts(container(pod, "falco"))
    assert falco_yaml(rendered)["engine"]["kind"] == "kmod"


def test_kmod_cannot_be_least_privileged() -> None:
    import helm_python

    with pytest.raises(helm_python.HelmRenderError, match="leastPrivileged is not possible"):
        render({"falco": {"driver": {"kind": "kmod", "leastPrivileged": True}}})


# --- falco.yaml --------------------------------------------------------------------------------------


def test_falco_yaml_wires_falco_to_the_sidecar() -> None:
    config = falco_yaml(render())
    assert config["json_output"] is True
    assert config["json_include_output_property"] is True
    assert config["json_include_output_fields_property"] is True
    assert config["http_output"] == {"enabled": True, "url": "http://127.0.0.1:2801/"}
    webserver = config["webserver"]
    assert webserver["enabled"] is True
    assert (webserver["listen_address"], webserver["listen_port"]) == ("127.0.0.1", 8765)
    assert webserver["prometheus_metrics_enabled"] is True
    assert config["metrics"]["enabled"] is True
    assert config["watch_config_files"] is True


def test_falco_lists_the_one_managed_file_and_no_managed_rules_folder() -> None:
    config = falco_yaml(render())
    # A plain string entry: Falco's default strategy (append), which appends the managed rules folder.
    assert config["config_files"] == ["/etc/falco/falco-api/falco-api.yaml"]
    assert config["rules_files"] == ["/etc/falco/falco_rules.yaml"]


def test_the_listed_file_is_where_the_sidecar_store_writes_it(tmp_path: Path) -> None:
    """Cross-check with the sidecar's store: the entry Falco lists is the store's live file, and the
    rules folder that file names lies on the volume Falco mounts."""
    managed = pytest.importorskip("falco_api_sidecar.managed")
    rendered = render({"managed": {"root": "/var/lib/falco-api"}})
    pod = _pod_spec(rendered.one("DaemonSet"))
    falco_mounts = _mounts(container(pod, "falco"))
    sidecar_args = container(pod, "falco-api", init=True)["args"]
    sidecar_root = flag(sidecar_args, "--managed-root")
    # Without --falco-managed-root the store writes paths as the sidecar sees them: same mount path.
    assert "--falco-managed-root" not in sidecar_args
    assert sidecar_root in falco_mounts

    store = managed.ManagedStore.open(tmp_path / "root", falco_root=Path(sidecar_root))
    (listed,) = falco_yaml(rendered)["config_files"]
    assert listed == str(store.falco_config_file)
    written = yaml.safe_load(store.config_file.read_text())
    (rules_folder,) = written["rules_files"]
    assert rules_folder.startswith(sidecar_root + "/")


def test_managed_root_is_a_value() -> None:
    rendered = render({"managed": {"root": "/var/falco-api"}})
    config = falco_yaml(rendered)
    assert config["config_files"] == ["/var/falco-api/falco-api.yaml"]
    assert not [entry for entry in config["rules_files"] if entry.startswith("/var/falco-api")]
    assert flag(_sidecar(rendered)["args"], "--managed-root") == "/var/falco-api"
    assert "/var/falco-api" in _mounts(_sidecar(rendered))
    assert "/var/falco-api" in _mounts(container(_pod_spec(rendered.one("DaemonSet")), "falco"))


def test_sidecar_starts_before_falco_so_the_managed_file_exists() -> None:
    """Falco neither loads nor watches a config_files entry missing when it starts: the sidecar (which
    creates falco-api.yaml when it opens its store) runs as a native sidecar whose startup probe holds
    the Falco container back."""
    pod = _pod_spec(render().one("DaemonSet"))
    assert [c["name"] for c in pod["containers"]] == ["falco"]
    sidecar = container(pod, "falco-api", init=True)
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["startupProbe"]["tcpSocket"]["port"] == "metrics"
    assert flag(sidecar["args"], "--metrics-listen") != "off"
    assert [c["name"] for c in pod["initContainers"]][-1] == "falco-api", "the sidecar is the last init"


def test_sidecar_reads_falcos_falco_yaml_read_only() -> None:
    pod = _pod_spec(render().one("DaemonSet"))
    sidecar = container(pod, "falco-api", init=True)
    config_path = Path(flag(sidecar["args"], "--falco-config"))
    mount = _mounts(sidecar)[str(config_path.parent)]
    assert mount["readOnly"] is True
    assert "subPath" not in mount, "a subPath mount never sees ConfigMap updates"
    volume = _volumes(pod)[mount["name"]]
    assert volume["configMap"]["name"] == "fa-falco-api-falco"
    assert {"key": "falco.yaml", "path": config_path.name} in volume["configMap"]["items"]
    # The very volume Falco reads its falco.yaml from.
    assert _mounts(container(pod, "falco"))["/etc/falco/falco.yaml"]["name"] == mount["name"]


def test_default_ruleset_is_copied_out_of_the_falco_image_for_the_sidecar() -> None:
    pod = _pod_spec(render().one("DaemonSet"))
    copier = container(pod, "falco-api-base-rules", init=True)
    assert copier["image"] == container(pod, "falco")["image"], "the ruleset Falco loads is in its image"
    assert copier["command"][:2] == ["cp", "/etc/falco/falco_rules.yaml"]
    destination = Path(copier["command"][2])
    copier_mount = _mounts(copier)[str(destination.parent)]
    assert _volumes(pod)[copier_mount["name"]] == {"name": copier_mount["name"], "emptyDir": {}}
    assert copier["securityContext"]["runAsNonRoot"] is True
    assert copier["securityContext"]["readOnlyRootFilesystem"] is True

    sidecar = container(pod, "falco-api", init=True)
    base_rules = Path(flag(sidecar["args"], "--base-rules"))
    sidecar_mount = _mounts(sidecar)[str(base_rules.parent)]
    assert sidecar_mount["name"] == copier_mount["name"] and sidecar_mount["readOnly"] is True
    assert base_rules.name == destination.name
    init_names = [c["name"] for c in pod["initContainers"]]
    assert init_names.index("falco-api-base-rules") < init_names.index("falco-api")


def test_no_default_ruleset_copy_when_falco_does_not_load_it() -> None:
    rendered = render({"falco": {"rulesFiles": ["/etc/falco/my_rules.yaml"]}})
    pod = _pod_spec(rendered.one("DaemonSet"))
    assert "falco-api-base-rules" not in [c["name"] for c in pod["initContainers"]]
    assert "--base-rules" not in container(pod, "falco-api", init=True)["args"]
    assert falco_yaml(rendered)["rules_files"] == ["/etc/falco/my_rules.yaml"]


def test_user_config_merges_but_cannot_unwire_the_sidecar() -> None:
    config = falco_yaml(
        render({"falco": {"config": {"priority": "warning", "http_output": {"url": "http://elsewhere/"}}}})
    )
    assert config["priority"] == "warning"
    assert config["http_output"]["url"] == "http://127.0.0.1:2801/"


def test_k8saudit_plugin_listens_where_the_sidecar_forwards() -> None:
    config = falco_yaml(render({"falco": {"k8saudit": {"enabled": True}}}))
    plugins = {p["name"]: p for p in config["plugins"]}
    assert plugins["k8saudit"]["open_params"] == "http://127.0.0.1:9765/k8s-audit"
    assert {"container", "k8saudit", "json"} <= set(config["load_plugins"])


@pytest.mark.parametrize(
    "values",
    [{}, {"falco": {"driver": {"kind": "kmod"}, "k8saudit": {"enabled": True}}}],
    ids=["defaults", "kmod-k8saudit"],
)
def test_falco_yaml_matches_falcos_own_config_schema(values: dict[str, Any]) -> None:
    from importlib import resources

    import jsonschema

    # The copy of Falco's own schema that the sidecar validates drop-ins with (core/falco_api/schemas).
    schema = json.loads(resources.files("falco_api.schemas").joinpath("falco-config.schema.json").read_text())
    jsonschema.validate(falco_yaml(render(values)), schema)


# --- falco.enabled=false -----------------------------------------------------------------------------


def test_without_falco_no_daemonset_but_values_for_the_falco_chart() -> None:
    rendered = render({"falco": {"enabled": False}})
    assert not rendered.kinds("DaemonSet")
    assert not rendered.has("ConfigMap", "-falco")
    values = yaml.safe_load(rendered.one("ConfigMap", "-falco-chart-values")["data"]["values.yaml"])
    assert values["podLabels"] == {"app.kubernetes.io/component": "falco"}
    sidecar = values["extra"]["initContainers"][0]
    assert sidecar["restartPolicy"] == "Always", "the sidecar must join as a native sidecar container"
    assert sidecar["startupProbe"]["tcpSocket"]["port"] == "metrics"
    assert sidecar["name"] == "falco-api"
    assert flag(sidecar["args"], "--ingest-listen") == "127.0.0.1:2801"
    falco = values["falco"]
    assert falco["http_output"]["url"] == "http://127.0.0.1:2801/"
    assert falco["json_output"] is True and falco["watch_config_files"] is True
    assert falco["rules_files"] == [
        "/etc/falco/falco_rules.yaml",
        "/etc/falco/falco_rules.local.yaml",
        "/etc/falco/rules.d",
    ]
    assert falco["config_files"] == ["/etc/falco/config.d", "/etc/falco/falco-api/falco-api.yaml"]
    assert "listen_address" not in falco["webserver"], "the falco chart's kubelet probes call the webserver"
    assert values["metrics"]["enabled"] is True
    # The falco chart's pods already have these two volumes: its falco.yaml ConfigMap, and the folder
    # falcoctl installs falco_rules.yaml into (mounted at /etc/falco in its Falco container).
    falco_chart_volumes = {"falco-yaml", "rulesfiles-install-dir"}
    volumes = {v["name"] for v in values["mounts"]["volumes"]}
    assert not volumes & falco_chart_volumes
    assert {m["name"] for m in sidecar["volumeMounts"]} <= volumes | falco_chart_volumes
    mounts = {m["name"]: m for m in sidecar["volumeMounts"]}
    assert Path(flag(sidecar["args"], "--falco-config")).parent == Path(mounts["falco-yaml"]["mountPath"])
    base_rules = Path(flag(sidecar["args"], "--base-rules"))
    assert base_rules.parent == Path(mounts["rulesfiles-install-dir"]["mountPath"])
    assert base_rules.name == "falco_rules.yaml"
    assert all(mounts[name]["readOnly"] for name in falco_chart_volumes)
    assert values["mounts"]["volumeMounts"] == [
        {"name": "falco-api-managed", "mountPath": "/etc/falco/falco-api", "readOnly": True}
    ]
    # The sidecar's certificate and authz config are still rendered, for the falco chart's pods.
    assert rendered.has("ConfigMap", "-authz")
    assert rendered.has("Certificate", "-sidecar")


# --- operator ----------------------------------------------------------------------------------------


def test_operator_args() -> None:
    operator = container(_pod_spec(render().one("Deployment", "-operator")), "operator")
    assert operator["command"] == ["falco-api-operator"]
    args = operator["args"]
    assert flag(args, "--namespace") == NAMESPACE
    assert flag(args, "--sidecar-selector") == "app.kubernetes.io/component=falco"
    assert flag(args, "--sidecar-port-name") == "falco-api"
    assert (flag(args, "--tls-cert"), flag(args, "--tls-key"), flag(args, "--tls-ca")) == SIDECAR_TLS
    assert flag(args, "--webhook-port") == "9443"
    assert flag(args, "--webhook-cert") == "/etc/falco-api/webhook/tls.crt"
    assert flag(args, "--webhook-key") == "/etc/falco-api/webhook/tls.key"
    assert flag(args, "--liveness") == "http://0.0.0.0:8080/healthz"
    assert flag(args, "--sidecar-server-name") == "falco-api-sidecar"
    assert "--no-manage-webhook-configuration" in args, "the chart owns the webhook configuration"
    assert "--peering" not in args


def test_operator_replicas_turn_on_peering() -> None:
    single = render()
    assert single.one("Deployment", "-operator")["spec"]["replicas"] == 1
    assert not single.kinds("ClusterKopfPeering")
    double = render({"operator": {"replicas": 2}})
    deployment = double.one("Deployment", "-operator")
    assert deployment["spec"]["replicas"] == 2
    assert flag(container(_pod_spec(deployment), "operator")["args"], "--peering") == "falco-api"
    assert double.one("ClusterKopfPeering")["metadata"]["name"] == "falco-api"


def test_operator_mounts_the_certificates_its_args_name() -> None:
    pod = _pod_spec(render().one("Deployment", "-operator"))
    mounts = _mounts(container(pod, "operator"))
    volumes = _volumes(pod)
    assert (
        volumes[mounts["/etc/falco-api/tls"]["name"]]["secret"]["secretName"] == "fa-falco-api-operator-tls"
    )
    assert (
        volumes[mounts["/etc/falco-api/webhook"]["name"]]["secret"]["secretName"]
        == "fa-falco-api-webhook-tls"
    )


# --- relay -------------------------------------------------------------------------------------------


def test_relay_deployment_and_service() -> None:
    rendered = render()
    relay = container(_pod_spec(rendered.one("Deployment", "-relay")), "relay")
    assert relay["command"] == ["falco-api-relay"]
    args = relay["args"]
    assert flag(args, "--grpc-listen") == "0.0.0.0:5060"
    assert (flag(args, "--tls-cert"), flag(args, "--tls-key"), flag(args, "--tls-ca")) == SIDECAR_TLS
    assert flag(args, "--sidecar-selector") == "app.kubernetes.io/component=falco"
    assert flag(args, "--sidecar-port-name") == "falco-api"
    assert flag(args, "--upstream-server-name") == "falco-api-sidecar"
    service = rendered.one("Service", "-relay")
    assert service["spec"]["ports"][0]["targetPort"] == "falco-api"


def test_relay_can_be_disabled() -> None:
    rendered = render({"relay": {"enabled": False}})
    names = [doc["metadata"]["name"] for doc in rendered.documents()]
    assert not [name for name in names if "relay" in name], names


# --- webhook -----------------------------------------------------------------------------------------


def test_webhook_configuration() -> None:
    rendered = render()
    config = rendered.one("ValidatingWebhookConfiguration")
    hooks = {hook["name"]: hook for hook in config["webhooks"]}
    assert set(hooks) == {"falcorules.falcoapi.io", "falcoconfigs.falcoapi.io"}
    for plural, hook in (
        ("falcorules", hooks["falcorules.falcoapi.io"]),
        ("falcoconfigs", hooks["falcoconfigs.falcoapi.io"]),
    ):
        assert hook["failurePolicy"] == "Fail"
        assert hook["sideEffects"] == "None"
        assert hook["timeoutSeconds"] == 10
        (rule,) = hook["rules"]
        assert rule["operations"] == ["CREATE", "UPDATE"]
        assert rule["resources"] == [plural]
        assert rule["apiGroups"] == ["falcoapi.io"] and rule["apiVersions"] == ["v1alpha1"]
        assert hook["clientConfig"]["service"]["port"] == 443
        # kopf serves a handler at /<handler id>: the operator's are validate-falcorule, validate-falcoconfig.
        assert hook["clientConfig"]["service"]["path"] == f"/validate-{plural.removesuffix('s')}"
        assert hook["clientConfig"]["service"]["name"] == "fa-falco-api-operator-webhook"
    service = rendered.one("Service", "-operator-webhook")
    (port,) = service["spec"]["ports"]
    assert (port["port"], port["targetPort"]) == (443, "webhook")
    operator_ports = container(_pod_spec(rendered.one("Deployment", "-operator")), "operator")["ports"]
    assert {"name": "webhook", "containerPort": 9443, "protocol": "TCP"} in operator_ports


def test_webhook_policy_and_timeout_are_values() -> None:
    config = render({"operator": {"webhook": {"failurePolicy": "Ignore", "timeoutSeconds": 5}}}).one(
        "ValidatingWebhookConfiguration"
    )
    assert {hook["failurePolicy"] for hook in config["webhooks"]} == {"Ignore"}
    assert {hook["timeoutSeconds"] for hook in config["webhooks"]} == {5}


def test_webhook_ca_comes_from_cert_manager_when_enabled() -> None:
    config = render().one("ValidatingWebhookConfiguration")
    assert (
        config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
        == f"{NAMESPACE}/fa-falco-api-webhook"
    )
    assert all("caBundle" not in hook["clientConfig"] for hook in config["webhooks"])
