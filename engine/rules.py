"""Rules files: the talon rules, their JSON Schema, and loading with actionable errors.

Position in the flow: rules are loaded at start-up (and on hot reload) and handed to the
matcher; per event, nothing here runs.

Two syntaxes share one file format and one engine:

* the seed syntax: ``- name:`` rules with one ``action`` and ``before``/``continue``;
* the Falco Talon v0.3 syntax: reusable ``- action:`` blocks and ``- rule:`` rules with an
  ordered ``actions`` chain. Several definitions of one v0.3 rule or action block (in one
  file or across files, in order) are merged per field: lists appended, maps merged,
  scalars replaced by the later one when it sets them (:func:`merge_value`).

Every problem is reported as ``FILE:LINE:COLUMN: message (at JSON path)``: YAML syntax,
schema violations (unknown keys, wrong types, unknown actionners, bad parameters, bad
priorities, malformed ``tags``/``output_fields`` entries), duplicate rule names, unknown
notifiers.
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema

from engine.contract.actionners import ActionnerRegistry
from engine.contract.notifiers import NotifierRegistry
from engine.contract.priority import Priority, parse_priority, priority_names
from engine.schema_errors import rule_message, rule_problems
from engine.sourcemap import (
    Document,
    PathKey,
    Position,
    SourceError,
    json_path,
    load_yaml,
    utf8_problem,
)

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
    r"^\s*$|^\s*(>=|<=|>|<|=)?\s*("
    + "|".join(_case_insensitive(n) for n in sorted(priority_names(), key=len, reverse=True))
    + r")\s*$"
)
"""A comparator and a level; empty text (the v0.3 files' ``priority: ""``) means any."""

ADDITIONAL_CONTEXTS = ("aws", "k8snode")
"""The v0.3 ``additional_contexts`` names (accepted; see README "Rules, v0.3 syntax")."""


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
    source: str | None = None
    """The event's ``source`` must be exactly this (``syscall``, ``k8s_audit``, ...)."""


@dataclass(frozen=True, slots=True)
class ChainAction:
    """One action of a v0.3 rule's ``actions`` chain, resolved: its action block (if any),
    the inline keys and every later definition merged, the actionner's defaults filled in."""

    name: str
    """The action's name (``action:``), the action block's when it reuses one."""
    actionner: str
    parameters: Mapping[str, Any]
    continue_: bool
    """After this action, go on with the rule's next one (default: the actionner's)."""
    ignore_errors: bool
    """A failure of this action does not stop the chain."""
    position: Position
    """Where the rule's ``actions`` entry stands."""
    continue_set: bool = False
    """True when the action (or its block) says ``continue``."""
    description: str = ""
    additional_contexts: tuple[str, ...] = ()


THROTTLE_TARGETS = ("pod", "workload", "node")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
DURATION_PATTERN = r"^[0-9]+(\.[0-9]+)?(ms|s|m|h)$"


def parse_duration(value: str | float) -> float:
    """``"60s"``, ``"5m"``, ``"1.5h"``, ``"250ms"`` or a number of seconds, as seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    text = value.strip()
    unit = "ms" if text.endswith("ms") else text[-1]
    return float(text[: -len(unit)]) * _DURATION_UNITS[unit]


@dataclass(frozen=True, slots=True)
class Throttle:
    """A rule's storm control: at most ``max`` actions per target per ``within`` seconds."""

    max: int
    per: str
    """``pod``, ``workload`` or ``node``: what one counter is about."""
    within: float
    """The window, in seconds."""
    within_text: str
    """The window as written (``60s``), for reasons and ``rules print``."""

    def as_data(self) -> dict[str, Any]:
        return {"max": self.max, "per": self.per, "within": self.within_text}


def _parse_throttle(raw: Mapping[str, Any] | None) -> Throttle | None:
    if not raw:
        return None
    within = raw.get("within", "60s")
    text = within if isinstance(within, str) else f"{within:g}s"
    return Throttle(
        int(raw.get("max", 1)), str(raw.get("per", "pod")), parse_duration(within), text
    )


THROTTLE_SCHEMA: dict[str, Any] = {
    "type": ["object", "null"],
    "additionalProperties": False,
    "description": "Storm control: at most `max` actions of this rule per target (`per`: "
    "pod, workload or node) within `within` (60s, 5m, ...); the rest are skipped as "
    "throttled. Counted across replicas when NATS is configured.",
    "properties": {
        "max": {"type": "integer", "minimum": 1, "description": "Actions per window."},
        "per": {"enum": list(THROTTLE_TARGETS), "description": "What one counter is about."},
        "within": {
            "type": ["string", "number"],
            "pattern": DURATION_PATTERN,
            "minimum": 0,
            "errorMessage": "is not a duration: a number with ms, s, m or h (60s, 5m)",
            "description": "The window: 60s, 5m, 1h (a number: seconds). Default 60s.",
        },
    },
}


@dataclass(frozen=True, slots=True)
class Rule:
    """One talon rule, with ``continue``/``before`` already resolved against its actionner.

    A v0.3 rule (``- rule:``) has a non-empty :attr:`chain`; then ``continue_`` is the
    rule-level ``continue`` (default true: go on with the next matched v0.3 rule),
    ``before`` is false, and ``action``/``parameters`` are the first action's."""

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
    chain: tuple[ChainAction, ...] = ()
    """The v0.3 ``actions``, in order; empty for a seed rule."""
    dry_run: bool = False
    """v0.3 ``dry_run``: the chain is planned, nothing runs."""
    description: str = ""
    throttle: Throttle | None = None
    """Storm control (``throttle:``): None, no limit."""

    @property
    def is_chain(self) -> bool:
        """A v0.3 rule (run in the ``chain`` stage) rather than a seed rule."""
        return bool(self.chain)


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
        "throttle": THROTTLE_SCHEMA,
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
        "source": {
            "type": ["string", "null"],
            "description": "The event's source must be exactly this (syscall, k8s_audit, ...).",
        },
    },
}
"""A rule's ``match``: every criterion given must hold."""

