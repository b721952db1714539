"""Which talon rules an event matches: every criterion of the rules syntax, table-driven."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from engine.contract.event import FalcoEvent
from engine.matcher import Matcher
from engine.rules import RuleSet


def one_rule(match: str) -> str:
    body = "\n".join("    " + line for line in match.strip().splitlines())
    return f"""
- name: R
  match:
{body}
  action:
    name: test:record
"""


CASES: list[tuple[str, str, dict[str, Any], bool]] = [
    # (id, match section, event changes, expected)
    ("no criteria matches everything", "{}", {}, True),
    ("rule name equal", "rules: [Terminal shell in container]", {}, True),
    ("rule name is exact, not a prefix", "rules: [Terminal shell]", {}, False),
    ("rule names are alternatives", "rules: [Other, Terminal shell in container]", {}, True),
    ("rule name is case-sensitive", "rules: [terminal shell in container]", {}, False),
    ("priority equality without comparator", "priority: Warning", {}, True),
    ("priority equality fails for another level", "priority: Error", {}, False),
    ("priority >= holds on equal", "priority: '>=Warning'", {}, True),
    ("priority >= fails below", "priority: '>=Error'", {}, False),
    ("priority > fails on equal", "priority: '>Warning'", {}, False),
    ("priority > holds above", "priority: '>Notice'", {}, True),
    ("priority <= holds", "priority: '<=Warning'", {}, True),
    ("priority < fails on equal", "priority: '<Warning'", {}, False),
    ("priority < holds below", "priority: '<Error'", {}, True),
    ("priority = explicit", "priority: '=Warning'", {}, True),
    ("priority rule side is case-insensitive", "priority: '>=warning'", {}, True),
    (
        "priority event side is case-insensitive",
        "priority: '>=Warning'",
        {"priority": "WARNING"},
        True,
    ),
    ("Info is Informational", "priority: Informational", {"priority": "Info"}, True),
    ("Info in the rule", "priority: '<=info'", {"priority": "Debug"}, True),
    ("Emergency is the top", "priority: '>Alert'", {"priority": "Emergency"}, True),
    (
        "unknown event priority never satisfies",
        "priority: '<=Emergency'",
        {"priority": "Loud"},
        False,
    ),
    (
        "unknown event priority, no criterion",
        "rules: [Terminal shell in container]",
        {"priority": "Loud"},
        True,
    ),
    ("spaces around comparator", "priority: '>= Warning'", {}, True),
    ("one tag present", "tags: [shell]", {}, True),
    ("one tag absent", "tags: [network]", {}, False),
    ("tag group is AND: all present", "tags: ['shell, container']", {}, True),
    ("tag group is AND: one missing", "tags: ['shell, network']", {}, False),
    ("tag entries are OR", "tags: ['network', 'shell, container']", {}, True),
    ("spaces around tags ignored", "tags: ['  shell ,container  ']", {}, True),
    ("tags on an event without tags", "tags: [shell]", {"tags": []}, False),
    ("string field equal", "output_fields: ['k8s.ns.name=demo']", {}, True),
    ("string field different", "output_fields: ['k8s.ns.name=prod']", {}, False),
    ("absent field never equals", "output_fields: ['k8s.deployment.name=web']", {}, False),
    ("!= holds when different", "output_fields: ['k8s.ns.name!=kube-system']", {}, True),
    ("!= fails when equal", "output_fields: ['k8s.ns.name!=demo']", {}, False),
    ("!= holds when absent", "output_fields: ['k8s.deployment.name!=web']", {}, True),
    ("!= holds when null", "output_fields: ['fd.name!=/etc/shadow']", {}, True),
    ("= fails when null", "output_fields: ['fd.name=']", {}, False),
    ("integer compared as Falco prints it", "output_fields: ['proc.tty=34816']", {}, True),
    ("integer never has a decimal point", "output_fields: ['proc.tty=34816.0']", {}, False),
    ("negative integer", "output_fields: ['user.loginuid=-1']", {}, True),
    ("nanosecond time as integer", "output_fields: ['evt.time=1795960976119485478']", {}, True),
    ("boolean true as text", "output_fields: ['evt.is_open_write=true']", {}, True),
    ("boolean is lowercase", "output_fields: ['evt.is_open_write=True']", {}, False),
    ("key with brackets", "output_fields: ['proc.aname[2]=containerd-shim']", {}, True),
    (
        "key with slashes and dashes",
        "output_fields: ['k8s.pod.label[app.kubernetes.io/part-of]=shop']",
        {"output_fields": {"k8s.pod.label[app.kubernetes.io/part-of]": "shop"}},
        True,
    ),
    (
        "value with slashes and colons",
        "output_fields: ['container.image.repository=docker.io/library/nginx']",
        {},
        True,
    ),
    (
        "field group is AND: both hold",
        "output_fields: ['k8s.ns.name=demo, proc.name=sh']",
        {},
        True,
    ),
    (
        "field group is AND: one fails",
        "output_fields: ['k8s.ns.name=demo, proc.name=bash']",
        {},
        False,
    ),
    (
        "negative alternatives are OR: both fail",
        "output_fields: ['k8s.ns.name!=demo', 'proc.name!=sh']",
        {},
        False,
    ),
    (
        "negative alternatives are OR: one holds",
        "output_fields: ['k8s.ns.name!=demo', 'proc.name!=sh']",
        {"output_fields": {"proc.name": "bash"}},
        True,
    ),
    (
        "priority with exclusions, excluded",
        "priority: '>=Notice'\noutput_fields: ['proc.name!=sh, k8s.ns.name!=x']",
        {},
        False,
    ),
    (
        "priority with exclusions, kept",
        "priority: '>=Notice'\noutput_fields: ['proc.name!=bash, k8s.ns.name!=x']",
        {},
        True,
    ),
    (
        "priority with exclusions, priority fails",
        "priority: '>=Error'\noutput_fields: ['proc.name!=bash']",
        {},
        False,
    ),
    ("field entries are OR", "output_fields: ['proc.name=bash', 'proc.name=sh']", {}, True),
    (
        "seed exclusion of namespaces",
        "output_fields: ['k8s.ns.name!=kube-system, k8s.ns.name!=falco']",
        {},
        True,
    ),
    (
        "seed exclusion hits",
        "output_fields: ['k8s.ns.name!=kube-system, k8s.ns.name!=falco']",
        {"output_fields": {"k8s.ns.name": "falco"}},
        False,
    ),
    (
        "spaces around keys and values trimmed",
        "output_fields: ['  k8s.ns.name =  demo  ']",
        {},
        True,
    ),
    (
        "quoted value may hold a comma",
        "output_fields: ['proc.cmdline=\"sh -c a,b\"']",
        {"output_fields": {"proc.cmdline": "sh -c a,b"}},
        True,
    ),
    ("quoted value is compared without quotes", "output_fields: ['proc.name=\"sh\"']", {}, True),
    (
        "all criteria are ANDed",
        "rules: [Terminal shell in container]\npriority: '>=Warning'\n"
        "tags: [shell]\noutput_fields: ['k8s.ns.name=demo']",
        {},
        True,
    ),
    (
        "one failing criterion fails the rule",
        "rules: [Terminal shell in container]\npriority: '>=Critical'\ntags: [shell]",
        {},
        False,
    ),
    ("empty lists match everything", "rules: []\ntags: []\noutput_fields: []", {}, True),
]


@pytest.mark.parametrize(
    ("match", "changes", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_a_rule_matches_exactly_when_its_criteria_hold(
    load_rules: Callable[..., RuleSet],
    make_event: Callable[..., FalcoEvent],
    match: str,
    changes: dict[str, Any],
    expected: bool,
) -> None:
    rules = load_rules(one_rule(match))
    fields = changes.pop("output_fields", None)
    event = make_event(**changes)
    if fields:
        event = make_event(**changes, output_fields={**event.output_fields, **fields})
    assert bool(Matcher(rules).match(event)) is expected


def test_matched_rules_keep_file_order_across_files(
    load_rules: Callable[..., RuleSet], make_event: Callable[..., FalcoEvent]
) -> None:
    # Each rule is found through a different index; the result must still be in file order.
    rules = load_rules(
        """
        - name: by tag
          match: {tags: [shell]}
          action: {name: test:record}
        - name: by field
          match: {output_fields: ['k8s.ns.name=demo']}
          action: {name: test:record}
        """,
        """
        - name: by priority only
          match: {priority: '>=Notice'}
          action: {name: test:record}
        - name: by name
          match: {rules: [Terminal shell in container]}
          action: {name: test:record}
        - name: not matching
          match: {rules: [Other]}
          action: {name: test:record}
        - name: negative field only
          match: {output_fields: ['k8s.ns.name!=kube-system']}
          action: {name: test:record}
        """,
    )
    matched = [r.name for r in Matcher(rules).match(make_event())]
    assert matched == ["by tag", "by field", "by priority only", "by name", "negative field only"]


def test_an_indexed_rule_still_checks_its_other_criteria(
    load_rules: Callable[..., RuleSet], make_event: Callable[..., FalcoEvent]
) -> None:
    rules = load_rules(
        """
        - name: field anchor but wrong priority
          match: {output_fields: ['k8s.ns.name=demo'], priority: Critical}
          action: {name: test:record}
        - name: two alternatives, second one holds
          match:
            output_fields: ['k8s.ns.name=prod, proc.name=sh', 'proc.name=sh, k8s.ns.name=demo']
          action: {name: test:record}
        - name: tag anchor but field fails
          match: {tags: [shell], output_fields: ['proc.name=bash']}
          action: {name: test:record}
        """
    )
    assert [r.name for r in Matcher(rules).match(make_event())] == [
        "two alternatives, second one holds"
    ]
