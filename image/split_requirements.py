"""Move the named packages' entries out of a hash-pinned requirements file into another.

Usage: ``split_requirements.py REQUIREMENTS OUT NAME...``. ``uv export`` writes an entry as
``name==version \\`` followed by its ``--hash=`` lines (and ``# via`` comments); the named
entries go to OUT whole, the rest stay. image/build.sh installs the first file from wheels
only and OUT from source archives (packages published without a wheel).
"""

from __future__ import annotations

import sys
from pathlib import Path


def split(text: str, names: set[str]) -> tuple[str, str]:
    keep: list[str] = []
    moved: list[str] = []
    target = keep
    for line in text.splitlines(keepends=True):
        if line and not line[0].isspace() and not line.startswith("#"):
            name = line.split("==", 1)[0].strip().lower()
            target = moved if name in names else keep
        target.append(line)
    return "".join(keep), "".join(moved)


def main() -> None:
    requirements, out, *names = sys.argv[1:]
    keep, moved = split(Path(requirements).read_text(), {n.lower() for n in names})
    Path(requirements).write_text(keep)
    Path(out).write_text(moved)


if __name__ == "__main__":
    main()
