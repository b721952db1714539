"""The ``otel`` section from the standard OpenTelemetry variables, as the specification
reads them: the signal-specific ``OTEL_EXPORTER_OTLP_TRACES_*`` before the generic one,
timeouts in milliseconds, headers and resource attributes in the W3C Baggage form
(URL-decoded), the endpoint rules; the same settings as camelCase keys of the config file;
clear errors naming the variable; secrets never shown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from engine.cli import cli
from engine.config import ConfigError, load_settings, redacted
from engine.contract.notifiers import NotifierRegistry
from observability.settings import SAMPLERS, TracingSettings

REGISTRY = NotifierRegistry()

GENERIC = "OTEL_EXPORTER_OTLP_"
TRACES = "OTEL_EXPORTER_OTLP_TRACES_"

# (variable suffix, text, attribute, value)
EXPORTER_VARIABLES: list[tuple[str, str, str, Any]] = [
    ("PROTOCOL", "http/protobuf", "protocol", "http/protobuf"),
    (
        "HEADERS",
        "Authorization=Bearer%20t0k,x-tenant = sec ",
        "headers",
        {"Authorization": "Bearer t0k", "x-tenant": "sec"},
    ),
    ("INSECURE", "false", "insecure", False),
    ("TIMEOUT", "2500", "timeout", 2.5),
    ("COMPRESSION", "gzip", "compression", "gzip"),
    ("CERTIFICATE", "/etc/otel/ca.pem", "certificate", "/etc/otel/ca.pem"),
    ("CLIENT_KEY", "/etc/otel/tls.key", "client_key", "/etc/otel/tls.key"),
    ("CLIENT_CERTIFICATE", "/etc/otel/tls.crt", "client_certificate", "/etc/otel/tls.crt"),
]


def otel(env: dict[str, str], config: str | None = None) -> TracingSettings:
    return load_settings(config, REGISTRY, env=env).tracing


def errors(env: dict[str, str], config: str | None = None) -> str:
    with pytest.raises(ConfigError) as err:
        load_settings(config, REGISTRY, env=env)
    return str(err.value)


@pytest.mark.parametrize(("suffix", "text", "attr", "value"), EXPORTER_VARIABLES)
def test_each_exporter_variable_sets_its_key_and_the_traces_one_wins(
    suffix: str, text: str, attr: str, value: Any
) -> None:
    assert getattr(otel({GENERIC + suffix: text}), attr) == value
    assert getattr(otel({TRACES + suffix: text}), attr) == value
    default = getattr(TracingSettings(), attr)
    # Both set: the signal-specific one, and only it (no merging of the two).
    assert getattr(otel({TRACES + suffix: text, GENERIC + suffix: "x=y"}), attr) == value
    # Set but empty: as if unset, the next one counts.
    assert getattr(otel({TRACES + suffix: "", GENERIC + suffix: text}), attr) == value
    assert getattr(otel({}), attr) == default


def test_the_trace_sdk_variables_set_the_sampler_service_resource_and_exporters() -> None:
    t = otel(
        {
            "OTEL_TRACES_SAMPLER": "parentbased_always_off",
            "OTEL_TRACES_SAMPLER_ARG": "0.1",
            "OTEL_SERVICE_NAME": "talon-eu",
            "OTEL_RESOURCE_ATTRIBUTES": "k8s.pod.name=talon-0, deployment.environment=prod%2Ceu",
            "OTEL_TRACES_EXPORTER": "otlp, console",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://traces.example/otlp/v1/traces",
        }
    )
    assert (t.sampler, t.sampling_ratio, t.service_name) == (
        "parentbased_always_off",
        0.1,
        "talon-eu",
    )
    assert t.resource_attributes == {"k8s.pod.name": "talon-0", "deployment.environment": "prod,eu"}
    assert t.traces_exporter == ["otlp", "console"]
    assert (t.endpoint, t.traces_endpoint) == (
        "http://collector:4318",
        "https://traces.example/otlp/v1/traces",
    )


def test_our_own_variable_wins_over_the_standard_one_and_is_in_seconds() -> None:
    t = otel(
        {
            "OTEL_TIMEOUT": "7",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "2000",
            "OTEL_SAMPLER": "always_on",
            "OTEL_TRACES_SAMPLER": "always_off",
        }
    )
    assert (t.timeout, t.sampler) == (7.0, "always_on")


def test_every_setting_has_a_camelcase_key_in_the_otel_section(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        """
otel:
  enabled: true
  exportWith: sdk
  tracesExporter: [otlp, console]
  endpoint: collector.monitoring:4317
  tracesEndpoint: https://collector.monitoring:4317
  protocol: grpc
  headers: {authorization: Bearer s3cret}
  insecure: false
  timeout: 5
  compression: gzip
  certificate: /etc/falco-talon/otel/ca.crt
  clientCertificate: /etc/falco-talon/otel/tls.crt
  clientKey: /etc/falco-talon/otel/tls.key
  sampler: traceidratio
  samplingRatio: 0.25
  serviceName: talon
  resourceAttributes: {deployment.environment: prod}
