"""``falco-talon check``: every problem named as FILE:LINE:COLUMN: message (at JSON path)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from engine.cli import cli

GOOD = """
- name: Rule Labelize
  match:
    rules: [Terminal shell in container]
    output_fields: ["k8s.ns.name!=kube-system, k8s.ns.name!=falco"]
  action:
    name: kubernetes:labelize
    parameters:
      labels: {suspicious: "true", falco.org/quarantine: "yes"}
  continue: true
"""


def check(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["check", *args])
    return result.exit_code, result.output


def test_a_valid_file_exits_0(write_rules: Callable[..., Path]) -> None:
    code, out = check("-r", str(write_rules(GOOD)))
    assert (code, out.strip()) == (0, "1 rule(s) in 1 file(s): valid")


def test_the_shipped_example_rules_are_valid() -> None:
    assert check("-r", "examples/rules.yaml")[0] == 0


BAD: list[tuple[str, str, str]] = [
    (
        "YAML syntax error",
        "- name: x\n  action: {name: kubernetes:terminate\n",
        "{f}:3:1: YAML syntax error: expected ',' or '}', but got '<stream end>' while parsing a "
        "flow mapping (at $)",
    ),
    (
        "unknown actionner",
        "- name: x\n  action:\n    name: kubernetes:terminat\n",
        "{f}:3:11: 'kubernetes:terminat' is not a known actionner; known: calico:networkpolicy, "
        "cilium:networkpolicy, kubernetes:annotation, kubernetes:cordon, kubernetes:delete, "
        "kubernetes:drain, kubernetes:exec, kubernetes:label, kubernetes:labelize, "
        "kubernetes:log, kubernetes:networkpolicy, kubernetes:script, kubernetes:terminate "
        "(at $[0].action.name)",
    ),
    (
        "bad priority",
        "- name: x\n  match:\n    priority: '>=Critcal'\n  action: {name: kubernetes:terminate}\n",
        "{f}:3:15: '>=Critcal' is not a priority: an optional comparator (>=, >, <=, <, =) and "
        "one of Debug, Informational, Notice, Warning, Error, Critical, Alert, Emergency "
        "(at $[0].match.priority)",
    ),
    (
        "malformed output_fields entry",
        "- name: x\n  match:\n    output_fields:\n      - k8s.ns.name\n"
        "  action: {name: kubernetes:terminate}\n",
        "{f}:4:9: 'k8s.ns.name' is not a condition group: comma-separated key=value or "
        "key!=value (quote a value that holds a comma) (at $[0].match.output_fields[0])",
    ),
    (
        "malformed tags entry",
        "- name: x\n  match:\n    tags: ['shell,,container']\n  action: {name: kubernetes:exec, "
        "parameters: {command: id}}\n",
        "{f}:3:12: 'shell,,container' is not a tag group: comma-separated non-empty tags "
        "(at $[0].match.tags[0])",
    ),
    (
        "duplicate rule names",
        "- name: x\n  action: {name: kubernetes:terminate}\n- name: x\n"
        "  action: {name: kubernetes:networkpolicy}\n",
        "{f}:3:9: duplicate rule name 'x', first defined at {f}:1:9 (at $[1].name)",
    ),
    (
        "unknown key in a rule",
        "- name: x\n  action: {name: kubernetes:terminate}\n  contine: false\n",
        "{f}:3:3: unknown key 'contine'; allowed: action, before, continue, description, "
        "match, name, notifiers, throttle (at $[0].contine)",
    ),
    (
        "continue is a boolean",
        "- name: x\n  action: {name: kubernetes:terminate}\n  continue: 'no'\n",
        "{f}:3:13: 'no' must be boolean (at $[0].continue)",
    ),
    (
        "before is a boolean",
        "- name: x\n  action: {name: kubernetes:terminate}\n  before: 1\n",
        "{f}:3:11: 1 must be boolean (at $[0].before)",
    ),
    (
        "unknown parameter",
        "- name: x\n  action:\n    name: kubernetes:terminate\n    parameters:\n"
        "      gracePeriod: 3\n",
        "{f}:5:7: unknown key 'gracePeriod'; allowed: gracePeriodSeconds, "
        "grace_period_seconds, ignoreDaemonsets, ignoreStatefulsets, ignore_daemonsets, "
        "ignore_standalone_pods, ignore_statefulsets, minHealthyReplicas, min_healthy_replicas "
        "(at $[0].action.parameters.gracePeriod)",
    ),
    (
        "parameter of the wrong type",
        "- name: x\n  action:\n    name: kubernetes:terminate\n    parameters:\n"
        "      gracePeriodSeconds: soon\n",
        "{f}:5:27: 'soon' must be integer (at $[0].action.parameters.gracePeriodSeconds)",
    ),
    (
        "percent without quotes is still a string but a bad one",
        "- name: x\n  action:\n    name: kubernetes:terminate\n    parameters:\n"
        "      minHealthyReplicas: 150%\n",
        "{f}:5:27: '150%' must be a whole number of pods (3) or a quoted percentage ('50%') "
        "(at $[0].action.parameters.minHealthyReplicas)",
    ),
    (
        "missing required parameter",
        "- name: x\n  action:\n    name: kubernetes:exec\n    parameters: {shell: /bin/bash}\n",
        "{f}:4:17: 'command' is required (at $[0].action.parameters)",
    ),
    (
        "label key syntax",
        "- name: x\n  action:\n    name: kubernetes:labelize\n    parameters:\n"
        "      labels: {'-bad': x}\n",
        "{f}:5:24: '-bad' is not a valid Kubernetes label key ([prefix/]name) "
        "(at $[0].action.parameters.labels['-bad'])",
    ),
    (
        "label value syntax",
        "- name: x\n  action:\n    name: kubernetes:labelize\n    parameters:\n"
        "      labels: {quarantine: true}\n",
        "{f}:5:28: true must be a Kubernetes label value (quoted, at most 63 characters of "
        "letters, digits, '-', '_', '.'), or empty to remove the label "
        "(at $[0].action.parameters.labels.quarantine)",
    ),
    (
        "missing name",
        "- action: {name: kubernetes:terminate}\n",
        "{f}:1:3: 'name' is required (at $[0])",
    ),
    (
        "not a list of rules",
        "name: x\n",
        "{f}:1:1: an object must be array or null (at $)",
    ),
    (
        "duplicate key inside a rule",
        "- name: x\n  name: y\n  action: {name: kubernetes:terminate}\n",
        "{f}:2:3: duplicate key 'name' (at $[0].name)",
    ),
]


@pytest.mark.parametrize(("text", "expected"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_an_invalid_file_exits_1_naming_file_line_and_path(
    write_rules: Callable[..., Path], text: str, expected: str
) -> None:
    path = write_rules(text)
    code, out = check("-r", str(path))
    assert code == 1
    assert out.strip() == expected.replace("{f}", str(path))


def test_every_error_in_every_file_is_reported_at_once(write_rules: Callable[..., Path]) -> None:
    a = write_rules("- name: x\n  action: {name: nope:nope}\n  before: maybe\n")
    b = write_rules(
        "- name: y\n  match: {priority: loud}\n  action: {name: kubernetes:terminate}\n"
    )
    code, out = check("-r", str(a), "-r", str(b))
    assert code == 1
    assert [line.split(": ")[0] for line in out.strip().splitlines()] == [
        f"{a}:2:18",
        f"{a}:3:11",
        f"{b}:2:21",
    ]


def test_duplicate_names_are_found_across_files(write_rules: Callable[..., Path]) -> None:
    a = write_rules("- name: same\n  action: {name: kubernetes:terminate}\n")
    b = write_rules("- name: same\n  action: {name: kubernetes:terminate}\n")
    code, out = check("-r", str(a), "-r", str(b))
    assert code == 1
    assert (
        out.strip()
        == f"{b}:1:9: duplicate rule name 'same', first defined at {a}:1:9 (at $[0].name)"
    )


def test_a_missing_file_is_an_error_not_a_crash(tmp_path: Path) -> None:
    code, out = check("-r", str(tmp_path / "absent.yaml"))
    assert code == 1
    assert (
        out.strip() == f"{tmp_path / 'absent.yaml'}:1:1: cannot read rules file: "
        "No such file or directory (at $)"
    )


def test_a_directory_stands_for_its_yaml_files_in_name_order(tmp_path: Path) -> None:
    (tmp_path / "b.yaml").write_text("- name: b\n  action: {name: kubernetes:terminate}\n")
    (tmp_path / "a.yml").write_text("- name: a\n  action: {name: kubernetes:networkpolicy}\n")
    (tmp_path / "notes.txt").write_text("not rules")
    code, out = check("-r", str(tmp_path))
    assert (code, out.strip()) == (0, "2 rule(s) in 2 file(s): valid")


def test_usage_errors_exit_2() -> None:
    result = CliRunner().invoke(cli, ["check", "--no-such-flag"])
    assert result.exit_code == 2


def test_check_with_a_config_reports_notifiers_that_are_not_configured(
    write_rules: Callable[..., Path], tmp_path: Path
) -> None:
    rules = write_rules("- name: x\n  action: {name: kubernetes:terminate}\n")
    config = tmp_path / "config.yaml"
    config.write_text("defaultNotifiers: [pager]\n")
    code, out = check("-c", str(config), "-r", str(rules))
    assert code == 1
    assert "notifier 'pager' does not exist" in out


def test_the_console_script_needs_no_config_and_no_cluster(
    write_rules: Callable[..., Path],
) -> None:
    path = write_rules(GOOD)
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "check", "-r", str(path)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
