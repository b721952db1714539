"""Authenticated ingest in the chart: the TLS, client-CA and token Secrets are mounted as
directories and the rendered config points at them (the server, fed that config, loads
them); with config.probesPort the probes, the Service and the ServiceMonitor use the probes
port; the NetworkPolicy admits the named pods only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from engine.config import load_settings
from engine.plugins import load_plugins
from tests.chart.conftest import Helm, Rendered, values_file
from tests.chart.sync import CHART

INGEST: dict[str, Any] = {
    "tls": {
        "secretName": "talon-tls",
        "clientCASecretName": "falco-clients",
        "clientCAKey": "ca.pem",
    },
    "auth": {"tokenSecretName": "talon-token"},
    "config": {"probesPort": 2804, "headerTimeout": 5, "bodyTimeout": 20},
    "serviceMonitor": {"enabled": True},
    "networkPolicy": {
        "enabled": True,
        "probesFrom": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}],
    },
}


@pytest.fixture(scope="module")
def ingest(helm: Helm, tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    return helm.template((values_file(tmp_path_factory.mktemp("v"), INGEST),))


def pod_spec(rendered: Rendered) -> dict[str, Any]:
    return dict(rendered.one("Deployment")["spec"]["template"]["spec"])


def test_the_secrets_are_mounted_and_the_config_points_at_them(
    ingest: Rendered, tmp_path: Path
) -> None:
    config = yaml.safe_load(ingest.config_yaml())
    assert config["tls"] == {
        "certFile": "/etc/falco-talon/tls/tls.crt",
        "keyFile": "/etc/falco-talon/tls/tls.key",
        "clientCAFile": "/etc/falco-talon/client-ca/ca.pem",
    }
    assert config["auth"] == {"tokenFile": "/etc/falco-talon/auth/token"}
    pod = pod_spec(ingest)
    volumes = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
    assert volumes["tls"]["secretName"] == "talon-tls"
    assert volumes["client-ca"] == {
        "secretName": "falco-clients",
        "items": [{"key": "ca.pem", "path": "ca.pem"}],
    }
    assert volumes["auth"]["secretName"] == "talon-token"
    (container,) = pod["containers"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    for name, path in (
        ("tls", "/etc/falco-talon/tls"),
        ("client-ca", "/etc/falco-talon/client-ca"),
        ("auth", "/etc/falco-talon/auth"),
    ):
        assert mounts[name]["mountPath"] == path and "subPath" not in mounts[name]
    # The server accepts the rendered config as it is.
    path, _ = ingest.write(tmp_path)
    settings = load_settings(str(path), load_plugins()[1], env={})
    assert settings.tls.client_ca_file == "/etc/falco-talon/client-ca/ca.pem"
    assert (settings.server.probes_port, settings.server.header_timeout) == (2804, 5)


def test_with_a_probes_port_probes_service_and_monitor_use_it(ingest: Rendered) -> None:
    (container,) = pod_spec(ingest)["containers"]
    assert {"name": "probes", "containerPort": 2804, "protocol": "TCP"} in container["ports"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "probes"}
    ports = {p["name"]: p for p in ingest.one("Service")["spec"]["ports"]}
    assert ports["probes"]["targetPort"] == "probes" and ports["http"]["targetPort"] == "http"
    (endpoint,) = ingest.one("ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["port"] == "probes" and "scheme" not in endpoint


def test_the_network_policy_admits_only_the_named_pods_on_each_port(ingest: Rendered) -> None:
    events, probes = ingest.one("NetworkPolicy")["spec"]["ingress"]
    assert events["ports"] == [{"protocol": "TCP", "port": "http"}]
    assert [p["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for p in events["from"]] == [
        "falco",
        "falcosidekick",
    ]
    assert probes["ports"] == [{"protocol": "TCP", "port": "probes"}]
    assert probes["from"] == INGEST["networkPolicy"]["probesFrom"]


def test_tls_without_a_probes_port_probes_over_https(helm: Helm) -> None:
    rendered = helm.template(sets=("tls.secretName=talon-tls", "serviceMonitor.enabled=true"))
    (container,) = pod_spec(rendered)["containers"]
    assert container["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert container["readinessProbe"]["httpGet"]["port"] == "http"
    assert rendered.one("ServiceMonitor")["spec"]["endpoints"][0]["scheme"] == "https"
    assert "client-ca" not in {v["name"] for v in pod_spec(rendered)["volumes"]}


@pytest.mark.parametrize(
    ("sets", "complaint"),
    [
        (("tls.secretName=t", "tls.clientCASecretName=ca"), "needs config.probesPort"),
        (("tls.clientCASecretName=ca", "config.probesPort=2804"), "needs tls.secretName"),
        (("auth.tokenFile=/x",), "tokenFile"),
    ],
)
def test_incoherent_ingest_values_fail_the_render(
    helm: Helm, sets: tuple[str, ...], complaint: str
) -> None:
    res = helm.run(*helm.template_args(sets=sets), check=False)
    assert res.returncode != 0 and complaint in res.stderr


def test_helm_lint_strict_passes_with_authenticated_ingest(helm: Helm, tmp_path: Path) -> None:
    res = helm.run("lint", "--strict", str(CHART), "-f", str(values_file(tmp_path, INGEST)))
    assert "0 chart(s) failed" in res.stdout
