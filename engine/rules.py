"""Rules files: the talon rules, their JSON Schema, and loading with actionable errors.

Position in the flow: rules are loaded at start-up (and on hot reload) and handed to the
matcher; per event, nothing here runs.

Every problem is reported as ``FILE:LINE:COLUMN: message (at JSON path)``: YAML syntax,
schema violations (unknown keys, wrong types, unknown actionners, bad parameters, bad
priorities, malformed ``tags``/``output_fields`` entries), duplicate rule names, unknown
notifiers.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema

from engine.contract.actionners import ActionnerRegistry
from engine.contract.notifiers import NotifierRegistry
from engine.contract.priority import Priority, parse_priority, priority_names
from engine.schema_errors import rule_message
from engine.sourcemap import Document, PathKey, Position, SourceError, json_path, load_yaml

SCHEMA_ID = "https://falco-talon.dev/schemas/rules.schema.json"

# --- the grammar of match entries, shared by the schema (for editors) and the parser ----------

FIELD_KEY = r"[A-Za-z0-9_.\-/\[\]]+"
FIELD_VALUE = r'"[^"]*"|[^,"]*'
_COND = rf"\s*{FIELD_KEY}\s*!?=\s*(?:{FIELD_VALUE})\s*"
OUTPUT_FIELDS_PATTERN = rf"^{_COND}(?:,{_COND})*$"
TAGS_PATTERN = r"^\s*[^,\s][^,]*(?:,\s*[^,\s][^,]*)*$"
COMPARATORS = (">=", "<=", ">", "<", "=")
_COND_RE = re.compile(rf"\s*({FIELD_KEY})\s*(!?=)\s*({FIELD_VALUE})\s*(?:,|$)")


def _case_insensitive(word: str) -> str:
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else re.escape(c) for c in word)


PRIORITY_PATTERN = (
    r"^\s*(>=|<=|>|<|=)?\s*("
    + "|".join(_case_insensitive(n) for n in sorted(priority_names(), key=len, reverse=True))
    + r")\s*$"
)


@dataclass(frozen=True, slots=True)
class FieldCondition:
    """``key=value`` (or ``key!=value`` when ``negate``), compared as text."""

    key: str
    value: str
    negate: bool = False

    def __str__(self) -> str:
        return f"{self.key}{'!=' if self.negate else '='}{self.value}"


@dataclass(frozen=True, slots=True)
class PriorityCriterion:
    """``>=Warning``: the comparator and the level."""

    op: str
    level: Priority

    def accepts(self, level: Priority | None) -> bool:
        if level is None:
            return False
        op = self.op
        if op == ">=":
            return level >= self.level
        if op == ">":
            return level > self.level
        if op == "<=":
            return level <= self.level
        if op == "<":
            return level < self.level
        return level == self.level

    def __str__(self) -> str:
        return f"{self.op if self.op != '=' else ''}{self.level.label}"


@dataclass(frozen=True, slots=True)
class Match:
    """A rule's ``match`` section, parsed. Empty criteria match everything."""

    rules: frozenset[str] = frozenset()
    priority: PriorityCriterion | None = None
    tags: tuple[frozenset[str], ...] = ()
    """Alternatives (OR) of tag groups that must all be present (AND)."""
    output_fields: tuple[tuple[FieldCondition, ...], ...] = ()
    """Alternatives (OR) of condition groups that must all hold (AND)."""


@dataclass(frozen=True, slots=True)
class Rule:
    """One talon rule, with ``continue``/``before`` already resolved against its actionner."""

    name: str
    match: Match
    action: str
    parameters: Mapping[str, Any]
    continue_: bool
    before: bool
    notifiers: tuple[str, ...]
    position: Position
    continue_set: bool = False
    """True when the rule itself says ``continue`` (False: the actionner's default)."""
    before_set: bool = False


@dataclass(frozen=True, slots=True)
class RuleSet:
    """All rules from all files, in order; immutable so in-flight events keep theirs."""

    rules: tuple[Rule, ...] = ()
    files: tuple[str, ...] = ()
    checksum: str = ""
    """:func:`checksum` of the files it was loaded from: a reload with the same checksum
    changes nothing; ``/healthz`` and ``falco_talon_rules_info`` show it."""


class RulesInvalid(Exception):
    """The rules files have errors; ``errors`` lists each one with its position."""

    def __init__(self, errors: Sequence[SourceError]) -> None:
        super().__init__(f"{len(errors)} error(s) in rules")
        self.errors = list(errors)

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)


# --- schema -----------------------------------------------------------------------------------


