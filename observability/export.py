"""The export process of the builtin path: reads pickled batches of span rows from its
parent, encodes each batch as one OTLP request (``observability.otlp``), sends it, and
reports each batch's fate back (the parent logs failures and counts spans in
``falco_talon_spans_total``)."""

from __future__ import annotations

import io
import pickle
import signal
from collections.abc import Mapping
from typing import Any

from observability.otlp import OtlpSender, encode_request, encode_resource
from observability.rows import TraceRows
from observability.settings import TracingSettings


def export_main(
    conn: Any, reports: Any, settings: TracingSettings, resource: Mapping[str, str]
) -> None:  # pragma: no cover - subprocess
    """Read batches until end of stream (an empty message or a closed pipe), send each,
    put ``(spans, None)`` or ``(spans, why it failed)`` on ``reports`` for each.

    A batch is the pickles of a few events' :data:`~observability.rows.TraceRows`, one
    after the other, about the processor's ``max_batch`` spans in all
    (``observability.processor``): each batch becomes one request as it is."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    sender = OtlpSender(settings)
    encoded_resource = encode_resource(resource)
    try:
        while True:
            try:
                data = conn.recv_bytes()
            except EOFError:
                break
            if not data:
                break
            traces = unpickle_all(data)
            spans = sum(len(rows) for _, _, rows in traces)
            reports.put((spans, sender.send(encode_request(traces, encoded_resource))))
    finally:
        sender.close()


def unpickle_all(data: bytes) -> list[TraceRows]:
    """The objects pickled one after the other in ``data`` (our own pipe, from our own
    parent)."""
    stream = io.BytesIO(data)
    out = []
    while stream.tell() < len(data):
        out.append(pickle.load(stream))  # a new unpickler each: each pickle has its own memo
    return out
