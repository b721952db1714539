"""A registry of plug-in declarations by name: the base of the actionner and notifier
registries.

Part of the engine's contract with plug-ins (``engine.contract.actionners`` and
``engine.contract.notifiers`` build on it); it holds declarations, never runs them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, Protocol, Self, TypeVar


class Named(Protocol):
    @property
    def name(self) -> str: ...


S = TypeVar("S", bound=Named)
F = TypeVar("F", bound=Callable[..., Any])

EMPTY_OBJECT_SCHEMA: Mapping[str, Any] = {
    "type": "object",
    "properties": {},
    "additionalProperties": False,
}
"""The schema of a plug-in that takes no parameters or settings."""


def schema_defaults(schema: Mapping[str, Any]) -> dict[str, Any]:
    """The ``default`` of every top-level property of an object schema: the one place a
    plug-in's defaults are read (actionner parameters and notifier settings alike)."""
    props: Mapping[str, Any] = schema.get("properties", {})
    return {k: v["default"] for k, v in props.items() if "default" in v}


class Registry(Generic[S]):
    """Declarations by name, iterated in name order. ``kind`` names them in errors."""

    kind = "plug-in"

    def __init__(self, specs: tuple[S, ...] = ()) -> None:
        self._specs: dict[str, S] = {}
        for spec in specs:
            self.add(spec)

    def validate(self, spec: S) -> None:
        """Refuse a malformed declaration (subclasses add their rules)."""

    def add(self, spec: S) -> S:
        self.validate(spec)
        if spec.name in self._specs:
            raise ValueError(f"{self.kind} {spec.name!r} is registered twice")
        self._specs[spec.name] = spec
        return spec

    def get(self, name: str) -> S | None:
        return self._specs.get(name)

    def __getitem__(self, name: str) -> S:
        return self._specs[name]

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __iter__(self) -> Iterator[S]:
        return iter(sorted(self._specs.values(), key=lambda s: s.name))

    def __len__(self) -> int:
        return len(self._specs)

    def register(self, declare: Callable[[F], S]) -> Callable[[F], F]:
        """A decorator that adds ``declare(func)`` to this registry and returns ``func``
        unchanged: what the ``@actionner(...)`` and ``@notifier(...)`` decorators are."""

        def decorate(func: F) -> F:
            self.add(declare(func))
            return func

        return decorate

    def copy(self) -> Self:
        """A registry of the same declarations, to add test-only ones to."""
        return type(self)(tuple(self._specs.values()))
