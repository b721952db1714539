"""Rule test files: their JSON Schema and loading them with positions (``falco-talon test``).

Position in the flow: none at run time. ``falco-talon test`` loads test files here (YAML with
positions through :mod:`engine.sourcemap`, validated against :data:`TEST_SCHEMA`, which
``falco-talon schemas`` renders to ``schemas/rules-test.schema.json``), then
:mod:`engine.ruletest` runs each case through ``explain``'s dry run and compares.

A test file::

    tests:
      - name: a shell is isolated before the pod is terminated
        event: ../event.json            # a file (relative to this one), or the event inline
        priority: Critical              # optional overrides of the event
        output_fields: {k8s.ns.name: demo}
        expect:
          matched: [Rule A, Rule B]     # exactly these, in rule order ([]: nothing happens)
          steps:                        # exactly these steps, in execution order
            - {rule: Rule A, action: kubernetes:networkpolicy, outcome: planned}
            - {rule: Rule B, outcome: skipped, reason: superseded}
          order: [Rule A, Rule B]       # these run (planned), in this order, maybe among others
          acting: [Rule A]              # each has a step that runs
          not_acting: [Rule C]          # none of its steps runs
          notifiers: {Rule A: [slack]}  # where each listed rule's results go (as a set)

Every expectation is optional; those given must all hold.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import orjson

from engine.contract.event import EventError, FalcoEvent, decode_event
from engine.rules import expand_paths
from engine.schema_errors import rule_problems
from engine.sourcemap import Document, PathKey, Position, SourceError, json_path, load_yaml

SCHEMA_ID = "https://falco-talon.dev/schemas/rules-test.schema.json"

OUTCOMES = ("planned", "skipped")
"""What a step can be in a dry run: it would run, or it would not."""

_STEP_REF: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["rule"],
    "properties": {
        "rule": {"type": "string", "minLength": 1, "description": "The talon rule's name."},
        "action": {
            "type": "string",
            "minLength": 1,
            "description": "The actionner (kubernetes:terminate, ...).",
        },
        "action_name": {
            "type": "string",
            "minLength": 1,
            "description": "A v0.3 chain step: the action's name in the rule.",
        },
        "stage": {
            "enum": ["before-actions", "actions", "chain"],
            "errorMessage": "is not a stage: before-actions, actions or chain",
        },
        "outcome": {
            "enum": list(OUTCOMES),
            "errorMessage": "is not an outcome: planned (would run) or skipped",
        },
        "reason": {
            "type": "string",
            "description": "Must occur in the step's reason (a substring); '' for no reason.",
        },
    },
}
"""One expected step: every field given must equal the step's (``reason``: be part of it)."""

_NAMES: dict[str, Any] = {"type": "array", "items": {"type": "string", "minLength": 1}}

TEST_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": SCHEMA_ID,
    "title": "falco-talon rule tests",
    "description": "Test cases for talon rules, run by `falco-talon test -r RULES... FILE...`: "
    "each case names a Falco event and what the engine must do with it.",
    "type": "object",
    "additionalProperties": False,
    "required": ["tests"],
    "properties": {
        "description": {"type": "string"},
        "tests": {"type": "array", "items": {"$ref": "#/$defs/case"}},
    },
    "$defs": {
        "case": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name", "event", "expect"],
            "properties": {
                "name": {
                    "type": "string",
                    "minLength": 1,
                    "description": "Unique in the file; the test's name in reports.",
                },
                "description": {"type": "string"},
                "event": {
                    "type": ["string", "object"],
                    "minLength": 1,
                    "description": "A JSON file holding a Falco event (Falco's or Falcosidekick's "
                    "shape), relative to this test file; or the event itself, inline.",
                },
                "priority": {"type": "string", "description": "Replaces the event's priority."},
                "output_fields": {
                    "type": "object",
                    "description": "Set (or replace) these output fields of the event.",
                },
                "expect": {"$ref": "#/$defs/expect"},
            },
        },
        "expect": {
            "type": "object",
            "additionalProperties": False,
            "minProperties": 1,
            "description": "What must happen; at least one expectation.",
            "properties": {
                "matched": {
                    **_NAMES,
                    "description": "Exactly the rules that match, in rule order; [] means "
                    "nothing happens.",
                },
                "steps": {
                    "type": "array",
                    "items": {"$ref": "#/$defs/step"},
                    "description": "Exactly these steps, in execution order (skipped included).",
                },
                "order": {
                    "type": "array",
                    "items": {
                        "anyOf": [{"type": "string", "minLength": 1}, {"$ref": "#/$defs/step"}]
                    },
                    "description": "Steps that run (planned), in this order; other steps may "
                    "come between (a subsequence). A string is a rule name.",
                },
                "acting": {**_NAMES, "description": "Each of these rules has a step that runs."},
                "not_acting": {
                    **_NAMES,
                    "description": "None of these rules' steps runs (not matched, or skipped).",
                },
                "notifiers": {
                    "type": "object",
                    "additionalProperties": _NAMES,
                    "description": "For each rule listed, exactly the notifiers its results go "
                    "to (in any order); [] for none.",
                },
            },
        },
        "step": _STEP_REF,
    },
}


