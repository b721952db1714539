"""Self-test of ``tests/env/jaeger.py``: a real Jaeger v2 receives OTLP spans and serves them back.

Needs the ``jaeger`` binary (``tests/env/build.sh jaeger``, built on first use) and the
OpenTelemetry SDK with both OTLP exporters; skipped when those packages are missing.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.env.jaeger import JaegerError, JaegerInfo, TestJaeger, parent_span_id, span_tags

otel_sdk = pytest.importorskip("opentelemetry.sdk.trace")
otlp_http = pytest.importorskip("opentelemetry.exporter.otlp.proto.http.trace_exporter")
otlp_grpc = pytest.importorskip("opentelemetry.exporter.otlp.proto.grpc.trace_exporter")

from opentelemetry.sdk.resources import Resource  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter  # noqa: E402


@pytest.fixture(scope="module")
def jaeger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestJaeger]:
    instance = TestJaeger(tmp_path_factory.mktemp("jaeger"))
    instance.start()
    yield instance
    instance.stop()


def send_parent_with_two_children(exporter: SpanExporter, service: str) -> str:
    """Export ``parent`` (attribute ``falco.rule``) with children ``child-a``/``child-b``."""
    provider = otel_sdk.TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("tests.env")
    with tracer.start_as_current_span("parent") as parent:
        parent.set_attribute("falco.rule", "Terminal shell in container")
        with tracer.start_as_current_span("child-a") as child:
            child.set_attribute("talon.actionner", "kubernetes:label")
            child.add_event("labelled", {"pod": "web-1"})
        with tracer.start_as_current_span("child-b"):
            pass
    provider.shutdown()
    return format(parent.get_span_context().trace_id, "032x")


def has_three_spans(trace: dict[str, Any]) -> bool:
    return len(trace["spans"]) == 3


def assert_parent_with_two_children(trace: dict[str, Any], trace_id: str) -> None:
    assert trace["traceID"] == trace_id
    spans = {s["operationName"]: s for s in trace["spans"]}
    assert sorted(spans) == ["child-a", "child-b", "parent"]
    parent = spans["parent"]
    assert parent_span_id(parent) is None
    assert parent_span_id(spans["child-a"]) == parent["spanID"]
    assert parent_span_id(spans["child-b"]) == parent["spanID"]
    assert {"refType": "CHILD_OF", "traceID": trace_id, "spanID": parent["spanID"]} in spans[
        "child-a"
    ]["references"]
    assert span_tags(parent)["falco.rule"] == "Terminal shell in container"
    assert span_tags(spans["child-a"])["talon.actionner"] == "kubernetes:label"
    [event] = spans["child-a"]["logs"]
    assert {"key": "event", "type": "string", "value": "labelled"} in event["fields"]
    assert event["timestamp"] >= parent["startTime"]
    assert parent["duration"] >= 0
    assert trace["processes"][parent["processID"]]["serviceName"]


def test_start_binds_every_listener_to_loopback_on_the_reported_ports(jaeger: TestJaeger) -> None:
    info = jaeger.info
    config = info.config_path.read_text()
    for port in (
        info.otlp_grpc_endpoint.rsplit(":", 1)[1],
        info.otlp_http_endpoint.rsplit(":", 1)[1],
        info.query_url.rsplit(":", 1)[1],
        info.query_grpc_endpoint.rsplit(":", 1)[1],
    ):
        assert f"127.0.0.1:{port}" in config
    listening = _listening_ports(info.pid)
    if listening is not None:  # /proc is readable: nothing else is bound
        reported = {
            int(e.rsplit(":", 1)[1])
            for e in (
                info.otlp_grpc_endpoint,
                info.otlp_http_endpoint,
                info.query_url,
                info.query_grpc_endpoint,
            )
        }
        assert listening == {("127.0.0.1", p) for p in reported}


def test_a_trace_exported_over_otlp_http_is_served_back_with_its_parent_child_links(
    jaeger: TestJaeger,
) -> None:
    service = f"talon-http-{uuid.uuid4().hex[:8]}"
    exporter = otlp_http.OTLPSpanExporter(endpoint=jaeger.info.otlp_http_traces_url, timeout=5)
    trace_id = send_parent_with_two_children(exporter, service)

    trace = jaeger.wait_for_trace(service, has_three_spans, timeout=10)

    assert_parent_with_two_children(trace, trace_id)
    assert jaeger.trace(trace_id)["traceID"] == trace_id
    assert service in jaeger.services()


def test_a_trace_exported_over_otlp_grpc_is_served_back_with_its_parent_child_links(
    jaeger: TestJaeger,
) -> None:
    service = f"talon-grpc-{uuid.uuid4().hex[:8]}"
    exporter = otlp_grpc.OTLPSpanExporter(
        endpoint=jaeger.info.otlp_grpc_endpoint, insecure=True, timeout=5
    )
    trace_id = send_parent_with_two_children(exporter, service)

    trace = jaeger.wait_for_trace(service, has_three_spans, timeout=10)

    assert_parent_with_two_children(trace, trace_id)
    [only] = jaeger.traces(service)
    assert only["traceID"] == trace_id


def test_traces_of_an_unknown_service_is_an_empty_list(jaeger: TestJaeger) -> None:
    assert jaeger.traces("no-such-service", lookback="5m") == []


def test_wait_for_trace_times_out_with_what_it_saw(jaeger: TestJaeger) -> None:
    with pytest.raises(JaegerError, match="no trace of service 'nobody' matched"):
        jaeger.wait_for_trace("nobody", timeout=0.3)


def test_two_instances_run_side_by_side_and_keep_their_traces_apart(
    jaeger: TestJaeger, tmp_path: Path
) -> None:
    second = TestJaeger(tmp_path / "second")
    info = second.start()
    try:
        assert _ports(info).isdisjoint(_ports(jaeger.info))
        service = f"talon-second-{uuid.uuid4().hex[:8]}"
        exporter = otlp_http.OTLPSpanExporter(endpoint=info.otlp_http_traces_url, timeout=5)
        send_parent_with_two_children(exporter, service)

        assert len(second.wait_for_trace(service, has_three_spans)["spans"]) == 3
        assert jaeger.traces(service) == []
        with pytest.raises(JaegerError, match="in use by another TestJaeger"):
            TestJaeger(tmp_path / "second").start()
    finally:
        second.stop()
    assert _is_zombie_or_gone(info.pid)
    assert jaeger.is_running()


def test_stop_terminates_only_its_own_process_and_frees_its_ports(tmp_path: Path) -> None:
    instance = TestJaeger(tmp_path / "j")
    info = instance.start()
    assert instance.is_running()
    instance.stop()
    assert not instance.is_running()
    assert _is_zombie_or_gone(info.pid)
    host, port = info.otlp_grpc_endpoint.rsplit(":", 1)
    with socket.socket() as s:
        s.bind((host, int(port)))  # the port is free again
    instance.stop()  # idempotent


# --------------------------------------------------------------------------


def _ports(info: JaegerInfo) -> set[int]:
    return {
        int(e.rsplit(":", 1)[1])
        for e in (
            info.otlp_grpc_endpoint,
            info.otlp_http_endpoint,
            info.query_url,
            info.query_grpc_endpoint,
        )
    }


def _is_zombie_or_gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def _listening_ports(pid: int) -> set[tuple[str, int]] | None:
    """(ip, port) of the TCP/UDP sockets ``pid`` listens on, from /proc (Linux), else None."""
    try:
        inodes = {
            os.readlink(f"/proc/{pid}/fd/{fd}")[len("socket:[") : -1]
            for fd in os.listdir(f"/proc/{pid}/fd")
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:[")
        }
    except OSError:
        return None
    found: set[tuple[str, int]] = set()
    for table, listen_state in (("tcp", "0A"), ("tcp6", "0A"), ("udp", "07"), ("udp6", "07")):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[9] in inodes and fields[3] == listen_state:
                addr, port = fields[1].rsplit(":", 1)
                found.add((_ip(addr), int(port, 16)))
    return found


def _ip(hex_addr: str) -> str:
    if len(hex_addr) == 8:
        return socket.inet_ntop(socket.AF_INET, bytes.fromhex(hex_addr)[::-1])
    raw = bytes.fromhex(hex_addr)
    return socket.inet_ntop(
        socket.AF_INET6, b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    )
