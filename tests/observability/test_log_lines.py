"""The log lines as a user reads them on a process's stderr: a Python process configures
logging with ``setup_logging`` (as ``falco-talon server`` does) and writes through the
real handler (the fast path an event's lines take); its stderr is read back. Nothing is
faked."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
EVENT_ID = "0b7c4a1e-9f0e-4f43-9a53-3c2e0b7c4a1e"

PRELUDE = f"""
import logging
from observability.eventlog import event_logger
from observability.logging import setup_logging
from observability.spans import Trace, activate
setup_logging("json", "INFO")
elog = event_logger(logging.getLogger("falco_talon.pipeline"), {EVENT_ID!r}, "ab" * 16)
"""


def stderr_lines(code: str) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [json.loads(line) for line in proc.stderr.splitlines() if line]


def test_an_event_line_carries_its_fields_in_order_and_the_active_span() -> None:
    [line] = stderr_lines(
        """
        trace = Trace(0xABAB, sampled=True)
        span = trace.start("actions")
        with activate(trace, span):
            elog.info(
                "%s %s: %s", "kubernetes:terminate", "planned", "Rule Terminate",
                fields={"rule": "Rule Terminate", "outcome": "planned", "duration_ms": 0.011},
            )
        elog.debug("not shown at info")
        print(f"{span.span_id:016x}")
        """
    )
    assert list(line)[:4] == ["time", "level", "logger", "message"]
    assert line["level"] == "info"
    assert line["logger"] == "falco_talon.pipeline"
    assert line["message"] == "kubernetes:terminate planned: Rule Terminate"
    assert line["event_id"] == EVENT_ID
    assert line["rule"] == "Rule Terminate"
    assert line["duration_ms"] == 0.011
    # The ids of the span the line was written under (what Jaeger shows).
    assert line["trace_id"] == f"{0xABAB:032x}"
    assert len(line["span_id"]) == 16 and line["span_id"] != "0" * 16
    assert line["time"].endswith("+00:00") and len(line["time"]) == 29


def test_an_error_line_carries_the_traceback_and_a_handler_filter_still_applies() -> None:
    lines = stderr_lines(
        """
        try:
            raise RuntimeError("the API is gone")
        except RuntimeError:
            elog.exception("event run failed in state %s", "actions")
        # A filter someone adds to the handler (to drop a noisy logger) is honoured.
        handler = logging.getLogger().handlers[0]
        handler.addFilter(lambda record: record.name != "falco_talon.noisy")
        logging.getLogger("falco_talon.noisy").warning("dropped")
        event_logger(logging.getLogger("falco_talon.kept"), "e").warning("kept")
        """
    )
    assert [line["message"] for line in lines] == ["event run failed in state actions", "kept"]
    error = lines[0]
    assert error["level"] == "error"
    assert "RuntimeError: the API is gone" in error["exception"]
    assert error["event_id"] == EVENT_ID