V03_BOOL: dict[str, Any] = {
    "enum": [True, False, "true", "false"],
    "errorMessage": "must be true or false (a YAML boolean, or the text 'true'/'false')",
}
"""A v0.3 flag: the original stored them as text, so both spellings are accepted."""

V03_RULE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["rule"],
    "properties": {
        "rule": {
            "type": "string",
            "minLength": 1,
            "description": "v0.3 rule name. A later definition with the same name (in this "
            "file or a later one) extends it: lists appended, scalars replaced.",
        },
        "description": {"type": "string"},
        "match": {"$ref": "#/$defs/match"},
        "continue": {
            **V03_BOOL,
            "description": "false: after this rule's actions, no further matched v0.3 rule "
            "runs. Default: true.",
        },
        "dry_run": {**V03_BOOL, "description": "true: plan the actions, run none."},
        "throttle": THROTTLE_SCHEMA,
        "notifiers": {
            "type": ["array", "null"],
            "items": {"type": "string", "minLength": 1},
            "description": "Notifiers that receive this rule's action results, "
            "in addition to defaultNotifiers.",
        },
        "actions": {
            "type": ["array", "null"],
            "items": {"$ref": "#/$defs/v03action"},
            "description": "Run in order; an entry naming an action block inherits it "
            "(its own keys win).",
        },
    },
}
"""One v0.3 rule (``- rule:``)."""


def _without_required(schema: Mapping[str, Any]) -> dict[str, Any]:
    """An actionner's parameter schema minus its top-level ``required``: a v0.3 action block
    may leave a parameter to the rules that use it (checked once resolved)."""
    return {k: v for k, v in schema.items() if k != "required"}


