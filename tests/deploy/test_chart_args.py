"""The chart's command lines are accepted by the real parsers, and every file they name is mounted.

Each rendered args list is parsed by the command's own ``build_parser()`` (abbreviations off, so a
flag the chart spells short of its full name fails rather than matching by prefix), in every scenario
and for both ways the sidecar runs (the chart's DaemonSet and the values for the falcosecurity/falco
chart). A flag renamed or removed in the code fails these tests instead of a pod at start-up.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any, NoReturn

import pytest
import yaml

from .chart import Rendered, container, render

# Volumes the falcosecurity/falco chart's pods already have, which the sidecar mounts there.
FALCO_CHART_VOLUMES = {"falco-yaml", "rulesfiles-install-dir"}
# Keys of every Secret the chart's certificates live in (cert-manager's and Helm's alike).
TLS_SECRET_KEYS = {"tls.crt", "tls.key", "ca.crt"}
FILE_FLAGS = {
    "sidecar": ("--tls-cert", "--tls-key", "--tls-ca", "--authz-config", "--falco-config", "--base-rules"),
    "operator": ("--tls-cert", "--tls-key", "--tls-ca", "--webhook-cert", "--webhook-key"),
    "relay": ("--tls-cert", "--tls-key", "--tls-ca"),
}


class ArgsRefused(AssertionError):
    pass


def _parser(command: str) -> argparse.ArgumentParser:
    """The command's real parser; the relay's may still be in progress, so it may be missing."""
    module_name = {
        "sidecar": "falco_api_sidecar.main",
        "operator": "falco_api_operator.main",
        "relay": "falco_api_relay.main",
    }[command]
    try:
        build_parser: Callable[[], argparse.ArgumentParser] = importlib.import_module(
            module_name
        ).build_parser
    except (ImportError, AttributeError) as error:
        pytest.skip(f"{module_name}.build_parser is not available: {error!r}")
    return build_parser()


def parse(command: str, args: list[str]) -> argparse.Namespace:
    parser = _parser(command)
    parser.allow_abbrev = False

    def refuse(message: str) -> NoReturn:
        raise ArgsRefused(f"falco-api-{command} refuses the chart's args ({message}): {args}")

    parser.error = refuse  # type: ignore[method-assign]
    return parser.parse_args(args)


def _pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def _workloads(rendered: Rendered) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(command, container, pod spec) for every command the render runs."""
    found: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
    if rendered.kinds("DaemonSet"):
        pod = _pod_spec(rendered.one("DaemonSet"))
        found.append(("sidecar", container(pod, "falco-api", init=True), pod))
    else:
        values = yaml.safe_load(rendered.one("ConfigMap", "-falco-chart-values")["data"]["values.yaml"])
        (sidecar,) = values["extra"]["initContainers"]
        found.append(("sidecar", sidecar, {"volumes": values["mounts"]["volumes"], "falcoChart": True}))
    pod = _pod_spec(rendered.one("Deployment", "-operator"))
    found.append(("operator", container(pod, "operator"), pod))
    if rendered.has("Deployment", "-relay"):
        pod = _pod_spec(rendered.one("Deployment", "-relay"))
        found.append(("relay", container(pod, "relay"), pod))
    return found


def test_every_rendered_command_line_parses(scenario: tuple[str, Rendered]) -> None:
    name, rendered = scenario
    for command, spec, _ in _workloads(rendered):
        assert spec["command"] == [f"falco-api-{command}"], name
        parse(command, spec["args"])


def test_the_parsed_values_are_the_charts() -> None:
    """Parsing is not vacuous: the values land in the destinations the commands read."""
    rendered = render({"tls": {"sidecarServerName": "sidecar.example"}})
    by_command = {command: parse(command, spec["args"]) for command, spec, _ in _workloads(rendered)}
    sidecar = by_command["sidecar"]
    assert str(sidecar.managed_root) == "/etc/falco/falco-api"
    assert str(sidecar.falco_config) == "/etc/falco-api/falco-config/falco.yaml"
    assert [str(p) for p in sidecar.base_rules] == ["/etc/falco-api/base-rules/falco_rules.yaml"]
    assert sidecar.authz_config == "/etc/falco-api/authz/authz.yaml"
    assert sidecar.k8saudit_url == "http://127.0.0.1:9765/k8s-audit"
    assert by_command["operator"].sidecar_server_name == "sidecar.example"
    assert by_command["operator"].manage_webhook is False
    if "relay" in by_command:
        assert by_command["relay"].upstream_server_name == "sidecar.example"


