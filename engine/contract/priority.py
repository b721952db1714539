"""Falco priorities, ordered, parsed case-insensitively.

Part of the engine's contract: the event model and the matcher both use :class:`Priority`.
"""

from __future__ import annotations

from enum import IntEnum


class Priority(IntEnum):
    """Falco's priorities, lowest first."""

    DEBUG = 0
    INFORMATIONAL = 1
    NOTICE = 2
    WARNING = 3
    ERROR = 4
    CRITICAL = 5
    ALERT = 6
    EMERGENCY = 7

    @property
    def label(self) -> str:
        """The name as Falco prints it (``Critical``)."""
        return self.name.capitalize()


_BY_NAME: dict[str, Priority] = {p.name.lower(): p for p in Priority}
_BY_NAME["info"] = Priority.INFORMATIONAL


def parse_priority(text: str) -> Priority | None:
    """The priority named by ``text`` (any case, ``Info`` accepted), or None if unknown."""
    return _BY_NAME.get(text.strip().lower())


def priority_names() -> list[str]:
    """Every accepted spelling, lower case (for schemas and error messages)."""
    return list(_BY_NAME)