"""
    )
    t = otel({"OTEL_RESOURCE_ATTRIBUTES": "k8s.pod.name=talon-0"}, str(config))
    assert t == TracingSettings(
        enabled=True,
        export_with="sdk",
        traces_exporter=["otlp", "console"],
        endpoint="collector.monitoring:4317",
        traces_endpoint="https://collector.monitoring:4317",
        protocol="grpc",
        headers={"authorization": "Bearer s3cret"},
        insecure=False,
        timeout=5,
        compression="gzip",
        certificate="/etc/falco-talon/otel/ca.crt",
        client_certificate="/etc/falco-talon/otel/tls.crt",
        client_key="/etc/falco-talon/otel/tls.key",
        sampler="traceidratio",
        sampling_ratio=0.25,
        service_name="talon",
        # The file's attributes and the variable's, together.
        resource_attributes={"deployment.environment": "prod", "k8s.pod.name": "talon-0"},
    )
    shown = redacted(load_settings(str(config), REGISTRY, env={}), REGISTRY)["otel"]
    assert shown["headers"] == {"authorization": "********"}
    assert "s3cret" not in repr(shown)


@pytest.mark.parametrize(
    ("settings", "url"),
    [
        (TracingSettings(), "http://localhost:4318/v1/traces"),
        (TracingSettings(endpoint="http://c:4318"), "http://c:4318/v1/traces"),
        (TracingSettings(endpoint="https://c/base/"), "https://c/base/v1/traces"),
        (TracingSettings(endpoint="http://c:4318?k=v"), "http://c:4318/v1/traces?k=v"),
        (TracingSettings(endpoint="http://c:4318/v1/traces"), "http://c:4318/v1/traces/v1/traces"),
        (
            TracingSettings(endpoint="http://x", traces_endpoint="http://c/custom"),
            "http://c/custom",
        ),
    ],
)
def test_http_spans_go_to_the_traces_endpoint_as_is_or_the_endpoint_plus_v1_traces(
    settings: TracingSettings, url: str
) -> None:
    assert settings.traces_url() == url


@pytest.mark.parametrize(
    ("settings", "target"),
    [
        (TracingSettings(), ("localhost:4317", False)),
        (TracingSettings(endpoint="c:4317", insecure=False), ("c:4317", True)),
        (TracingSettings(endpoint="https://c:4317"), ("c:4317", True)),
        (TracingSettings(endpoint="http://c:4317", insecure=False), ("c:4317", False)),
        (TracingSettings(endpoint="c:4317", certificate="/ca.pem"), ("c:4317", True)),
        (TracingSettings(endpoint="x:1", traces_endpoint="https://t:4317/"), ("t:4317", True)),
    ],
)
def test_grpc_spans_go_to_host_port_with_tls_as_the_scheme_or_settings_say(
    settings: TracingSettings, target: tuple[str, bool]
) -> None:
    assert settings.grpc_target() == target


def test_an_unknown_sampler_or_protocol_is_a_start_up_error_naming_the_variable(
    tmp_path: Path,
) -> None:
    text = errors(
        {"OTEL_TRACES_SAMPLER": "jaeger_remote", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"}
    )
    assert (
        f"environment OTEL_TRACES_SAMPLER: 'jaeger_remote' is not one of {list(SAMPLERS)}" in text
    )
    assert "environment OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: 'http/json' is not one of" in text
    text = errors({"OTEL_EXPORTER_OTLP_TIMEOUT": "soon"})
    assert "environment OTEL_EXPORTER_OTLP_TIMEOUT: must be number, got str 'soon'" in text
    # The variables that were fine are not blamed for a mistake in the file.
    config = tmp_path / "config.yaml"
    config.write_text("otel:\n  sampler: sometimes\n")
    text = errors({"OTEL_EXPORTER_OTLP_ENDPOINT": "c:4317"}, str(config))
    assert f"{config}:2:12: 'sometimes' is not one of" in text and "environment" not in text

    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "- name: r\n  action: {name: kubernetes:label, parameters: {labels: {a: b}}}\n"
    )
    config.write_text("otel: {enabled: true}\n")
    result = CliRunner().invoke(
        cli, ["check", "-c", str(config), "-r", str(rules)], env={"OTEL_TRACES_SAMPLER": "xray"}
    )
    assert result.exit_code == 1
    assert "environment OTEL_TRACES_SAMPLER: 'xray' is not one of" in result.output


def test_a_header_of_the_wrong_type_is_reported_without_its_value(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("otel:\n  headers: {authorization: 918273645}\n")
    text = errors({}, str(config))
    assert "918273645" not in text and "headers" in text
