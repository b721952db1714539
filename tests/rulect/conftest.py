"""Rule CI: ``falco-talon test`` and the pre-commit hooks.

Real: the installed ``falco-talon`` entry point run as a subprocess, in the directory the
test files are written to (rules, events and test files are real files on disk; paths in
messages are the ones a user would see); the example rules and suites of ``examples/``; the
JUnit XML and JSON reports parsed back with ``xml.etree`` and ``json``; ``pre-commit`` (from
PyPI, a dev dependency) running this repository's ``.pre-commit-hooks.yaml`` in a temporary
git repository, both with the hook definitions as written but ``language: system`` (fast:
the hooks' entry, args, files and pass_filenames exactly as in the file) and, once per
commit, the real ``language: python`` install from this repository (``pre-commit
try-repo``-style, which needs PyPI; its environment is cached under ``.pytest_cache/``).
Nothing Kubernetes: ``test`` touches nothing, like ``explain``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FALCO_TALON = str(Path(sys.executable).parent / "falco-talon")


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def talon(tmp_path: Path) -> Callable[..., Result]:
    """Run ``falco-talon ARGS...`` in ``tmp_path`` (or ``cwd``)."""

    def run(*args: str, cwd: Path | None = None) -> Result:
        proc = subprocess.run(
            [FALCO_TALON, *args],
            cwd=cwd or tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        return Result(proc.returncode, proc.stdout, proc.stderr)

    return run


@pytest.fixture
def write(tmp_path: Path) -> Callable[[str, str], Path]:
    """Write ``text`` (dedented) to ``tmp_path/name``."""

    def write_file(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
        return path

    return write_file


@pytest.fixture
def examples(tmp_path: Path) -> Path:
    """The example seed rules and events, copied: ``rules.yaml``, ``event.json``."""
    for name in ("rules.yaml", "event.json", "event-warning.json"):
        (tmp_path / name).write_bytes((ROOT / "examples" / name).read_bytes())
    return tmp_path
