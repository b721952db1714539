"""The per-event state machine as a diagram, derived from its own definition.

Reads ``engine.machine.MACHINE`` (states, transitions, conditions, entry callbacks), so the
picture cannot drift from the code. ``falco-talon diagram -o mermaid|dot``.
"""

from __future__ import annotations

from engine.machine import LABELS, MACHINE, TERMINAL, Stage


def _edges() -> list[tuple[str, str, str]]:
    """(source, dest, label) for every transition, in definition order; states by Enum name."""
    out: list[tuple[str, str, str]] = []
    for trigger, event in MACHINE.events.items():
        for source, transitions in event.transitions.items():
            earlier_conditions: list[str] = []
            for t in transitions:
                parts = [trigger]
                conds = [str(c.func) for c in t.conditions]
                if conds:
                    parts.append("[" + " and ".join(LABELS.get(c, c) for c in conds) + "]")
                elif earlier_conditions:
                    parts.append(
                        "[otherwise: no "
                        + " / ".join(
                            LABELS.get(c, c).removeprefix("a ") for c in earlier_conditions
                        )
                        + "]"
                    )
                for cb in (*t.prepare, *t.before):
                    if isinstance(cb, str):
                        parts.append("/ " + LABELS.get(cb, cb))
                earlier_conditions.extend(conds)
                out.append((Stage(source).name, Stage(str(t.dest)).name, " ".join(parts)))
    return out


def _entries() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for stage in Stage:
        callbacks = [c for c in MACHINE.get_state(stage.value).on_enter if c != "record_state"]
        if callbacks:
            out[stage.name] = [LABELS.get(str(c), str(c)) for c in callbacks]
    return out


def mermaid() -> str:
    lines = ["stateDiagram-v2", f"    [*] --> {Stage.RECEIVED.name}"]
    for stage in Stage:
        lines.append(f"    {stage.name}: {stage.value}")
    for name, labels in _entries().items():
        for label in labels:
            lines.append(f"    {name}: on entry, {label}")
    for source, dest, label in _edges():
        lines.append(f"    {source} --> {dest}: {label}")
    for stage in Stage:
        if stage in TERMINAL:
            lines.append(f"    {stage.name} --> [*]")
    return "\n".join(lines) + "\n"


def dot() -> str:
    lines = [
        "digraph falco_talon_event {",
        "    rankdir=LR;",
        "    node [shape=box, style=rounded];",
    ]
    entries = _entries()
    for stage in Stage:
        label = stage.value
        if stage.name in entries:
            label += "\\n(on entry: " + "; ".join(entries[stage.name]) + ")"
        shape = ", peripheries=2" if stage in TERMINAL else ""
        lines.append(f'    {stage.name} [label="{label}"{shape}];')
    for source, dest, label in _edges():
        lines.append(f'    {source} -> {dest} [label="{label}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"
