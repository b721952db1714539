"""The matcher: which talon rules an event matches, in rules-file order.

Position in the flow: HTTP -> event model -> **matcher** -> state machine -> ...

Per-event hot path. Rules are compiled once into an index so that an event is checked only
against rules that can possibly match it:

* a rule naming Falco rules is found by the event's rule name;
* otherwise, a rule whose every ``output_fields`` alternative has a positive ``key=value``
  condition is found by the event's value of one such key;
* otherwise, a rule whose every ``tags`` alternative is non-empty is found by one of its tags;
* the rest (priority-only, ``!=``-only, or no criteria) are tabled per event priority; when
  such a rule's only other criterion is one group of ``key!=value`` conditions, those go in
  an exclusion table looked up by the event's values instead of being checked one by one.

An anchor is picked where its bucket is smallest so far, so a tag or field shared by many
rules (``container``) does not turn the index into a list. Candidates are then checked
against their remaining criteria and returned sorted by rule order.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable

from engine.contract.event import FalcoEvent
from engine.contract.priority import Priority
from engine.rules import FieldCondition, Match, Rule, RuleSet

log = logging.getLogger("falco_talon.matcher")

Check = Callable[[FalcoEvent], bool]


def _group_holds(group: tuple[FieldCondition, ...], event: FalcoEvent) -> bool:
    for cond in group:
        actual = event.field(cond.key)
        if cond.negate:
            if actual is not None and actual == cond.value:
                return False
        elif actual != cond.value:
            return False
    return True


def compile_match(match: Match, *, skip_priority: bool = False, skip_rules: bool = False) -> Check:
    """A function telling whether an event satisfies ``match``; criteria the index already
    guarantees can be left out."""
    names = match.rules
    prio = None if skip_priority else match.priority
    tags = match.tags
    fields = match.output_fields
    source = match.source

    def check(event: FalcoEvent) -> bool:
        if names and not skip_rules and event.rule not in names:
            return False
        if source is not None and event.source != source:
            return False
        if prio is not None and not prio.accepts(event.level):
            return False
        if tags:
            present = event.tag_set
            if not any(group <= present for group in tags):
                return False
        if fields:
            return any(_group_holds(group, event) for group in fields)
        return True

    return check


def _always(event: FalcoEvent) -> bool:
    return True


class Matcher:
    """Matches events against one :class:`RuleSet`. Build one per rule set (cheap, done on load)."""

    def __init__(self, ruleset: RuleSet) -> None:
        self.ruleset = ruleset
        self._by_name: dict[str, list[int]] = defaultdict(list)
        self._by_field: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
        self._by_tag: dict[str, list[int]] = defaultdict(list)
        self._by_level: dict[Priority | None, list[int]] = {lvl: [] for lvl in Priority}
        self._by_level[None] = []
        self._exclude: dict[str, dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
        self._checks: list[Check] = []
        for i, rule in enumerate(ruleset.rules):
            self._index(i, rule)
        # Plain dicts from here on: a lookup miss must not insert.
        self._by_name = dict(self._by_name)
        self._by_field = {k: dict(v) for k, v in self._by_field.items()}
        self._by_tag = dict(self._by_tag)
        self._exclude = {k: dict(v) for k, v in self._exclude.items()}

    def _index(self, i: int, rule: Rule) -> None:
        m = rule.match
        if m.rules:
            for name in m.rules:
                self._by_name[name].append(i)
            self._checks.append(self._compile(m, skip_rules=True))
            return
        if m.output_fields and all(any(not c.negate for c in g) for g in m.output_fields):
            for group in m.output_fields:
                anchor = min(
                    (c for c in group if not c.negate),
                    key=lambda c: len(self._by_field.get(c.key, {}).get(c.value, ())),
                )
                self._by_field[anchor.key][anchor.value].append(i)
            self._checks.append(self._compile(m))
            return
        if m.tags and all(m.tags):
            for tag_group in m.tags:
                rarest = min(sorted(tag_group), key=lambda t: len(self._by_tag.get(t, ())))
                self._by_tag[rarest].append(i)
            self._checks.append(self._compile(m))
            return
        for lvl in self._by_level:
            if m.priority is None or m.priority.accepts(lvl):
                self._by_level[lvl].append(i)
        if not m.tags and m.source is None and len(m.output_fields) == 1:
            # Only "key!=value" conditions are left: the rule holds unless the event has one
            # of those values, which the exclusion table answers in one lookup per key.
            for cond in m.output_fields[0]:
                self._exclude[cond.key][cond.value].add(i)
            self._checks.append(_always)
            return
        self._checks.append(self._compile(m, skip_priority=True))

    @staticmethod
    def _compile(m: Match, **skip: bool) -> Check:
        rest = Match(
            rules=frozenset() if skip.get("skip_rules") else m.rules,
            priority=None if skip.get("skip_priority") else m.priority,
            tags=m.tags,
            output_fields=m.output_fields,
            source=m.source,
        )
        if rest == Match():
            return _always
        return compile_match(rest)

    def match(self, event: FalcoEvent) -> list[Rule]:
        """The rules ``event`` matches, in rule order."""
        candidates: list[int] = []
        named = self._by_name.get(event.rule)
        if named:
            candidates.extend(named)
        for key, table in self._by_field.items():
            value = event.field(key)
            if value is not None:
                hit = table.get(value)
                if hit:
                    candidates.extend(hit)
        if self._by_tag:
            for tag in event.tag_set:
                hit = self._by_tag.get(tag)
                if hit:
                    candidates.extend(hit)
        candidates.extend(self._by_level[event.level])
        if not candidates:
            return []
        excluded: set[int] = set()
        for key, exclusions in self._exclude.items():
            value = event.field(key)
            if value is not None:
                gone = exclusions.get(value)
                if gone:
                    excluded |= gone
        rules = self.ruleset.rules
        checks = self._checks
        order = sorted(set(candidates).difference(excluded) if excluded else set(candidates))
        return [rules[i] for i in order if checks[i](event)]
