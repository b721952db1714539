"""``falco-talon server`` whose spans are recorded and dropped as each event ends, for
``make bench``: what recording alone costs a server (the OpenTelemetry SDK's no-op span
processor, in our terms), beside tracing off and tracing exported to Jaeger.

``python bench/recording_server.py server ...`` takes ``falco-talon server``'s arguments;
run it with ``OTEL_ENABLED=true`` (and any endpoint: nothing is sent, no export process is
started). Not a configuration falco-talon offers: it records spans only to export them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import observability.tracing


class DropAtEnd:
    """A span processor that drops each event's spans when the event is done (the same
    surface as :class:`observability.processor.BatchProcessor`)."""

    shipped = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        return None

    def submit(self, trace: Any) -> None:
        trace.spans = []

    def start(self) -> None:
        return None

    def flush(self) -> None:
        return None

    def shutdown(self) -> None:
        return None

    def counts(self) -> dict[str, int]:
        return {"exported": 0, "failed": 0, "dropped": 0}


def main() -> None:
    # The export process is started by the processor it would feed: none is started.
    observability.tracing.BatchProcessor = DropAtEnd  # type: ignore[misc, assignment]
    from engine.cli import main as cli

    sys.argv = ["falco-talon", *sys.argv[1:]]
    cli()


if __name__ == "__main__":
    main()