def v03_action_schema(actionners: ActionnerRegistry) -> dict[str, Any]:
    """A v0.3 action: an ``- action:`` block, or an entry of a rule's ``actions``."""
    names = [spec.name for spec in actionners]
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["action"],
        "properties": {
            "action": {
                "type": "string",
                "minLength": 1,
                "description": "The action's name; in a rule's actions, an action block's "
                "name to reuse it.",
            },
            "description": {"type": "string"},
            "actionner": {
                "type": "string",
                "enum": names,
                "errorMessage": "is not a known actionner; known: " + ", ".join(names),
            },
            "parameters": {"type": ["object", "null"]},
            "continue": {
                **V03_BOOL,
                "description": "false: the rule's next actions do not run. "
                "Default: the actionner's.",
            },
            "ignore_errors": {
                **V03_BOOL,
                "description": "true: a failure of this action does not stop the chain.",
            },
            "additional_contexts": {
                "type": ["array", "null"],
                "items": {
                    "type": "string",
                    "enum": list(ADDITIONAL_CONTEXTS),
                    "errorMessage": "is not a context; known: " + ", ".join(ADDITIONAL_CONTEXTS),
                },
            },
            "output": {
                "type": ["object", "null"],
                "additionalProperties": False,
                "properties": {
                    "target": {"type": "string"},
                    "parameters": {"type": ["object", "null"]},
                },
                "description": "Where an actionner's artifact goes (no outputs exist yet).",
            },
        },
        "allOf": [
            {
                "if": {
                    "properties": {"actionner": {"const": spec.name}},
                    "required": ["actionner"],
                },
                "then": {"properties": {"parameters": _without_required(spec.parameters)}},
            }
            for spec in actionners
        ],
    }


ITEM_SCHEMA: dict[str, Any] = {
    "if": {"required": ["rule"]},
    "then": {"$ref": "#/$defs/v03rule"},
    "else": {
        "if": {"required": ["action"], "properties": {"action": {"type": "string"}}},
        "then": {"$ref": "#/$defs/v03action"},
        "else": {"$ref": "#/$defs/rule"},
    },
}
"""An item of a rules file: a v0.3 rule (has ``rule``), a v0.3 action block (``action`` is
a name), else a seed rule."""


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
        "description": "A list of talon rules: seed rules (name/action), v0.3 rules "
        "(rule/actions) and v0.3 action blocks (action/actionner). Generated from the "
        "actionner registry: run `make schemas` after changing an actionner.",
        "type": ["array", "null"],
        "items": {"$ref": "#/$defs/item"},
        "$defs": {
            "item": ITEM_SCHEMA,
            "rule": RULE_SCHEMA,
            "match": MATCH_SCHEMA,
            "action": action_schema(actionners),
            "v03rule": V03_RULE_SCHEMA,
            "v03action": v03_action_schema(actionners),
        },
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
        source=data.get("source") or None,
    )


def flag(value: Any) -> bool:
    """A validated v0.3 flag (``true``, ``"false"``, ...) as a bool."""
    return value is True or value == "true"


