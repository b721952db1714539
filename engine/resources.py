"""Where the engine's data files live, installed or not.

A wheel carries the JSON schemas as package data in ``engine/_schemas`` (hatch's
``force-include`` copies the top-level ``schemas/`` there); an editable checkout has no such
folder and reads the repository's ``schemas/``, which stays the source of both.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGED = Path(__file__).resolve().parent / "_schemas"
_CHECKOUT = Path(__file__).resolve().parent.parent / "schemas"


def schema_dir() -> Path:
    """The folder holding ``event``/``rules``/``config.schema.json``."""
    return _PACKAGED if _PACKAGED.is_dir() else _CHECKOUT
