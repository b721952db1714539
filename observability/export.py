"""The export process: reads pickled batches of span rows from its parent, encodes each
batch as one OTLP request (``observability.otlp``) and sends it."""

from __future__ import annotations

import logging
import pickle
import signal
from typing import Any

from observability.otlp import OtlpSender, encode_request
from observability.settings import TracingSettings


def export_main(conn: Any, settings: TracingSettings) -> None:  # pragma: no cover - subprocess
    """Read batches until end of stream (an empty message or a closed pipe), send each.

    A batch is at most the processor's ``max_batch`` spans (``observability.processor``),
    so each becomes one request as it is."""
    logging.basicConfig(level=logging.WARNING, format="falco-talon otel-export: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    sender = OtlpSender(
        settings.endpoint, settings.protocol, settings.headers, settings.insecure, settings.timeout
    )
    try:
        while True:
            try:
                data = conn.recv_bytes()
            except EOFError:
                break
            if not data:
                break
            rows = pickle.loads(data)  # our own pipe, from our own parent
            sender.send(encode_request(rows, settings.service_name))
    finally:
        sender.close()
