"""YAML documents loaded with a map from JSON path to source position.

Used by the rules and config loaders so that every error can name ``FILE:LINE:COLUMN``
and the JSON path of the offending item. Pure data, no engine machinery.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

PathKey = tuple[str | int, ...]

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True)
class Position:
    """Where something stands in a source file; line and column are 1-based."""

    file: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


@dataclass(frozen=True, slots=True)
class SourceError:
    """One problem found in a source file, printed as ``FILE:LINE:COLUMN: message (at $.path)``."""

    position: Position
    message: str
    path: str = "$"

    def __str__(self) -> str:
        return f"{self.position}: {self.message} (at {self.path})"


@dataclass(slots=True)
class Document:
    """A YAML document's value and where each of its parts stands."""

    file: str
    value: Any
    positions: dict[PathKey, Position] = field(default_factory=dict)
    """Where each value starts, by JSON path."""
    key_positions: dict[PathKey, Position] = field(default_factory=dict)
    """Where each mapping key stands, by the JSON path of its value."""
    errors: list[SourceError] = field(default_factory=list)

    def position(self, path: PathKey) -> Position:
        """The position of ``path``, or of its nearest ancestor that has one."""
        for end in range(len(path), -1, -1):
            pos = self.positions.get(tuple(path[:end]))
            if pos is not None:
                return pos
        return Position(self.file, 1, 1)

    def key_position(self, path: PathKey) -> Position:
        """The position of the key naming ``path`` (for "unknown key" errors), else of the
        value or its nearest ancestor."""
        return self.key_positions.get(tuple(path)) or self.position(path)


def json_path(path: PathKey) -> str:
    """``("rules", 0, "action")`` -> ``$.rules[0].action``."""
    out = "$"
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _IDENT.fullmatch(part):
            out += f".{part}"
        else:
            out += f"[{part!r}]"
    return out


class _Loader(yaml.SafeLoader):
    pass


MAX_DEPTH = 200
"""Deepest nesting of mappings and lists accepted (PyYAML composes recursively)."""

MAX_NODES_PER_CHAR = 20
"""How many values a document may expand to, per character of its text (plus
``MIN_NODE_BUDGET``): aliases can make a few lines stand for billions of values."""

MIN_NODE_BUDGET = 20_000


def utf8_problem(data: bytes, file: str) -> SourceError | None:
    """Where ``data`` stops being UTF-8, or None if it is UTF-8."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[: exc.start]
        line = before.count(b"\n") + 1
        column = exc.start - (before.rfind(b"\n") + 1) + 1
        return SourceError(
            Position(file, line, column), f"not valid UTF-8 (byte 0x{data[exc.start]:02x})"
        )
    return None


class _TooBig(Exception):
    """Building stopped: ``message`` at ``node``."""

    def __init__(self, node: yaml.Node, message: str) -> None:
        super().__init__(message)
        self.node, self.message = node, message


def _depth_problem(text: str) -> tuple[Any, str] | None:
    """Walk the parser's events (iterative, no recursion) and stop at the first collection
    nested deeper than ``MAX_DEPTH``."""
    depth = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                return event.start_mark, f"nested deeper than {MAX_DEPTH} levels"
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    return None


def _mark_error(file: str, exc: yaml.MarkedYAMLError) -> SourceError:
    mark = exc.problem_mark or exc.context_mark
    line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
    problem = exc.problem or "invalid YAML"
    ctx = f" {exc.context}" if exc.context else ""
    return SourceError(Position(file, line, col), f"YAML syntax error: {problem}{ctx}")


def load_yaml(text: str, file: str) -> Document:
    """Parse ``text``; YAML syntax errors, duplicate keys, alias bombs, recursive aliases,
    over-deep nesting and values that cannot be built land in ``Document.errors``."""
    doc = Document(file=file, value=None)
    try:
        problem = _depth_problem(text)
        if problem is not None:
            mark, message = problem
            line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
            doc.errors.append(SourceError(Position(file, line, col), f"YAML error: {message}"))
            return doc
        node = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        doc.errors.append(_mark_error(file, exc))
        return doc
    except yaml.YAMLError as exc:
        doc.errors.append(SourceError(Position(file, 1, 1), f"YAML error: {exc}"))
        return doc
    if node is None:
        return doc
    builder = _Builder(doc, _Loader(text), MIN_NODE_BUDGET + MAX_NODES_PER_CHAR * len(text))
    try:
        doc.value = builder.build(node, ())
    except _TooBig as exc:
        mark = exc.node.start_mark
        doc.errors.append(
            SourceError(
                Position(file, mark.line + 1, mark.column + 1), f"YAML error: {exc.message}"
            )
        )
        doc.value = None
    except yaml.MarkedYAMLError as exc:  # a merge key (<<) that is not a mapping, ...
        doc.errors.append(_mark_error(file, exc))
        doc.value = None
    return doc


class _Builder:
    """Builds a composed node graph into plain values, recording positions; bounded in
    size (aliases), acyclic, and every scalar constructed or reported."""

    def __init__(self, doc: Document, constructor: yaml.SafeLoader, budget: int) -> None:
        self.doc, self.constructor, self.budget = doc, constructor, budget
        self.open: set[int] = set()

    def scalar(self, node: yaml.Node) -> Any:
        try:
            value = self.constructor.construct_object(node, deep=True)
        except Exception as exc:
            # a bad !!timestamp / !!binary, an unknown tag, an integer of 5,000 digits, ...:
            # PyYAML's constructors raise all sorts (an empty !!timestamp: AttributeError).
            reason = getattr(exc, "problem", None) or (str(exc).splitlines() or [""])[0]
            reason = reason or f"not a valid {node.tag.rsplit(':', 1)[-1]}"
            raise _TooBig(node, f"cannot read this value: {reason}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise _TooBig(node, f"{node.value!r} is not a finite number")
        if isinstance(value, bytes):
            raise _TooBig(node, "binary values (!!binary) are not accepted")
        return value

    def build(self, node: yaml.Node, path: PathKey) -> Any:
        doc = self.doc
        self.budget -= 1
        if self.budget < 0:
            raise _TooBig(node, "aliases expand to too many values (a YAML alias bomb?)")
        doc.positions[path] = Position(
            doc.file, node.start_mark.line + 1, node.start_mark.column + 1
        )
        if not isinstance(node, yaml.CollectionNode):
            return self.scalar(node)
        if id(node) in self.open:
            raise _TooBig(node, "an alias refers to a value that contains it (recursive alias)")
        self.open.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, path)
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        finally:
            self.open.discard(id(node))

    def _mapping(self, node: yaml.MappingNode, path: PathKey) -> dict[str, Any]:
        doc = self.doc
        self.constructor.flatten_mapping(node)
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise _TooBig(key_node, "a key must be a plain value, not a list or mapping")
            key = self.scalar(key_node)
            if not isinstance(key, str):
                key = str(key)
            child = (*path, key)
            where = Position(doc.file, key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            doc.key_positions[child] = where
            if key in out:
                doc.errors.append(SourceError(where, f"duplicate key {key!r}", json_path(child)))
            out[key] = self.build(value_node, child)
        return out