def merge_value(earlier: Any, later: Any) -> Any:
    """How a later definition changes a value: lists appended, maps merged key by key
    (the later value wins), anything else replaced."""
    if isinstance(earlier, list) and isinstance(later, list):
        return earlier + later
    if isinstance(earlier, dict) and isinstance(later, dict):
        return {**earlier, **later}
    return later


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
            data = f.read_bytes()
        except OSError as exc:
            reason = exc.strerror or str(exc)
            errors.append(SourceError(Position(str(f), 1, 1), f"cannot read rules file: {reason}"))
            continue
        bad = utf8_problem(data, str(f))
        if bad is not None:
            errors.append(bad)
        else:
            sources.append((str(f), data.decode("utf-8")))
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
        self._parameter_validators: dict[str, jsonschema.Draft202012Validator] = {}

    def load(self, paths: Iterable[str | Path]) -> RuleSet:
        """Load every file; raise :class:`RulesInvalid` listing every error in every file."""
        sources, errors = read_sources(paths)
        return self.load_texts(sources, errors)

    def load_texts(
        self, sources: Sequence[tuple[str, str]], errors: list[SourceError] | None = None
    ) -> RuleSet:
        errors = errors if errors is not None else []
        merged = _Merge()
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
                if "rule" in item:
                    errors.extend(merged.add_rule(doc, i))
                elif isinstance(item.get("action"), str):
                    merged.add_block(doc, i)
                else:
                    errors.extend(merged.add_seed(doc, i, self._build))
        rules: list[Rule] = []
        for entry in merged.order:
            if isinstance(entry, Rule):
                rules.append(entry)
            else:
                rule = self._build_chain(merged.rules[entry], merged.blocks, errors)
                if rule is not None:
                    rules.append(rule)
        if errors:
            raise RulesInvalid(errors)
        return RuleSet(tuple(rules), tuple(f for f, _ in sources), checksum(sources))

    def _validate(self, doc: Document) -> list[SourceError]:
        out = []
        for err in self.validator.iter_errors(doc.value):
            if "propertyNames" in err.relative_schema_path:
                where = (*err.absolute_path, err.instance)
                out.append(SourceError(doc.position(where), rule_message(err), json_path(where)))
                continue
            for where, message, at_key in rule_problems(err):
                pos = doc.key_position(where) if at_key else doc.position(where)
                out.append(SourceError(pos, message, json_path(where)))
        for i, item in enumerate(doc.value if isinstance(doc.value, list) else ()):
            if not isinstance(item, dict):
                continue
            names = item.get("notifiers")
            for j, name in enumerate(names if isinstance(names, list) else ()):
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
            description=item.get("description") or "",
            throttle=_parse_throttle(item.get("throttle")),
        )

    def _build_chain(
        self, raw: _RawRule, blocks: Mapping[str, _RawAction], errors: list[SourceError]
    ) -> Rule | None:
        """A merged v0.3 rule with each action resolved against its block and checked
        against its actionner's parameters; problems go to ``errors``."""
        chain: list[ChainAction] = []
        ok = True
        if not raw.actions:
            errors.append(
                SourceError(raw.at.position, f"rule {raw.name!r} has no actions", raw.at.path)
            )
            return None
        for inline in raw.actions:
            block = blocks.get(inline.name)
            action = block.merged(inline) if block is not None else inline
            resolved = self._resolve(action, raw.name, errors)
            if resolved is None:
                ok = False
            else:
                chain.append(resolved)
        if not ok:
            return None
        return Rule(
            name=raw.name,
            match=_parse_match(raw.match),
            action=chain[0].actionner,
            parameters=chain[0].parameters,
            continue_=flag(raw.scalars.get("continue", True)),
            before=False,
            notifiers=tuple(dict.fromkeys(raw.notifiers)),
            position=raw.at.position,
            continue_set="continue" in raw.scalars,
            chain=tuple(chain),
            dry_run=flag(raw.scalars.get("dry_run", False)),
            description=str(raw.scalars.get("description") or ""),
            throttle=_parse_throttle(raw.scalars.get("throttle")),
        )

    def _resolve(
        self, action: _RawAction, rule: str, errors: list[SourceError]
    ) -> ChainAction | None:
        name = action.scalars.get("actionner")
        if not name:
            errors.append(
                SourceError(
                    action.at.position,
                    f"action {action.name!r} of rule {rule!r} has no actionner, and no action "
                    f"block is named {action.name!r}",
                    action.at.path,
                )
            )
            return None
        if action.output is not None:
            errors.append(
                SourceError(
                    action.output.position,
                    f"action {action.name!r}: outputs are not available in this version "
                    f"(output target {action.output_target!r} does not exist)",
                    action.output.path,
                )
            )
            return None
        spec = self.actionners[name]
        validator = self._parameter_validators.get(name)
        if validator is None:
            validator = jsonschema.Draft202012Validator(dict(spec.parameters))
            self._parameter_validators[name] = validator
        found = False
        for err in validator.iter_errors(action.parameters):
            for where, message, at_key in rule_problems(err):
                found = True
                origin = action.origin.get(str(where[0])) if where else None
                if origin is None:
                    at = action.at.child("parameters")
                    errors.append(
                        SourceError(at.position, f"action {action.name!r}: {message}", at.path)
                    )
                    continue
                sub = (*origin.where, *where[1:])
                pos = origin.doc.key_position(sub) if at_key else origin.doc.position(sub)
                errors.append(SourceError(pos, message, json_path(sub)))
        if found:
            return None
        return ChainAction(
            name=action.name,
            actionner=spec.name,
            parameters=copy.deepcopy({**spec.defaults(), **action.parameters}),
            continue_=flag(action.scalars.get("continue", spec.continue_)),
            ignore_errors=flag(action.scalars.get("ignore_errors", False)),
            position=action.at.position,
            continue_set="continue" in action.scalars,
            description=str(action.scalars.get("description") or ""),
            additional_contexts=tuple(dict.fromkeys(action.contexts)),
        )


