"""Our OTLP encoding, decoded by the official generated classes: what we write is what the
SDK's own encoder would say about the same spans."""

from __future__ import annotations

import time
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.trace import SpanKind

from observability import otlp
from observability.export import unpickle_all
from observability.otlp import encode_request, encode_resource
from observability.resource import resource_attributes
from observability.sdk import Converter
from observability.settings import TracingSettings
from observability.sinks import RowSink
from observability.spans import SpanRecord

ATTRIBUTES = {
    "talon__rule": "kill",
    "talon__before": False,
    "talon__continue": True,
    "n": -3,
    "ratio": 0.25,
    "talon__matched_rules": ["a", "b"],
    "k8s__pod__name": None,
    "falco__output": "x" * 300,
}


def as_the_export_process_gets(*traces: tuple[int, int | None, list[SpanRecord]]) -> Any:
    """The traces as the server pickles them, one after the other in a batch, read back
    as the export process reads them."""
    sink = RowSink()
    return unpickle_all(b"".join(sink.encode(*trace) for trace in traces))


def records() -> list[SpanRecord]:
    now = time.time_ns()
    root = SpanRecord(
        "POST /",
        0x1234,
        0xABCD,
        now,
        SpanKind.SERVER.value,
        now + 10,
        {"http__request__method": "POST"},
    )
    state = SpanRecord(
        "actions",
        0x5678,
        0x1234,
        now + 1,
        SpanKind.INTERNAL.value,
        now + 9,
        dict(ATTRIBUTES),
        [("step skipped", now + 2, {"talon__reason": "superseded"})],
        "boom",
    )
    return [root, state]


def test_our_encoding_decodes_to_the_same_spans_as_the_sdk_encoding() -> None:
    trace_id, remote = 0x4BF92F3577B34DA6A3CE929D0E0E4736, 0xABCD
    spans = records()
    resource = resource_attributes(TracingSettings(resource_attributes={"k8s.pod.name": "t-0"}))
    ours = ExportTraceServiceRequest.FromString(
        encode_request(
            as_the_export_process_gets((trace_id, remote, spans)), encode_resource(resource)
        )
    )
    convert = Converter(resource)
    theirs = encode_spans([convert(trace_id, remote, r) for r in spans])
    mine = ours.resource_spans[0].scope_spans[0].spans
    ref = theirs.resource_spans[0].scope_spans[0].spans
    assert len(mine) == len(ref) == 2
    for a, b in zip(mine, ref, strict=True):
        assert (a.trace_id, a.span_id, a.parent_span_id, a.name, a.kind) == (
            b.trace_id,
            b.span_id,
            b.parent_span_id,
            b.name,
            b.kind,
        )
        assert (a.start_time_unix_nano, a.end_time_unix_nano) == (
            b.start_time_unix_nano,
            b.end_time_unix_nano,
        )
        assert {kv.key: kv.value for kv in a.attributes} == {
            kv.key: kv.value for kv in b.attributes
        }
        assert [(e.name, e.time_unix_nano, list(e.attributes)) for e in a.events] == [
            (e.name, e.time_unix_nano, list(e.attributes)) for e in b.events
        ]
        assert (a.status.code, a.status.message) == (b.status.code, b.status.message)
    service = {kv.key: kv.value.string_value for kv in ours.resource_spans[0].resource.attributes}
    assert service == {
        kv.key: kv.value.string_value for kv in theirs.resource_spans[0].resource.attributes
    }
    assert service["service.name"] == "falco-talon"
    assert service["k8s.pod.name"] == "t-0"
    assert mine[1].status.code == 2 and mine[1].status.message == "boom"  # ERROR
    assert len({kv.key: kv for kv in mine[1].attributes}["falco.output"].value.string_value) == 256


def test_repeated_and_look_alike_values_keep_their_types_as_the_entry_cache_fills(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Entries are cached by value: True, 1, 1.0 and "1" (equal or alike as Python values)
    must still encode as a bool, an int, a double and a string, and a cache that fills up
    and is emptied must not change what is written."""
    monkeypatch.setattr(otlp, "_KV_CACHE_SIZE", 5)
    monkeypatch.setattr(otlp, "_KV_CACHE", {})
    now = time.time_ns()
    values: list[Any] = [True, 1, 1.0, "1", False, 0, *[f"id-{n}" for n in range(12)]]
    spans = [
        SpanRecord("s", n + 1, None, now, SpanKind.INTERNAL.value, now + 1, {"v": v, "w": v})
        for n, v in enumerate(values * 2)
    ]
    request = ExportTraceServiceRequest.FromString(
        encode_request(as_the_export_process_gets((7, None, spans)), encode_resource({}))
    )
    decoded = request.resource_spans[0].scope_spans[0].spans
    kinds = {bool: "bool_value", int: "int_value", float: "double_value", str: "string_value"}
    for span, value in zip(decoded, values * 2, strict=True):
        for kv in span.attributes:
            assert kv.value.WhichOneof("value") == kinds[type(value)]
            assert getattr(kv.value, kinds[type(value)]) == value


def test_a_batch_of_several_events_is_one_request_holding_each_events_spans() -> None:
    """The server pickles each event's spans as the event ends and sends a batch of them
    as one message: the export process reads every event back, in order, and each span
    keeps its own trace id, parent (the remote parent of a continued trace too) and
    attributes (an event's id on each of its spans: one object, pickled once an event)."""
    now = time.time_ns()
    traces = []
    for n in range(3):
        event_id = f"event-{n}"
        root = SpanRecord(
            "POST /", 100 + n, 50 if n == 1 else None, now, 1, now + 5, {"id": event_id}
        )
        state = SpanRecord(
            "received", 200 + n, 100 + n, now + 1, 0, now + 4, {"id": event_id, "i": n}
        )
        traces.append((0xABC0 + n, 50 if n == 1 else None, [root, state]))
    request = ExportTraceServiceRequest.FromString(
        encode_request(as_the_export_process_gets(*traces), encode_resource({}))
    )
    decoded = request.resource_spans[0].scope_spans[0].spans
    assert [
        (int.from_bytes(s.trace_id, "big"), int.from_bytes(s.span_id, "big"), s.name)
        for s in decoded
    ] == [
        (0xABC0 + n, span_id + n, name)
        for n in range(3)
        for span_id, name in ((100, "POST /"), (200, "received"))
    ]
    assert [int.from_bytes(s.parent_span_id, "big") for s in decoded] == [0, 100, 50, 101, 0, 102]
    assert decoded[0].kind == 2 and decoded[1].kind == 1  # SERVER, INTERNAL (proto = SDK + 1)
    assert [{kv.key: kv.value for kv in s.attributes} for s in decoded] == [
        attributes
        for n in range(3)
        for attributes in (
            {"id": AnyValue(string_value=f"event-{n}")},
            {"id": AnyValue(string_value=f"event-{n}"), "i": AnyValue(int_value=n)},
        )
    ]
