"""A ``falco-talon server`` as its own process, the way a user starts it (``python -m
engine server``), for the tests and ``make bench`` that measure a real process."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[2]


def start_server(
    rules: Path,
    port: int,
    env: dict[str, str],
    log: IO[Any],
    *flags: str,
    entry: Sequence[str] | None = None,
) -> subprocess.Popen[bytes]:
    """``falco-talon server`` with examples/config.yaml, ``rules`` and ``flags``, on
    127.0.0.1:``port``; stderr to ``log`` (never a pipe nobody reads: it would fill and
    stall the server). ``entry``: what Python runs instead of ``-m engine`` (a script taking
    the same arguments: ``make bench``'s bench/recording_server.py)."""
    return subprocess.Popen(
        [
            sys.executable,
            *(entry or ("-m", "engine")),
            *("server", "-c", str(ROOT / "examples" / "config.yaml")),
            *("-r", str(rules), "--listen-port", str(port), *flags),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