RULE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "action"],
    "properties": {
        "name": {
            "type": "string",
            "minLength": 1,
            "description": "Unique across all rules files.",
        },
        "description": {"type": "string"},
        "match": {"$ref": "#/$defs/match"},
        "action": {"$ref": "#/$defs/action"},
        "continue": {
            "type": "boolean",
            "description": "false: when this rule matches, the other remaining "
            "(non-before) matched rules are skipped. Default: the actionner's.",
        },
        "before": {
            "type": "boolean",
            "description": "true: runs in the before-actions stage, ahead of the "
            "others. Default: the actionner's.",
        },
        "notifiers": {
            "type": "array",
            "items": {"type": "string", "minLength": 1},
            "description": "Notifiers that receive this rule's action results, "
            "in addition to defaultNotifiers.",
        },
    },
}
"""One talon rule (seed syntax)."""

MATCH_SCHEMA: dict[str, Any] = {
    "type": ["object", "null"],
    "additionalProperties": False,
    "properties": {
        "rules": {
            "type": ["array", "null"],
            "items": {"type": "string", "minLength": 1},
            "description": "Falco rule names; the event's rule must be one of them.",
        },
        "priority": {
            "type": ["string", "null"],
            "pattern": PRIORITY_PATTERN,
            "errorMessage": "is not a priority: an optional comparator (>=, >, <=, "
            "<, =) and one of Debug, Informational, Notice, Warning, Error, "
            "Critical, Alert, Emergency",
        },
        "tags": {
            "type": ["array", "null"],
            "items": {
                "type": "string",
                "pattern": TAGS_PATTERN,
                "errorMessage": "is not a tag group: comma-separated non-empty tags",
            },
        },
        "output_fields": {
            "type": ["array", "null"],
            "items": {
                "type": "string",
                "pattern": OUTPUT_FIELDS_PATTERN,
                "errorMessage": "is not a condition group: comma-separated "
                "key=value or key!=value (quote a value that holds a comma)",
            },
        },
    },
}
"""A rule's ``match``: every criterion given must hold."""


def action_schema(actionners: ActionnerRegistry) -> dict[str, Any]:
    """A rule's ``action``: a known actionner, and parameters valid for that actionner."""
    names = [spec.name for spec in actionners]
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["name"],
        "properties": {
            "name": {
                "type": "string",
                "enum": names,
                "errorMessage": "is not a known actionner; known: " + ", ".join(names),
            },
            "parameters": {"type": ["object", "null"]},
        },
        "allOf": [
            {
                "if": {"properties": {"name": {"const": spec.name}}, "required": ["name"]},
                "then": {"properties": {"parameters": dict(spec.parameters)}},
            }
            for spec in actionners
        ],
    }


def rules_schema(actionners: ActionnerRegistry) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a rules file, with each actionner's parameters."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "falco-talon rules",
        "description": "A list of talon rules. Generated from the actionner registry: "
        "run `make schemas` after changing an actionner.",
        "type": ["array", "null"],
        "items": {"$ref": "#/$defs/rule"},
        "$defs": {"rule": RULE_SCHEMA, "match": MATCH_SCHEMA, "action": action_schema(actionners)},
    }


# --- parsing ----------------------------------------------------------------------------------


def parse_priority_criterion(text: str) -> PriorityCriterion | None:
    """``">= critical"`` -> ``PriorityCriterion(">=", CRITICAL)``; None if malformed."""
    s = text.strip()
    op = "="
    for candidate in COMPARATORS:
        if s.startswith(candidate):
            op, s = candidate, s[len(candidate) :]
            break
    level = parse_priority(s)
    return PriorityCriterion(op, level) if level is not None else None


def parse_tags(entry: str) -> frozenset[str]:
    return frozenset(t.strip() for t in entry.split(",") if t.strip())


def parse_output_fields(entry: str) -> tuple[FieldCondition, ...] | None:
    """A condition group, or None when the entry does not follow the grammar."""
    if not re.fullmatch(OUTPUT_FIELDS_PATTERN, entry):
        return None
    out = []
    for m in _COND_RE.finditer(entry):
        key, op, raw = m.group(1), m.group(2), m.group(3).strip()
        value = raw[1:-1] if len(raw) >= 2 and raw[0] == raw[-1] == '"' else raw
        out.append(FieldCondition(key, value, negate=(op == "!=")))
    return tuple(out)


def _parse_match(data: Mapping[str, Any] | None) -> Match:
    if not data:
        return Match()
    prio = data.get("priority")
    return Match(
        rules=frozenset(data.get("rules") or ()),
        priority=parse_priority_criterion(prio) if prio else None,
        tags=tuple(parse_tags(e) for e in data.get("tags") or ()),
        output_fields=tuple(
            g for e in data.get("output_fields") or () if (g := parse_output_fields(e)) is not None
        ),
    )