# --- v0.3 merging -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _At:
    """A place in a loaded document: errors about merged items point back at it."""

    doc: Document
    where: PathKey

    @property
    def position(self) -> Position:
        return self.doc.position(self.where)

    @property
    def path(self) -> str:
        return json_path(self.where)

    def child(self, *keys: str | int) -> _At:
        return _At(self.doc, (*self.where, *keys))


@dataclass(slots=True)
class _RawAction:
    """A v0.3 action as written (a block, or a rule's ``actions`` entry), merged so far."""

    name: str
    at: _At
    scalars: dict[str, Any]
    """actionner, description, continue, ignore_errors: the later definition wins."""
    parameters: dict[str, Any]
    origin: dict[str, _At]
    """Where each parameter's (last) value was written."""
    contexts: list[str]
    output: _At | None = None
    output_target: str = ""

    @classmethod
    def read(cls, doc: Document, where: PathKey, item: Mapping[str, Any]) -> _RawAction:
        at = _At(doc, where)
        params = dict(item.get("parameters") or {})
        output = item.get("output")
        return cls(
            name=item["action"],
            at=at,
            scalars={
                k: item[k]
                for k in ("actionner", "description", "continue", "ignore_errors")
                if item.get(k) is not None
            },
            parameters=params,
            origin={k: at.child("parameters", k) for k in params},
            contexts=list(item.get("additional_contexts") or ()),
            output=at.child("output") if output is not None else None,
            output_target=str((output or {}).get("target") or ""),
        )

    def merged(self, later: _RawAction) -> _RawAction:
        """This action extended by ``later`` (a later block, or an inline entry that reuses
        this block): ``later``'s scalars win, parameters merge per :func:`merge_value`."""
        params = dict(self.parameters)
        for k, v in later.parameters.items():
            params[k] = merge_value(params[k], v) if k in params else v
        return _RawAction(
            name=self.name,
            at=later.at,
            scalars={**self.scalars, **later.scalars},
            parameters=params,
            origin={**self.origin, **later.origin},
            contexts=self.contexts + later.contexts,
            output=later.output or self.output,
            output_target=later.output_target or self.output_target,
        )


@dataclass(slots=True)
class _RawRule:
    """A v0.3 rule as written, merged with its later definitions."""

    name: str
    at: _At
    scalars: dict[str, Any] = field(default_factory=dict)
    match: dict[str, Any] = field(default_factory=dict)
    notifiers: list[str] = field(default_factory=list)
    actions: list[_RawAction] = field(default_factory=list)

    def extend(self, doc: Document, i: int, item: Mapping[str, Any]) -> None:
        for k in ("description", "continue", "dry_run", "throttle"):
            if item.get(k) is not None:
                self.scalars[k] = item[k]
        self.notifiers.extend(item.get("notifiers") or ())
        for k, v in (item.get("match") or {}).items():
            if v is None or v in ("", []):
                continue  # the original erased priority/source here; an unset key keeps them
            self.match[k] = merge_value(self.match[k], v) if k in self.match else v
        for j, entry in enumerate(item.get("actions") or ()):
            self.actions.append(_RawAction.read(doc, (i, "actions", j), entry))


