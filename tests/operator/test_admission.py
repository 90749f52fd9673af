"""The admission webhook, called over HTTPS with an AdmissionReview as the API server would."""

from __future__ import annotations

import base64
import socket
import ssl
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from tests.certs import Authority

from .conftest import Kube, OperatorStarter, eventually
from .test_operator_flow import RULE

CONFIGURATION = (
    "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/falco-api-operator.falcoapi.io"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def review(obj: dict[str, Any], operation: str = "CREATE") -> dict[str, Any]:
    group, version = obj["apiVersion"].split("/")
    plural = obj["kind"].lower() + "s"
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": group, "version": version, "kind": obj["kind"]},
            "resource": {"group": group, "version": version, "resource": plural},
            "requestKind": {"group": group, "version": version, "kind": obj["kind"]},
            "requestResource": {"group": group, "version": version, "resource": plural},
            "name": obj["metadata"]["name"],
            "operation": operation,
            "userInfo": {"username": "tester"},
            "object": obj,
            "oldObject": None,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


def falco_rule(name: str, rules: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "falcoapi.io/v1alpha1",
        "kind": "FalcoRule",
        "metadata": {"name": name},
        "spec": {"rules": rules, "order": 50, "enabled": True, **spec},
    }


async def start_with_webhook(
    tmp_path: Path, start_operator: OperatorStarter, *, behind_service: bool = False
) -> int:
    authority = Authority.create(tmp_path, "webhook-ca")
    server = authority.issue(
        tmp_path, "falco-api-operator", dns_names=("localhost", "falco-api-operator.falco.svc")
    )
    port = free_port()
    await start_operator(
        webhook_port=port,
        webhook_addr="127.0.0.1",
        webhook_cert=server.cert,
        webhook_key=server.key,
        webhook_ca=server.ca,
        webhook_url=None if behind_service else f"https://127.0.0.1:{port}",
    )
    return port


async def webhook_configuration(kube: Kube) -> dict[str, Any]:
    async def exists() -> bool:
        try:
            config = await kube.get(CONFIGURATION)
        except AssertionError:
            return False
        return len(config.get("webhooks") or []) == 2

    await eventually(exists)
    return dict(await kube.get(CONFIGURATION))


async def call_webhook(kube: Kube, obj: dict[str, Any]) -> dict[str, Any]:
    """Call the webhook the way the API server does: clientConfig.url, trusting clientConfig.caBundle."""
    config = await webhook_configuration(kube)
    (hook,) = [h for h in config["webhooks"] if obj["kind"].lower() in h["rules"][0]["resources"][0]]
    assert hook["failurePolicy"] == "Fail"
    context = ssl.create_default_context(cadata=base64.b64decode(hook["clientConfig"]["caBundle"]).decode())
    async with (
        aiohttp.ClientSession() as session,
        session.post(hook["clientConfig"]["url"], json=review(obj), ssl=context) as response,
    ):
        assert response.status == 200, await response.text()
        return dict((await response.json())["response"])


async def test_broken_rule_is_refused_with_the_validators_message(
    tmp_path: Path, kube: Kube, start_operator: OperatorStarter
) -> None:
    await start_with_webhook(tmp_path, start_operator)
    broken = falco_rule("broken", "- rule: No condition\n  desc: d\n  output: o\n  priority: WARNING\n")
    answer = await call_webhook(kube, broken)
    assert answer["allowed"] is False
    assert "condition" in answer["status"]["message"]
    assert answer["status"]["code"] == 422

    good = await call_webhook(kube, falco_rule("good", RULE))
    assert good["allowed"] is True


async def test_override_of_a_rule_no_falcorule_defines_is_refused(
    tmp_path: Path, kube: Kube, start_operator: OperatorStarter
) -> None:
    await start_with_webhook(tmp_path, start_operator)
    override = (
        "- rule: Nobody defines this\n  condition: and proc.name = x\n  override:\n    condition: append\n"
    )
    answer = await call_webhook(kube, falco_rule("orphan-override", override))
    assert answer["allowed"] is False
    assert "Nobody defines this" in answer["status"]["message"]

    # Once a FalcoRule that defines it exists (and is known to the operator), the same override passes.
    await kube.apply_rule("base", RULE.replace("Shell in test container", "Nobody defines this"), order=1)

    async def accepted() -> bool:
        return bool((await call_webhook(kube, falco_rule("orphan-override", override)))["allowed"])

    await eventually(accepted)


async def test_webhook_behind_a_service_advertises_the_service(
    tmp_path: Path, kube: Kube, start_operator: OperatorStarter
) -> None:
    await start_with_webhook(tmp_path, start_operator, behind_service=True)
    config = await webhook_configuration(kube)
    client = config["webhooks"][0]["clientConfig"]
    assert "url" not in client
    assert client["service"]["name"] == "falco-api-operator"
    assert client["service"]["namespace"] == "falco"
    assert client["service"]["path"].startswith("/validate-falco")
    assert client["caBundle"]


async def test_webhook_at_a_given_url_advertises_that_url(
    tmp_path: Path, kube: Kube, start_operator: OperatorStarter
) -> None:
    port = await start_with_webhook(tmp_path, start_operator)
    config = await webhook_configuration(kube)
    urls = sorted(hook["clientConfig"]["url"] for hook in config["webhooks"])
    assert urls == [
        f"https://127.0.0.1:{port}/validate-falcoconfig",
        f"https://127.0.0.1:{port}/validate-falcorule",
    ]


def test_config_admission_refuses_the_keys_the_sidecar_depends_on() -> None:
    from falco_api_operator.desired import FalcoConfigSpec
    from falco_api_operator.validation import validate_config

    def findings(config: dict[str, object]) -> list[str]:
        spec = FalcoConfigSpec.from_object(
            {"metadata": {"name": "c"}, "spec": {"order": 1, "config": config}}
        )
        return [str(f) for f in validate_config(spec)]

    assert findings({"priority": "notice", "buffered_outputs": False}) == []
    for key, value in (("json_output", False), ("http_output", {"enabled": False}), ("rules_files", [])):
        (message,) = findings({key: value})
        assert key in message and "falco-api sidecar" in message
    (typo,) = findings({"buffered_outputs": "sometimes"})
    assert "buffered_outputs" in typo