# --- loading ----------------------------------------------------------------------------------


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Files in the order given; a directory stands for its ``*.yaml``/``*.yml`` files by name
    (hidden entries such as a ConfigMap's ``..data`` are left out)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(
                sorted(
                    f
                    for f in p.iterdir()
                    if f.suffix in (".yaml", ".yml") and not f.name.startswith(".") and f.is_file()
                )
            )
        else:
            out.append(p)
    return out


Sources = list[tuple[str, str]]
"""(path, text) of each rules file, in load order."""


def read_sources(paths: Iterable[str | Path]) -> tuple[Sources, list[SourceError]]:
    """The text of every rules file ``paths`` stand for, and an error for each unreadable one."""
    sources: Sources = []
    errors: list[SourceError] = []
    for f in expand_paths(paths):
        try:
            sources.append((str(f), f.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            errors.append(SourceError(Position(str(f), 1, 1), f"cannot read rules file: {reason}"))
    return sources, errors


def checksum(sources: Sequence[tuple[str, str]]) -> str:
    """Which rules these are: sha256 over each file's path and text in load order, the first
    16 hex digits. The one definition behind ``RuleSet.checksum``, reload and ``/healthz``."""
    digest = hashlib.sha256()
    for file, text in sources:
        digest.update(file.encode() + b"\0" + text.encode() + b"\0")
    return digest.hexdigest()[:16]


class RulesLoader:
    """Validates and builds rule sets against one actionner (and optionally notifier) registry."""

    def __init__(
        self,
        actionners: ActionnerRegistry,
        notifiers: NotifierRegistry | None = None,
    ) -> None:
        self.actionners = actionners
        self.notifiers = notifiers
        self.schema = rules_schema(actionners)
        self.validator = jsonschema.Draft202012Validator(self.schema)

    def load(self, paths: Iterable[str | Path]) -> RuleSet:
        """Load every file; raise :class:`RulesInvalid` listing every error in every file."""
        sources, errors = read_sources(paths)
        return self.load_texts(sources, errors)

    def load_texts(
        self, sources: Sequence[tuple[str, str]], errors: list[SourceError] | None = None
    ) -> RuleSet:
        errors = errors if errors is not None else []
        rules: list[Rule] = []
        seen: dict[str, Position] = {}
        for file, text in sources:
            doc = load_yaml(text, file)
            errors.extend(doc.errors)
            if doc.errors:
                continue
            file_errors = self._validate(doc)
            errors.extend(file_errors)
            if file_errors:
                continue
            for i, item in enumerate(doc.value or ()):
                pos = doc.position((i, "name"))
                name = item["name"]
                if name in seen:
                    errors.append(
                        SourceError(
                            pos,
                            f"duplicate rule name {name!r}, first defined at {seen[name]}",
                            json_path((i, "name")),
                        )
                    )
                    continue
                seen[name] = pos
                rules.append(self._build(item, doc.position((i,))))
        if errors:
            raise RulesInvalid(errors)
        return RuleSet(tuple(rules), tuple(f for f, _ in sources), checksum(sources))

    def _validate(self, doc: Document) -> list[SourceError]:
        out = []
        for err in self.validator.iter_errors(doc.value):
            path: PathKey = tuple(err.absolute_path)
            key_error = "propertyNames" in err.relative_schema_path
            where = (*path, err.instance) if key_error else path
            out.append(SourceError(doc.position(where), rule_message(err), json_path(where)))
        for i, item in enumerate(doc.value or ()):
            if not isinstance(item, dict):
                continue
            for j, name in enumerate(item.get("notifiers") or ()):
                if (
                    self.notifiers is not None
                    and isinstance(name, str)
                    and name not in self.notifiers
                ):
                    known = ", ".join(s.name for s in self.notifiers) or "none installed"
                    path = (i, "notifiers", j)
                    out.append(
                        SourceError(
                            doc.position(path),
                            f"unknown notifier {name!r}; known: {known}",
                            json_path(path),
                        )
                    )
        return sorted(out, key=lambda e: (e.position.line, e.position.column))

    def _build(self, item: Mapping[str, Any], position: Position) -> Rule:
        action = item["action"]
        spec = self.actionners[action["name"]]
        params = {**spec.defaults(), **(action.get("parameters") or {})}
        return Rule(
            name=item["name"],
            match=_parse_match(item.get("match")),
            action=spec.name,
            parameters=params,
            continue_=item.get("continue", spec.continue_),
            before=item.get("before", spec.before),
            notifiers=tuple(dict.fromkeys(item.get("notifiers") or ())),
            position=position,
            continue_set="continue" in item,
            before_set="before" in item,
        )
