"""The event model: a Falco event decoded and validated from the HTTP body.

Position in the flow:
HTTP -> **event model** -> matcher -> state machine -> actionners -> notifiers.

This is the per-event hot path, so the body is decoded with orjson (strict UTF-8) and
validated with a schema compiled once by fastjsonschema from ``schemas/event.schema.json``.
Part of the engine's contract: actionners read ``output_fields`` from :class:`FalcoEvent`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

import fastjsonschema
import orjson

from engine.contract.priority import Priority, parse_priority
from engine.contract.results import Target
from engine.resources import schema_dir

SCHEMA_PATH = schema_dir() / "event.schema.json"

FieldValue = str | int | float | bool | None | list[Any]


class EventError(ValueError):
    """The body is not an acceptable Falco event. ``field`` names the culprit (or is None)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.message}
        if self.field is not None:
            body["field"] = self.field
        return body


_EXACT = 2.0**53
"""Integral floats below this print as integers; above, as Python prints the float (1e+300,
not a 301-digit integer that was never in the event)."""

MAX_NAME = 200
"""Longest field name quoted in an error message (a hostile name may be 1 MiB long)."""


def _short(name: str | None) -> str | None:
    if name is None or len(name) <= MAX_NAME:
        return name
    return name[:MAX_NAME] + f"... ({len(name)} characters)"


_VERSION_4 = (~(0xF000 << 64) & ~(0xC000 << 48), (0x4000 << 64) | (0x8000 << 48))


def new_event_id() -> str:
    """A random (version 4) UUID in its text form: the id of an event sent without one.

    Drawn with ``random.getrandbits`` (seeded by the OS, re-seeded in each forked process)
    rather than ``uuid.uuid4()``: an event id must be unique, not secret, and ``uuid4`` costs
    a system call and a ``UUID`` object on every event (~6 µs against ~1)."""
    clear, version = _VERSION_4
    h = f"{random.getrandbits(128) & clear | version:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def field_text(value: FieldValue) -> str | None:
    """A field value as Falco prints it: ints without a decimal point, booleans as
    ``true``/``false``, lists as ``(a,b)``; None (null) stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < _EXACT:
        return str(int(value))
    if isinstance(value, list):
        return "(" + ",".join(t for v in value if (t := field_text(v)) is not None) + ")"
    return str(value)


@dataclass(slots=True, eq=False)
class FalcoEvent:
    """One Falco event, as received."""

    rule: str
    priority: str
    output_fields: dict[str, FieldValue]
    source: str = "syscall"
    hostname: str = ""
    output: str = ""
    time: str = ""
    tags: tuple[str, ...] = ()
    id: str = field(default_factory=new_event_id)
    id_given: bool = False
    """True when the sender gave the id (Falcosidekick's ``uuid``); False: made up here."""
    level: Priority | None = None
    """The parsed priority; None when Falco sent a priority we do not know."""
    tag_set: frozenset[str] = frozenset()
    _texts: dict[str, str | None] | None = None

    def __post_init__(self) -> None:
        if self.level is None:
            self.level = parse_priority(self.priority)
        if self.tags and not self.tag_set:
            self.tag_set = frozenset(t.strip() for t in self.tags)

    @property
    def target(self) -> Target:
        """The pod the event is about: ``k8s.pod.name``/``k8s.ns.name``, or for Kubernetes
        audit events ``ka.target.name``/``ka.target.namespace``."""
        pod, ns = self.field("k8s.pod.name"), self.field("k8s.ns.name")
        if pod is None and ns is None:
            pod, ns = self.field("ka.target.name"), self.field("ka.target.namespace")
        return Target(pod=pod or None, namespace=ns or None)

    def field(self, key: str) -> str | None:
        """The value of ``output_fields[key]`` as text, None when absent or null (each
        field turned into text once, when first asked for: most events are asked for two)."""
        texts = self._texts
        if texts is None:
            texts = self._texts = {}
        elif key in texts:
            return texts[key]
        text = texts[key] = field_text(self.output_fields.get(key))
        return text

    def to_dict(self) -> dict[str, Any]:
        """The event in Falco's JSON shape (plus ``uuid``)."""
        return {
            "uuid": self.id,
            "time": self.time,
            "rule": self.rule,
            "priority": self.priority,
            "source": self.source,
            "hostname": self.hostname,
            "output": self.output,
            "output_fields": self.output_fields,
            "tags": list(self.tags),
        }


def _load_validator() -> Any:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return fastjsonschema.compile(schema)


_validate = _load_validator()


def _field_name(exc: Any) -> str | None:
    # fastjsonschema names the failing value "data.output_fields.proc.pid": drop the "data".
    path = list(getattr(exc, "path", []) or [])
    if len(path) > 1:
        return ".".join(str(p) for p in path[1:])
    if exc.rule == "required":
        missing = [r for r in exc.rule_definition if r not in (exc.value or {})]
        return missing[0] if missing else None
    return None


def _message(exc: Any, field_name: str | None) -> str:
    rule = exc.rule
    defn = exc.rule_definition
    if rule == "required" and field_name:
        return f"missing required field '{field_name}'"
    if rule == "type" and field_name:
        expected = defn if isinstance(defn, str) else " or ".join(defn)
        return f"field '{field_name}' must be {expected}, got {_json_type(exc.value)}"
    if rule == "type":
        return f"the event must be a JSON object, got {_json_type(exc.value)}"
    if rule == "minLength" and field_name:
        return f"field '{field_name}' must not be empty"
    detail = str(exc.message)
    detail = detail if len(detail) <= 2 * MAX_NAME else detail[: 2 * MAX_NAME] + "..."
    return f"field '{field_name}': {detail}" if field_name else detail


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def decode_event(body: bytes) -> FalcoEvent:
    """Decode and validate an HTTP body into a :class:`FalcoEvent`, or raise :class:`EventError`."""
    if not body.strip():
        raise EventError("empty body: expected a Falco event as a JSON object")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if body.startswith((b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")):
            raise EventError(
                "the body starts with a byte-order mark: send UTF-8 JSON without one"
            ) from None
        if "utf-8" in str(exc).lower():
            raise EventError("the body is not valid UTF-8") from None
        raise EventError(f"the body is not valid JSON: {exc}") from None
    try:
        _validate(data)
    except fastjsonschema.JsonSchemaValueException as exc:
        name = _short(_field_name(exc))
        raise EventError(_message(exc, name), name) from None
    return event_from_dict(data)


def event_from_dict(data: dict[str, Any]) -> FalcoEvent:
    """Build an event from an already validated dict (Falco's or Falcosidekick's shape)."""
    return FalcoEvent(
        rule=data["rule"],
        priority=data["priority"],
        output_fields=data["output_fields"],
        source=data.get("source") or "syscall",
        hostname=data.get("hostname") or "",
        output=data.get("output") or "",
        time=data.get("time") or "",
        tags=tuple(data.get("tags") or ()),
        id=data.get("uuid") or new_event_id(),
        id_given=bool(data.get("uuid")),
    )


def load_event(text: bytes | str) -> FalcoEvent:
    """Decode an event from a file's content (for ``explain``)."""
    return decode_event(text.encode() if isinstance(text, str) else text)
