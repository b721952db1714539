"""YAML documents loaded with a map from JSON path to source position.

Used by the rules and config loaders so that every error can name ``FILE:LINE:COLUMN``
and the JSON path of the offending item. Pure data, no engine machinery.
"""

from __future__ import annotations

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


def load_yaml(text: str, file: str) -> Document:
    """Parse ``text``; YAML syntax errors and duplicate keys land in ``Document.errors``."""
    doc = Document(file=file, value=None)
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = exc.problem or "invalid YAML"
        ctx = f" {exc.context}" if exc.context else ""
        doc.errors.append(
            SourceError(Position(file, line, col), f"YAML syntax error: {problem}{ctx}")
        )
        return doc
    except yaml.YAMLError as exc:
        doc.errors.append(SourceError(Position(file, 1, 1), f"YAML error: {exc}"))
        return doc
    if node is None:
        return doc
    constructor = _Loader(text)
    doc.value = _build(node, (), doc, constructor)
    return doc


def _build(node: yaml.Node, path: PathKey, doc: Document, constructor: yaml.SafeLoader) -> Any:
    doc.positions[path] = Position(doc.file, node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        constructor.flatten_mapping(node)
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = constructor.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                key = str(key)
            child = (*path, key)
            doc.key_positions[child] = Position(
                doc.file, key_node.start_mark.line + 1, key_node.start_mark.column + 1
            )
            if key in out:
                doc.errors.append(
                    SourceError(
                        Position(
                            doc.file, key_node.start_mark.line + 1, key_node.start_mark.column + 1
                        ),
                        f"duplicate key {key!r}",
                        json_path(child),
                    )
                )
            out[key] = _build(value_node, child, doc, constructor)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, (*path, i), doc, constructor) for i, item in enumerate(node.value)]
    return constructor.construct_object(node, deep=True)