@dataclass(frozen=True, slots=True)
class Case:
    """One test case, loaded: its event decoded with the overrides applied."""

    name: str
    file: str
    position: Position
    expect: Mapping[str, Any]
    event: FalcoEvent | None
    """None when the event could not be loaded (:attr:`error` says why)."""
    error: SourceError | None = None
    positions: Mapping[str, Position] = field(default_factory=dict)
    """Where each expectation stands in the file: ``steps``, and for an entry ``steps[1]``
    or ``notifiers[Rule X]``."""


@dataclass(frozen=True, slots=True)
class Suite:
    """One test file: its cases, or the errors that kept it from loading."""

    file: str
    cases: tuple[Case, ...] = ()
    errors: tuple[SourceError, ...] = ()


_VALIDATOR = jsonschema.Draft202012Validator(TEST_SCHEMA)


def suite_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files in the order given; a directory stands for its ``*.yaml``/``*.yml`` files."""
    return expand_paths(paths)


def load_suite(path: Path) -> Suite:
    """Read, validate and resolve one test file; problems become :class:`SourceError` s."""
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return Suite(file, errors=(SourceError(Position(file, 1, 1), f"cannot read: {reason}"),))
    doc = load_yaml(text, file)
    if doc.errors:
        return Suite(file, errors=tuple(doc.errors))
    errors = _validate(doc)
    if errors:
        return Suite(file, errors=tuple(errors))
    cases = []
    seen: dict[str, Position] = {}
    for i, item in enumerate(doc.value["tests"]):
        where: PathKey = ("tests", i)
        name = item["name"]
        if name in seen:
            pos = doc.position((*where, "name"))
            errors.append(
                SourceError(
                    pos,
                    f"duplicate test name {name!r}, first at {seen[name]}",
                    json_path((*where, "name")),
                )
            )
            continue
        seen[name] = doc.position(where)
        event, error = _event(doc, where, item, path.parent)
        cases.append(
            Case(
                name=name,
                file=file,
                position=doc.position(where),
                expect=item["expect"],
                event=event,
                error=error,
                positions=_positions(doc, (*where, "expect"), item["expect"]),
            )
        )
    return Suite(file, tuple(cases), tuple(errors))


def _positions(doc: Document, where: PathKey, expect: Mapping[str, Any]) -> dict[str, Position]:
    out = {}
    for key, value in expect.items():
        out[key] = doc.position((*where, key))
        if isinstance(value, list):
            for i in range(len(value)):
                out[f"{key}[{i}]"] = doc.position((*where, key, i))
        elif isinstance(value, dict):
            for k in value:
                out[f"{key}[{k}]"] = doc.position((*where, key, k))
    return out


def _validate(doc: Document) -> list[SourceError]:
    out = []
    for err in _VALIDATOR.iter_errors(doc.value):
        for where, message, at_key in rule_problems(err):
            pos = doc.key_position(where) if at_key else doc.position(where)
            out.append(SourceError(pos, message, json_path(where)))
    return sorted(out, key=lambda e: (e.position.line, e.position.column))


def _event(
    doc: Document, where: PathKey, item: Mapping[str, Any], base: Path
) -> tuple[FalcoEvent | None, SourceError | None]:
    """The case's event, overrides applied, validated like an HTTP body; or the error."""
    at = (*where, "event")
    ref = item["event"]
    data: Any
    if isinstance(ref, str):
        event_path = base / ref
        try:
            data = orjson.loads(event_path.read_bytes())
        except OSError as exc:
            return None, SourceError(
                doc.position(at),
                f"cannot read event file {str(event_path)!r}: {exc.strerror or exc}",
                json_path(at),
            )
        except orjson.JSONDecodeError as exc:
            return None, SourceError(
                doc.position(at), f"event file {ref!r} is not valid JSON: {exc}", json_path(at)
            )
    else:
        data = copy.deepcopy(ref)
    if isinstance(data, dict):
        if "priority" in item:
            data["priority"] = item["priority"]
        if "output_fields" in item and isinstance(data.get("output_fields"), dict):
            data["output_fields"] = {**data["output_fields"], **item["output_fields"]}
    try:
        return decode_event(orjson.dumps(data)), None
    except (EventError, TypeError) as exc:
        message = exc.message if isinstance(exc, EventError) else str(exc)
        source = f"event file {ref!r}" if isinstance(ref, str) else "the event"
        return None, SourceError(
            doc.position(at), f"{source} is not a Falco event: {message}", json_path(at)
        )
