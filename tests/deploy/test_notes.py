"""NOTES.txt renders, and tells each kind of install what it needs to know."""

from __future__ import annotations

from .chart import render


def test_notes_for_the_default_install() -> None:
    notes = render().notes
    assert "falco-api 0.1.0" in notes
    assert "daemonset/fa-falco-api-falco" in notes
    assert "cert-manager" in notes
    assert "falco-api-operator is writer" in notes and "falco-api-relay is reader" in notes
    assert "port-forward service/fa-falco-api-relay 5060" in notes
    assert "/etc/falco/falco-api/falco-api.yaml" in notes, "why Falco waits for the sidecar"
    assert "falco-api-sidecar" in notes and "tls.sidecarServerName" in notes
    assert "{{" not in notes and "<no value>" not in notes


def test_notes_name_the_values_in_use() -> None:
    notes = render(
        {"managed": {"root": "/var/lib/falco-api"}, "tls": {"sidecarServerName": "sidecar.example"}}
    ).notes
    assert "/var/lib/falco-api/falco-api.yaml" in notes
    assert "certificate names sidecar.example" in notes


def test_notes_without_falco_explain_the_falco_chart_values() -> None:
    notes = render({"falco": {"enabled": False}}).notes
    assert "did NOT deploy Falco" in notes
    assert "configmap fa-falco-api-falco-chart-values" in notes
    assert "helm upgrade --install falco falcosecurity/falco" in notes
    for setting in ("podLabels", "http_output", "extra.initContainers", "mounts.volumes", "rules_files"):
        assert setting in notes, setting
    assert "config_files + /etc/falco/falco-api/falco-api.yaml" in notes
    assert "rulesfiles-install-dir" in notes and "falcoctl.artifact.install.enabled=true" in notes
    assert "current/" not in notes, "the managed layout has no current/ folder"
    assert "daemonset/" not in notes


def test_notes_follow_the_switches() -> None:
    notes = render(
        {"certManager": {"enabled": False}, "relay": {"enabled": False}, "operator": {"replicas": 3}}
    ).notes
    assert "Helm generated a CA" in notes
    assert "port-forward" not in notes
    assert 'runs 3 replica(s) with kopf peering "falco-api"' in notes
    assert "<no value>" not in notes