@pytest.mark.parametrize(
    ("values", "command"),
    [
        ({"sidecar": {"extraArgs": ["--no-such-flag"]}}, "sidecar"),
        ({"falco": {"enabled": False}, "sidecar": {"extraArgs": ["--replay-size", "many"]}}, "sidecar"),
        # A prefix of --sidecar-server-name: argparse would accept it by default.
        ({"operator": {"extraArgs": ["--sidecar-server", "x"]}}, "operator"),
        ({"relay": {"extraArgs": ["--sidecar-server-name", "x"]}}, "relay"),
    ],
    ids=["unknown-flag", "bad-value-falco-chart", "abbreviation", "relay-unknown-flag"],
)
def test_a_flag_the_command_does_not_have_is_caught(values: dict[str, Any], command: str) -> None:
    rendered = render(values)
    (spec,) = [spec for name, spec, _ in _workloads(rendered) if name == command]
    with pytest.raises(ArgsRefused):
        parse(command, spec["args"])


def _provided(path: str, spec: dict[str, Any], pod: dict[str, Any], rendered: Rendered) -> str | None:
    """Why ``path`` is not there for the container, or None when a mounted volume provides it."""
    mounts = sorted(spec.get("volumeMounts", []), key=lambda m: len(m["mountPath"]), reverse=True)
    target = PurePosixPath(path)
    mount = next((m for m in mounts if target.is_relative_to(m["mountPath"])), None)
    if mount is None:
        return f"{path} is under no volumeMount"
    relative = str(target.relative_to(mount["mountPath"]))
    volumes = {v["name"]: v for v in pod["volumes"]}
    volume = volumes.get(mount["name"])
    if volume is None:
        if pod.get("falcoChart") and mount["name"] in FALCO_CHART_VOLUMES:
            return None
        return f"{path}: volume {mount['name']} is not in the pod"
    if "secret" in volume:
        return None if relative in TLS_SECRET_KEYS else f"{path}: a TLS Secret has no key {relative}"
    if "configMap" in volume:
        items = volume["configMap"].get("items")
        if items:
            paths = {item["path"] for item in items}
        else:
            configmap = rendered.one("ConfigMap", volume["configMap"]["name"])
            paths = set(configmap["data"])
        return None if relative in paths else f"{path}: ConfigMap volume {mount['name']} has no {relative}"
    if "emptyDir" in volume:
        # Filled at run time (the sidecar's store, the default ruleset's copier): only the mount counts.
        return None
    return f"{path}: volume {mount['name']} is of an unexpected kind"


def test_every_file_a_flag_names_is_mounted(scenario: tuple[str, Rendered]) -> None:
    name, rendered = scenario
    for command, spec, pod in _workloads(rendered):
        args = spec["args"]
        for file_flag in FILE_FLAGS[command]:
            if file_flag not in args:
                continue
            problem = _provided(args[args.index(file_flag) + 1], spec, pod, rendered)
            assert problem is None, f"[{name}] {command} {file_flag}: {problem}"


def test_the_mount_check_is_not_vacuous() -> None:
    rendered = render()
    ((_, sidecar, pod),) = [w for w in _workloads(rendered) if w[0] == "sidecar"]
    assert _provided("/etc/falco-api/tls/tls.pem", sidecar, pod, rendered) is not None
    assert _provided("/etc/falco-api/authz/roles.yaml", sidecar, pod, rendered) is not None
    assert _provided("/nowhere/file", sidecar, pod, rendered) is not None
    assert _provided("/etc/falco-api/authz/authz.yaml", sidecar, pod, rendered) is None
