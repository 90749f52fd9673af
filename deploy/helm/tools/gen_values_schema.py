"""Writes deploy/helm/falco-api/values.schema.json (run it after changing values.yaml).

    .venv/bin/python deploy/helm/tools/gen_values_schema.py

The schema is built here rather than by hand so that the repeated shapes (ports, images, pod
settings) stay identical; tests/deploy/test_values_schema.py checks the committed file is its output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "falco-api" / "values.schema.json"


def obj(
    props: dict[str, Any], required: list[str] | None = None, strict: bool = True, desc: str | None = None
) -> dict[str, Any]:
    s: dict[str, Any] = {"type": "object", "properties": props}
    if strict:
        s["additionalProperties"] = False
    if required:
        s["required"] = required
    if desc:
        s["description"] = desc
    return s


def string(desc: str | None = None, **kw: Any) -> dict[str, Any]:
    s: dict[str, Any] = {"type": "string", **kw}
    if desc:
        s["description"] = desc
    return s


def boolean(desc: str | None = None) -> dict[str, Any]:
    s: dict[str, Any] = {"type": "boolean"}
    if desc:
        s["description"] = desc
    return s


def integer(desc: str | None = None, **kw: Any) -> dict[str, Any]:
    s: dict[str, Any] = {"type": "integer", **kw}
    if desc:
        s["description"] = desc
    return s


PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
ABS_PATH = {"type": "string", "pattern": "^/"}
K8S_OBJ = {"type": "object"}  # a Kubernetes API shape, validated by the API server
STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
LABEL_MAP = {"type": "object", "additionalProperties": {"type": "string", "maxLength": 63}}
ARGS = {"type": "array", "items": {"type": "string"}}
GO_DURATION = {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"}
PROM_DURATION = {"type": "string", "pattern": r"^([0-9]+(ms|s|m|h|d|w|y))+$"}
RESOURCES = obj({"requests": K8S_OBJ, "limits": K8S_OBJ, "claims": {"type": "array"}})
PULL = {"type": "string", "enum": ["Always", "IfNotPresent", "Never"]}


def image(tag_desc: str) -> dict[str, Any]:
    return obj(
        {
            "registry": string("Image registry"),
            "repository": string("Image repository", minLength=1),
            "tag": string(tag_desc),
            "pullPolicy": PULL,
        },
        required=["repository"],
    )


pod_common = {
    "podLabels": LABEL_MAP,
    "podAnnotations": STR_MAP,
    "nodeSelector": STR_MAP,
    "affinity": K8S_OBJ,
    "tolerations": {"type": "array", "items": K8S_OBJ},
}

schema: dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "title": "falco-api chart values",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "nameOverride": string(maxLength=63),
        "fullnameOverride": string(maxLength=63),
        "imagePullSecrets": {"type": "array", "items": obj({"name": string(minLength=1)}, required=["name"])},
        "commonLabels": LABEL_MAP,
        # Kept by Helm for subchart/global values: tolerate it so `--set global.x=y` from an umbrella works.
        "global": {"type": "object"},
        "image": image("Empty means the chart appVersion"),
        "discovery": obj(
            {
                "sidecarSelector": {**LABEL_MAP, "minProperties": 1},
            },
            required=["sidecarSelector"],
        ),
        "falco": obj(
            {
                "enabled": boolean("Deploy the Falco DaemonSet"),
                "image": image("Falco version"),
                "driver": obj(
                    {
                        "kind": string(enum=["modern_ebpf", "kmod"]),
                        "leastPrivileged": boolean(),
                        "bufSizePreset": integer(minimum=0, maximum=10),
                        "dropFailedExit": boolean(),
                        "cpusForEachBuffer": integer(minimum=0),
                        "sysfsMount": boolean(),
                        "loader": obj(
                            {"image": image("Empty means falco.image.tag"), "resources": RESOURCES}
                        ),
                    },
                    required=["kind"],
                ),
                "rulesFiles": {"type": "array", "items": ABS_PATH},
                "config": {"type": "object", "description": "Merged over falco.yaml"},
                "webserver": obj({"port": PORT}),
                "metrics": obj({"interval": PROM_DURATION, "outputRule": boolean()}),
                "containerPlugin": obj(
                    {"enabled": boolean(), "sockets": {"type": "array", "items": ABS_PATH}}
                ),
                "k8saudit": obj({"enabled": boolean()}),
                "resources": RESOURCES,
                "containerSecurityContext": K8S_OBJ,
                "priorityClassName": string(),
                "updateStrategy": K8S_OBJ,
                **pod_common,
            },
            required=["enabled"],
        ),
        # Only the root: the store's layout under it is fixed (Falco lists <root>/falco-api.yaml).
        "managed": obj({"root": ABS_PATH}, required=["root"]),
        "sidecar": obj(
            {
                "grpcPort": PORT,
                "ingestPort": PORT,
                "metricsPort": PORT,
                "k8sauditUrl": string(pattern="^https?://"),
                "extraArgs": ARGS,
                "resources": RESOURCES,
                "securityContext": K8S_OBJ,
            }
        ),
        "operator": obj(
            {
                "replicas": integer(minimum=0),
                "peering": obj(
                    {
                        "enabled": boolean(),
                        "name": string(pattern="^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", maxLength=253),
                    }
                ),
                "webhook": obj(
                    {
                        "port": PORT,
                        "failurePolicy": string(enum=["Fail", "Ignore"]),
                        "timeoutSeconds": integer(minimum=1, maximum=30),
                        "paths": obj(
                            {"falcorules": string(pattern="^/"), "falcoconfigs": string(pattern="^/")}
                        ),
                    }
                ),
                "livenessPort": PORT,
                "extraArgs": ARGS,
                "resources": RESOURCES,
                "podSecurityContext": K8S_OBJ,
                "securityContext": K8S_OBJ,
                **pod_common,
            }
        ),
        "relay": obj(
            {
                "enabled": boolean(),
                "replicas": integer(minimum=0),
                "grpcPort": PORT,
                "service": obj(
                    {
                        "type": string(enum=["ClusterIP", "NodePort", "LoadBalancer"]),
                        "port": PORT,
                        "annotations": STR_MAP,
                    }
                ),
                "extraArgs": ARGS,
                "resources": RESOURCES,
                "podSecurityContext": K8S_OBJ,
                "securityContext": K8S_OBJ,
                **pod_common,
            }
        ),
        "certManager": obj(
            {
                "enabled": boolean(),
                "issuerRef": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "name": string(minLength=1),
                        "kind": string(enum=["Issuer", "ClusterIssuer"]),
                        "group": string(),
                    },
                },
                "duration": GO_DURATION,
                "renewBefore": GO_DURATION,
            }
        ),
        "tls": obj(
            {
                "validityDays": integer(minimum=1),
                "sidecarServerName": string(pattern="^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"),
            }
        ),
        "authz": obj(
            {
                "extraIdentities": {
                    "type": "array",
                    "items": obj(
                        {
                            "commonName": string(minLength=1),
                            "role": string(enum=["reader", "writer", "injector"]),
                        },
                        required=["commonName", "role"],
                    ),
                },
            }
        ),
        "networkPolicy": obj(
            {
                "enabled": boolean(),
                "metricsNamespaces": {
                    "type": "array",
                    "items": string(pattern="^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", maxLength=63),
                },
                "metricsNamespaceSelector": K8S_OBJ,
                "relayFrom": {"type": "array", "items": K8S_OBJ},
            }
        ),
    },
}
# issuerRef: if given, it needs a name
schema["properties"]["certManager"]["properties"]["issuerRef"]["dependencies"] = {
    "kind": ["name"],
    "group": ["name"],
}


def render_schema() -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    SCHEMA_PATH.write_text(render_schema(), encoding="utf-8")
