"""Traces from the chart's pods: each pod names itself in its traces' resource (the downward
API composed into OTEL_RESOURCE_ATTRIBUTES, which the server reads as any OTel SDK would),
an OTEL_RESOURCE_ATTRIBUTES of extraEnv replaces it, and the collector's CA and a client
certificate come from a Secret mounted as a directory, the rendered config pointing at it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from engine.config import load_settings
from engine.plugins import load_plugins
from observability.tracing import Tracing
from tests.chart.conftest import FALCO_TALON, Helm, Rendered, values_file
from tests.chart.sync import CHART

POD = {
    "metadata.name": "falco-talon-5f7d9c8b4d-x2x8k",
    "metadata.uid": "0b5e3c5e-8d5c-4a53-a3c2-5b8f4e2f2a10",
    "metadata.namespace": "falco",
    "spec.nodeName": "node-1",
}
"""What the downward API gives one pod of the release."""


def container(rendered: Rendered) -> dict[str, Any]:
    (c,) = rendered.one("Deployment")["spec"]["template"]["spec"]["containers"]
    return dict(c)


def pod_environment(rendered: Rendered) -> dict[str, str]:
    """The container's variables as the kubelet sets them for POD: fieldRefs read, and
    ``$(NAME)`` replaced by an earlier variable's value (``$$`` escapes), in order."""
    out: dict[str, str] = {}
    for var in container(rendered)["env"]:
        if "valueFrom" in var:
            ref = var["valueFrom"].get("fieldRef")
            if ref is None:
                continue  # a Secret's value: not what these tests are about
            out[var["name"]] = POD[ref["fieldPath"]]
            continue

        def expand(m: re.Match[str]) -> str:
            if m.group(0) == "$$":
                return "$"
            return out.get(m.group(1), m.group(0))

        out[var["name"]] = re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", expand, var["value"])
    return out


def test_each_pod_names_itself_in_the_resource_of_its_traces(
    default_render: Rendered, tmp_path: Path
) -> None:
    names = [v["name"] for v in container(default_render)["env"]]
    assert len(names) == len(set(names))  # a list-map: server-side apply refuses duplicates
    env = pod_environment(default_render)
    config, _ = default_render.write(tmp_path)
    settings = load_settings(str(config), load_plugins()[1], env=env)
    resource = Tracing(settings.tracing).resource
    assert {k: v for k, v in resource.items() if k.startswith("k8s.")} == {
        "k8s.pod.name": "falco-talon-5f7d9c8b4d-x2x8k",
        "k8s.pod.uid": "0b5e3c5e-8d5c-4a53-a3c2-5b8f4e2f2a10",
        "k8s.namespace.name": "falco",
        "k8s.node.name": "node-1",
        "k8s.deployment.name": "falco-talon",
        "k8s.container.name": "falco-talon",
    }
    assert resource["service.name"] == "falco-talon"


def test_an_otel_resource_attributes_of_extra_env_replaces_the_composed_one(
    helm: Helm, tmp_path: Path
) -> None:
    values = {
        "extraEnv": [
            {
                "name": "OTEL_RESOURCE_ATTRIBUTES",
                "value": "k8s.pod.name=$(OTEL_RESOURCE_ATTRIBUTES_POD_NAME),team=sec",
            },
            {"name": "OTEL_SERVICE_NAME", "value": "talon-eu"},
        ],
        "config": {"otel": {"enabled": True, "resourceAttributes": {"cluster": "eu-1"}}},
    }
    rendered = helm.template((values_file(tmp_path, values),))
    names = [v["name"] for v in container(rendered)["env"]]
    assert names.count("OTEL_RESOURCE_ATTRIBUTES") == 1
    config, _ = rendered.write(tmp_path)
    tracing = load_settings(str(config), load_plugins()[1], env=pod_environment(rendered)).tracing
    # The config file's attributes and the variable's, together; the variable's service name.
    assert tracing.resource_attributes == {
        "cluster": "eu-1",
        "k8s.pod.name": "falco-talon-5f7d9c8b4d-x2x8k",
        "team": "sec",
    }
    assert Tracing(tracing).resource["service.name"] == "talon-eu"


OTEL_TLS: dict[str, Any] = {
    "otel": {"tlsSecretName": "collector-tls", "caKey": "ca.pem", "clientCertificate": True},
    "config": {
        "otel": {
            "enabled": True,
            "endpoint": "https://otel-collector.monitoring:4317",
            "compression": "gzip",
            "exportWith": "sdk",
            "sampler": "parentbased_traceidratio",
            "samplingRatio": 0.5,
        }
    },
}


def test_the_collector_tls_secret_is_mounted_and_the_config_points_at_it(
    helm: Helm, tmp_path: Path
) -> None:
    rendered = helm.template((values_file(tmp_path, OTEL_TLS),))
    otel = yaml.safe_load(rendered.config_yaml())["otel"]
    assert otel == {
        **OTEL_TLS["config"]["otel"],
        "certificate": "/etc/falco-talon/otel-tls/ca.pem",
        "clientCertificate": "/etc/falco-talon/otel-tls/tls.crt",
        "clientKey": "/etc/falco-talon/otel-tls/tls.key",
    }
    pod = rendered.one("Deployment")["spec"]["template"]["spec"]
    assert {"name": "otel-tls", "secret": {"secretName": "collector-tls"}} in pod["volumes"]
    mounts = {m["name"]: m for m in container(rendered)["volumeMounts"]}
    assert mounts["otel-tls"] == {
        "name": "otel-tls",
        "mountPath": "/etc/falco-talon/otel-tls",
        "readOnly": True,
    }
    config, rules = rendered.write(tmp_path)
    check = subprocess.run(
        [str(FALCO_TALON), "check", "-c", str(config), "-r", str(rules)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    lint = helm.run("lint", "--strict", str(CHART), "-f", str(values_file(tmp_path, OTEL_TLS)))
    assert "0 chart(s) failed" in lint.stdout


def test_a_client_certificate_without_its_secret_fails_the_render(
    helm: Helm, tmp_path: Path
) -> None:
    values = values_file(tmp_path, {"otel": {"clientCertificate": True}})
    res = helm.run(*helm.template_args((values,)), check=False)
    assert res.returncode != 0
    assert "otel.clientCertificate needs otel.tlsSecretName" in res.stderr


@pytest.mark.parametrize("bad", [{"tlsSecretName": 3}, {"caKey": ""}, {"mtls": True}])
def test_the_values_schema_refuses_a_wrong_otel_value(
    helm: Helm, tmp_path: Path, bad: dict[str, Any]
) -> None:
    res = helm.run(*helm.template_args((values_file(tmp_path, {"otel": bad}),)), check=False)
    assert res.returncode != 0 and "otel" in res.stderr