@dataclass(slots=True)
class _Merge:
    """Every item of every file, in order: seed rules as built, v0.3 rules and action blocks
    by name with later definitions folded into the first (which keeps its place)."""

    order: list[Rule | str] = field(default_factory=list)
    seed: dict[str, Position] = field(default_factory=dict)
    rules: dict[str, _RawRule] = field(default_factory=dict)
    blocks: dict[str, _RawAction] = field(default_factory=dict)

    def _taken(self, doc: Document, path: PathKey, name: str, v03: bool) -> SourceError | None:
        other = (
            self.seed.get(name) if v03 else (r.at.position if (r := self.rules.get(name)) else None)
        )
        if other is None:
            return None
        kinds = ("v0.3 rule", "seed rule") if v03 else ("seed rule", "v0.3 rule")
        return SourceError(
            doc.position(path),
            f"{kinds[0]} {name!r} has the name of the {kinds[1]} defined at {other}",
            json_path(path),
        )

    def add_seed(
        self, doc: Document, i: int, build: Callable[[Mapping[str, Any], Position], Rule]
    ) -> list[SourceError]:
        item = doc.value[i]
        name = item["name"]
        pos = doc.position((i, "name"))
        if name in self.seed:
            return [
                SourceError(
                    pos,
                    f"duplicate rule name {name!r}, first defined at {self.seed[name]}",
                    json_path((i, "name")),
                )
            ]
        clash = self._taken(doc, (i, "name"), name, v03=False)
        if clash is not None:
            return [clash]
        self.seed[name] = pos
        self.order.append(build(item, doc.position((i,))))
        return []

    def add_rule(self, doc: Document, i: int) -> list[SourceError]:
        item = doc.value[i]
        name = item["rule"]
        raw = self.rules.get(name)
        if raw is None:
            clash = self._taken(doc, (i, "rule"), name, v03=True)
            if clash is not None:
                return [clash]
            raw = self.rules[name] = _RawRule(name, _At(doc, (i, "rule")))
            self.order.append(name)
        raw.extend(doc, i, item)
        return []

    def add_block(self, doc: Document, i: int) -> None:
        action = _RawAction.read(doc, (i,), doc.value[i])
        earlier = self.blocks.get(action.name)
        self.blocks[action.name] = earlier.merged(action) if earlier is not None else action


# --- printing ---------------------------------------------------------------------------------


def _match_data(match: Match) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if match.rules:
        out["rules"] = sorted(match.rules)
    if match.priority is not None:
        out["priority"] = str(match.priority)
    if match.tags:
        out["tags"] = [", ".join(sorted(group)) for group in match.tags]
    if match.output_fields:
        out["output_fields"] = [", ".join(map(str, group)) for group in match.output_fields]
    if match.source is not None:
        out["source"] = match.source
    return out


def rule_data(rule: Rule) -> dict[str, Any]:
    """A loaded rule as rules-file data (``rules print``): v0.3 rules with every action
    resolved (block, inline keys and later definitions merged, defaults filled in)."""
    if not rule.is_chain:
        out: dict[str, Any] = {"name": rule.name}
        if rule.description:
            out["description"] = rule.description
        out["match"] = _match_data(rule.match)
        out["action"] = {"name": rule.action, "parameters": dict(rule.parameters)}
        out["continue"] = rule.continue_
        out["before"] = rule.before
        if rule.notifiers:
            out["notifiers"] = list(rule.notifiers)
        if rule.throttle is not None:
            out["throttle"] = rule.throttle.as_data()
        return out
    out = {"rule": rule.name}
    if rule.description:
        out["description"] = rule.description
    out["match"] = _match_data(rule.match)
    out["continue"] = rule.continue_
    out["dry_run"] = rule.dry_run
    if rule.notifiers:
        out["notifiers"] = list(rule.notifiers)
    if rule.throttle is not None:
        out["throttle"] = rule.throttle.as_data()
    actions = []
    for a in rule.chain:
        item: dict[str, Any] = {"action": a.name}
        if a.description:
            item["description"] = a.description
        item["actionner"] = a.actionner
        item["parameters"] = dict(a.parameters)
        item["continue"] = a.continue_
        item["ignore_errors"] = a.ignore_errors
        if a.additional_contexts:
            item["additional_contexts"] = list(a.additional_contexts)
        actions.append(item)
    out["actions"] = actions
    return out
