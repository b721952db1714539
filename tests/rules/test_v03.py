"""Falco Talon v0.3 rules files: loading, merging across files, and ``check`` errors.

Real: files on disk, the loader with its positions and JSON Schema, the CLI. Actionners are
the built-in declarations plus the test-only ``test:*`` ones (``tests/recording.py``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from engine.cli import cli
from engine.contract.actionners import ActionnerRegistry
from engine.contract.event import FalcoEvent
from engine.matcher import Matcher
from engine.rules import Rule, RuleSet, RulesInvalid, RulesLoader

EXAMPLES = ("examples/v03/rules.yaml", "examples/v03/rules-override.yaml")


def cli_run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def by_name(rules: RuleSet) -> dict[str, Rule]:
    return {r.name: r for r in rules.rules}


def test_the_v03_examples_check_with_both_commands() -> None:
    args = [a for f in EXAMPLES for a in ("-r", f)]
    assert cli_run("check", *args) == (0, "5 rule(s) in 2 file(s): valid\n")
    assert cli_run("rules", "check", *args) == (0, "5 rule(s) in 2 file(s): valid\n")


def test_blocks_are_reused_overridden_inline_and_extended_by_a_later_file() -> None:
    rules = by_name(RulesLoader(*_plugins()).load(EXAMPLES))
    shell = rules["Shell in a container"]
    assert [(a.name, a.actionner) for a in shell.chain] == [
        ("Mark suspicious", "kubernetes:label"),
        ("Cut egress", "kubernetes:networkpolicy"),
        ("Collect forensics", "kubernetes:exec"),
        ("Kill pod", "kubernetes:terminate"),
    ]
    # the later file extends the block's labels map; the inline override adds a parameter
    assert shell.chain[0].parameters["labels"] == {"suspicious": "true", "quarantine": "yes"}
    assert shell.chain[3].parameters["grace_period_seconds"] == 5
    assert shell.chain[3].parameters["ignore_daemonsets"] is True
    assert shell.chain[2].ignore_errors is True
    # the later definition of the rule: continue replaced, output_fields appended, and the
    # priority it does not repeat is kept (the original erased it)
    assert shell.continue_ is False
    assert str(shell.match.priority) == ">=Warning"
    assert [str(c) for g in shell.match.output_fields for c in g] == ["k8s.ns.name!=kube-system"]
    pkg = rules["Package manager in a container"]
    assert pkg.chain[0].parameters["labels"] == {
        "suspicious": "true",
        "quarantine": "yes",
        "package-manager": "true",
    }
    assert (pkg.chain[1].continue_, pkg.chain[1].continue_set) == (False, True)
    assert rules["Critical syscall events"].dry_run is True
    assert rules["Critical syscall events"].match.source == "syscall"
    # merged rules keep the place of their first definition; new ones follow in file order
    assert list(rules) == [
        "Shell in a container",
        "Package manager in a container",
        "Critical syscall events",
        "Sensitive file read",
        "Seed label for shells",
    ]


def _plugins() -> tuple[ActionnerRegistry, None]:
    from engine.plugins import load_plugins

    return load_plugins()[0], None


def test_every_late_rule_merges_whatever_the_number_of_action_blocks(
    load_rules: Callable[..., RuleSet],
) -> None:
    block = "- action: only block\n  actionner: test:record\n"
    rules = [
        f"- rule: r{i}\n  match: {{rules: [x]}}\n  actions: [{{action: only block}}]\n"
        for i in range(3)
    ]
    overrides = [f"- rule: r{i}\n  continue: false\n  notifiers: []\n" for i in range(3)]
    loaded = load_rules(block + "".join(rules), "".join(overrides))
    assert [(r.name, r.continue_, len(r.chain)) for r in loaded.rules] == [
        ("r0", False, 1),
        ("r1", False, 1),
        ("r2", False, 1),
    ]


def test_a_later_definition_appends_actions_and_a_later_block_replaces_scalars(
    load_rules: Callable[..., RuleSet],
) -> None:
    loaded = load_rules(
        "- action: b\n  actionner: test:record\n  continue: true\n"
        "- rule: r\n  actions: [{action: b}]\n",
        "- action: b\n  continue: 'false'\n  parameters: {note: later}\n"
        "- rule: r\n  actions: [{action: c, actionner: test:stop}]\n",
    )
    [rule] = loaded.rules
    assert [(a.name, a.continue_, dict(a.parameters)) for a in rule.chain] == [
        ("b", False, {"note": "later"}),
        ("c", False, {}),
    ]


def test_v03_flags_accept_booleans_and_their_text(load_rules: Callable[..., RuleSet]) -> None:
    loaded = load_rules(
        "- rule: r\n  continue: 'false'\n  dry_run: 'true'\n  actions:\n"
        "    - {action: a, actionner: test:record, continue: false, ignore_errors: 'true'}\n"
        "    - {action: b, actionner: test:record, continue: 'true', ignore_errors: false}\n"
    )
    [rule] = loaded.rules
    assert (rule.continue_, rule.dry_run) == (False, True)
    assert [(a.continue_, a.ignore_errors) for a in rule.chain] == [(False, True), (True, False)]


def test_a_source_criterion_matches_the_event_source_exactly(
    load_rules: Callable[..., RuleSet], make_event: Callable[..., FalcoEvent]
) -> None:
    loaded = load_rules(
        "- rule: audit\n  match: {source: k8s_audit}\n  actions: [{action: a, actionner: "
        "test:record}]\n- rule: sys\n  match: {source: syscall, priority: ''}\n"
        "  actions: [{action: a, actionner: test:record}]\n"
    )
    matcher = Matcher(loaded)
    assert [r.name for r in matcher.match(make_event())] == ["sys"]
    assert [r.name for r in matcher.match(make_event(source="k8s_audit"))] == ["audit"]


BAD: list[tuple[str, list[str], list[str]]] = [
    (
        "a flag that is neither true nor false",
        ["- rule: r\n  dry_run: 'yes'\n  actions: [{action: a, actionner: test:record}]\n"],
        [
            "{0}:2:12: 'yes' must be true or false (a YAML boolean, or the text "
            "'true'/'false') (at $[0].dry_run)"
        ],
    ),
    (
        "True is not a v0.3 flag either",
        ["- action: a\n  actionner: test:record\n  ignore_errors: 'True'\n"],
        [
            "{0}:3:18: 'True' must be true or false (a YAML boolean, or the text "
            "'true'/'false') (at $[0].ignore_errors)"
        ],
    ),
    (
        "unknown key in a v0.3 rule, at the key's line",
        [
            "- rule: r\n  match:\n    rules: [x]\n  dryrun: true\n"
            "  actions: [{action: a, actionner: test:record}]\n"
        ],
        [
            "{0}:4:3: unknown key 'dryrun'; allowed: actions, continue, description, "
            "dry_run, match, notifiers, rule, throttle (at $[0].dryrun)"
        ],
    ),
    (
        "unknown key in an inline action",
        [
            "- rule: r\n  actions:\n    - action: a\n      actionner: test:record\n"
            "      ignore_error: true\n"
        ],
        [
            "{0}:5:7: unknown key 'ignore_error'; allowed: action, actionner, "
            "additional_contexts, continue, description, ignore_errors, output, parameters "
            "(at $[0].actions[0].ignore_error)"
        ],
    ),
    (
        "unknown actionner in a block",
        ["- action: a\n  actionner: kubernetes:tcpdump\n"],
        ["{0}:2:14: 'kubernetes:tcpdump' is not a known actionner; known: "],
    ),
    (
        "unknown parameter in a block, reported where it is written",
        [
            "- action: kill\n  actionner: kubernetes:terminate\n  parameters:\n"
            "    grace_period: 3\n"
            "- rule: r\n  actions: [{action: kill}]\n"
        ],
        [
            "{0}:4:5: unknown key 'grace_period'; allowed: gracePeriodSeconds, "
            "grace_period_seconds, ignoreDaemonsets, ignoreStatefulsets, ignore_daemonsets, "
            "ignore_standalone_pods, ignore_statefulsets, minHealthyReplicas, "
            "min_healthy_replicas (at $[0].parameters.grace_period)"
        ],
    ),
    (
        "a parameter from a later file that the actionner does not take",
        [
            "- action: rec\n  actionner: test:record\n- rule: r\n  actions: [{action: rec}]\n",
            "- action: rec\n  parameters:\n    nope: 1\n",
        ],
        ["{1}:3:5: unknown key 'nope'; allowed: note (at $[0].parameters.nope)"],
    ),
    (
        "a required parameter nobody gives",
        [
            "- action: x\n  actionner: kubernetes:exec\n"
            "- rule: r\n  actions:\n    - action: x\n      parameters: {shell: /bin/bash}\n"
        ],
        [
            "{0}:6:19: action 'x': 'command' is required (at $[1].actions[0].parameters)",
        ],
    ),
    (
        "an action with no block and no actionner",
        ["- rule: r\n  actions:\n    - action: missing block\n"],
        [
            "{0}:3:7: action 'missing block' of rule 'r' has no actionner, and no action "
            "block is named 'missing block' (at $[0].actions[0])"
        ],
    ),
    (
        "an output (no outputs exist)",
        [
            "- rule: r\n  actions:\n    - action: a\n      actionner: test:record\n"
            "      output: {target: minio:s3, parameters: {bucket: b}}\n"
        ],
        [
            "{0}:5:15: action 'a': outputs are not available in this version (output target "
            "'minio:s3' does not exist) (at $[0].actions[0].output)"
        ],
    ),
    (
        "an unknown additional context",
        [
            "- rule: r\n  actions:\n    - action: a\n      actionner: test:record\n"
            "      additional_contexts: [aws, gcp]\n"
        ],
        [
            "{0}:5:34: 'gcp' is not a context; known: aws, k8snode "
            "(at $[0].actions[0].additional_contexts[1])"
        ],
    ),
    (
        "a rule without actions",
        ["- rule: r\n  match: {rules: [x]}\n"],
        ["{0}:1:9: rule 'r' has no actions (at $[0].rule)"],
    ),
    (
        "a seed rule and a v0.3 rule with one name",
        [
            "- name: r\n  action: {name: test:record}\n",
            "- rule: r\n  actions: [{action: a, actionner: test:record}]\n",
        ],
        ["{1}:1:9: v0.3 rule 'r' has the name of the seed rule defined at {0}:1:9 (at $[0].rule)"],
    ),
]


@pytest.mark.parametrize(("texts", "expected"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_check_names_file_line_column_and_path_of_each_v03_error(
    registry: ActionnerRegistry,
    write_rules: Callable[..., Path],
    texts: list[str],
    expected: list[str],
) -> None:
    paths = [write_rules(t) for t in texts]
    with pytest.raises(RulesInvalid) as info:
        RulesLoader(registry).load(paths)
    got = [str(e) for e in info.value.errors]
    want = [e.format(*paths) for e in expected]
    assert len(got) == len(want), got
    for g, w in zip(got, want, strict=True):
        assert g.startswith(w) if w.endswith("known: ") else g == w


def test_rules_print_shows_the_merged_rules_as_yaml() -> None:
    code, out = cli_run("rules", "print", *[a for f in EXAMPLES for a in ("-r", f)])
    assert code == 0
    assert out.startswith("---\n")
    data = yaml.safe_load(out)
    shell = next(d for d in data if d.get("rule") == "Shell in a container")
    assert shell["continue"] is False
    assert shell["match"]["priority"] == ">=Warning"
    assert [a["action"] for a in shell["actions"]] == [
        "Mark suspicious",
        "Cut egress",
        "Collect forensics",
        "Kill pod",
    ]
    assert shell["actions"][0]["parameters"]["labels"] == {
        "suspicious": "true",
        "quarantine": "yes",
    }
    assert {"name": "Seed label for shells"}.items() <= data[-1].items()


def test_the_schema_describes_both_syntaxes() -> None:
    schema = json.loads(Path("schemas/rules.schema.json").read_text())
    defs = schema["$defs"]
    assert {"rule", "action", "v03rule", "v03action", "match"} <= set(defs)
    assert "source" in defs["match"]["properties"]
    assert set(defs["v03action"]["properties"]) >= {
        "actionner",
        "parameters",
        "continue",
        "ignore_errors",
        "additional_contexts",
        "output",
    }


EXPLAIN = [
    (
        "event-shell.json",
        [
            ("actions", "Seed label for shells", "kubernetes:labelize", None, "planned", ""),
            (
                "chain",
                "Shell in a container",
                "kubernetes:label",
                "Mark suspicious",
                "planned",
                "",
            ),
            (
                "chain",
                "Shell in a container",
                "kubernetes:networkpolicy",
                "Cut egress",
                "planned",
                "",
            ),
            (
                "chain",
                "Shell in a container",
                "kubernetes:exec",
                "Collect forensics",
                "planned",
                "",
            ),
            ("chain", "Shell in a container", "kubernetes:terminate", "Kill pod", "planned", ""),
            (
                "chain",
                "Critical syscall events",
                "kubernetes:terminate",
                "Kill pod",
                "skipped",
                "rule 'Shell in a container' has continue: false",
            ),
        ],
    ),
    (
        "event-package.json",
        [
            (
                "chain",
                "Package manager in a container",
                "kubernetes:label",
                "Mark suspicious",
                "planned",
                "",
            ),
            (
                "chain",
                "Package manager in a container",
                "kubernetes:networkpolicy",
                "Cut egress",
                "planned",
                "",
            ),
            (
                "chain",
                "Package manager in a container",
                "kubernetes:terminate",
                "Kill pod",
                "skipped",
                "chain stopped: action 'Cut egress' has continue: false",
            ),
            (
                "chain",
                "Critical syscall events",
                "kubernetes:terminate",
                "Kill pod",
                "skipped",
                "rule 'Package manager in a container' has continue: false",
            ),
        ],
    ),
    (
        "event-sensitive.json",
        [
            (
                "chain",
                "Critical syscall events",
                "kubernetes:terminate",
                "Kill pod",
                "planned",
                "dry run",
            ),
            (
                "chain",
                "Sensitive file read",
                "kubernetes:exec",
                "Dump process status",
                "planned",
                "",
            ),
            (
                "chain",
                "Sensitive file read",
                "kubernetes:label",
                "Mark suspicious",
                "planned",
                "",
            ),
        ],
    ),
]


@pytest.mark.parametrize(("event", "expected"), EXPLAIN, ids=[e[0] for e in EXPLAIN])
def test_explain_shows_every_step_of_the_v03_chains(
    event: str, expected: list[tuple[str, ...]]
) -> None:
    code, out = cli_run(
        "explain",
        *[a for f in EXAMPLES for a in ("-r", f)],
        "--event",
        f"examples/v03/{event}",
        "-o",
        "json",
    )
    assert code == 0, out
    data = json.loads(out)
    assert [
        (s["stage"], s["rule"], s["action"], s.get("action_name"), s["outcome"], s["reason"])
        for s in data["steps"]
    ] == expected


def test_rbac_covers_every_actionner_of_a_v03_chain() -> None:
    code, out = cli_run("rbac", "-r", "examples/v03/rules.yaml", "-o", "json")
    assert code == 0, out
    resources = {r for rule in json.loads(out)["rules"] for r in rule["resources"]}
    # labelize, networkpolicy, exec and terminate are all in the chains
    assert {"pods", "pods/exec", "networkpolicies", "replicasets"} <= resources
