"""The command line beyond ``check``: explain, the listings, the diagram, completion."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from click.testing import CliRunner

from engine.cli import cli
from tests.conftest import FALCO_EVENT


def run(*args: str, stdin: str | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), input=stdin)
    return result.exit_code, result.output


def critical_event(tmp_path: Path) -> Path:
    path = tmp_path / "event.json"
    path.write_text(json.dumps({**FALCO_EVENT, "priority": "Critical", "uuid": "ev-1"}))
    return path


def test_explain_json_lists_steps_in_execution_order_with_skipped_ones(tmp_path: Path) -> None:
    code, out = run(
        "explain",
        "-r",
        "examples/rules.yaml",
        "--event",
        str(critical_event(tmp_path)),
        "-o",
        "json",
    )
    assert code == 0
    data = json.loads(out)
    assert data["matched"] == [
        "Rule Labelize",
        "Rule NetworkPolicy",
        "Rule Exec forensics",
        "Rule Terminate",
    ]
    assert data["steps"] == [
        {
            "stage": "before-actions",
            "rule": "Rule NetworkPolicy",
            "action": "kubernetes:networkpolicy",
            "outcome": "planned",
            "reason": "",
        },
        {
            "stage": "before-actions",
            "rule": "Rule Exec forensics",
            "action": "kubernetes:exec",
            "outcome": "planned",
            "reason": "",
        },
        {
            "stage": "actions",
            "rule": "Rule Labelize",
            "action": "kubernetes:labelize",
            "outcome": "skipped",
            "reason": "superseded by rule 'Rule Terminate', continue: false",
        },
        {
            "stage": "actions",
            "rule": "Rule Terminate",
            "action": "kubernetes:terminate",
            "outcome": "planned",
            "reason": "",
        },
    ]
    assert data["notifiers"] == {
        "Rule NetworkPolicy": [],
        "Rule Exec forensics": [],
        "Rule Terminate": [],
    }


def test_explain_reads_the_event_from_stdin_and_speaks_to_people(tmp_path: Path) -> None:
    code, out = run(
        "explain", "-r", "examples/rules.yaml", "--event", "-", stdin=json.dumps(FALCO_EVENT)
    )
    assert code == 0
    # Warning priority: terminate (>=Critical) does not match, so labelize runs.
    assert "[actions] Rule Labelize: kubernetes:labelize would run" in out
    assert "Rule Terminate" not in out.split("Plan, in execution order:")[1]


def test_explain_with_no_match_says_nothing_would_happen(tmp_path: Path) -> None:
    code, out = run(
        "explain",
        "-r",
        "examples/rules.yaml",
        "--event",
        "-",
        stdin=json.dumps({**FALCO_EVENT, "rule": "Write below etc"}),
    )
    assert code == 0
    assert "No talon rule matches this event: nothing would happen." in out


def test_explain_touches_nothing_even_with_an_actionner_that_would_fail(tmp_path: Path) -> None:
    # The kubernetes actionners are not implemented yet and fail when run; explain must plan.
    code, out = run(
        "explain",
        "-r",
        "examples/rules.yaml",
        "--event",
        str(critical_event(tmp_path)),
        "-o",
        "json",
    )
    assert code == 0
    assert {s["outcome"] for s in json.loads(out)["steps"]} == {"planned", "skipped"}


def test_explain_rejects_a_malformed_event_with_the_field_named(tmp_path: Path) -> None:
    code, out = run("explain", "-r", "examples/rules.yaml", "--event", "-", stdin='{"rule": 3}')
    assert code == 1
    assert "invalid event: missing required field 'priority'" in out


def test_explain_includes_default_notifiers_from_the_config(
    tmp_path: Path, write_rules: Callable[..., Path]
) -> None:
    rules = write_rules("- name: t\n  action: {name: kubernetes:terminate}\n")
    config = tmp_path / "c.yaml"
    config.write_text("defaultNotifiers: []\n")
    code, out = run(
        "explain",
        "-c",
        str(config),
        "-r",
        str(rules),
        "--event",
        "-",
        "-o",
        "json",
        stdin=json.dumps(FALCO_EVENT),
    )
    assert code == 0
    assert json.loads(out)["notifiers"] == {"t": []}


def test_actionners_list_prints_defaults_parameters_and_rbac() -> None:
    code, out = run("actionners", "list", "-o", "json")
    data = {a["name"]: a for a in json.loads(out)}
    assert code == 0
    assert set(data) == {
        "calico:networkpolicy",
        "cilium:networkpolicy",
        "kubernetes:annotation",
        "kubernetes:cordon",
        "kubernetes:delete",
        "kubernetes:drain",
        "kubernetes:exec",
        "kubernetes:label",
        "kubernetes:labelize",
        "kubernetes:log",
        "kubernetes:networkpolicy",
        "kubernetes:script",
        "kubernetes:terminate",
    }
    assert (data["kubernetes:terminate"]["continue"], data["kubernetes:terminate"]["before"]) == (
        False,
        False,
    )
    assert (
        data["kubernetes:networkpolicy"]["continue"],
        data["kubernetes:networkpolicy"]["before"],
    ) == (True, True)
    assert {"apiGroups": [""], "resources": ["pods/exec"], "verbs": ["create", "get"]} in data[
        "kubernetes:exec"
    ]["rbac"]
    code, text = run("actionners", "list")
    assert "kubernetes:exec: Run a command" in text and "command: string (required)" in text


def test_notifiers_list_runs_with_whatever_is_installed() -> None:
    code, out = run("notifiers", "list", "-o", "json")
    assert code == 0
    assert isinstance(json.loads(out), list)


def test_diagram_is_derived_from_the_machine() -> None:
    code, out = run("diagram")
    assert code == 0
    assert out.startswith("stateDiagram-v2\n")
    assert "RECEIVED --> UNMATCHED: advance [otherwise: no rule matched]" in out
    assert "ACTIONS: on entry, plan the rest: the first continue: false rule supersedes" in out
    code, out = run("diagram", "-o", "dot")
    assert out.startswith("digraph") and "MATCHED -> BEFORE_ACTIONS" in out


def test_the_readme_shows_the_current_diagram() -> None:
    _, out = run("diagram")
    assert out in Path("README.md").read_text()


def test_completion_prints_a_script_for_the_shell() -> None:
    code, out = run("completion", "bash")
    assert code == 0 and "_FALCO_TALON_COMPLETE" in out


def test_version_and_help() -> None:
    assert run("version") == (0, "falco-talon 0.1.0\n")
    for command in ("server", "check", "explain", "diagram"):
        code, out = run(command, "--help")
        assert (code == 0 and "-r, --rules" in out) or command == "diagram"


def test_the_committed_schemas_match_the_code() -> None:
    code, out = run("schemas", "--check")
    assert (code, out.strip()) == (0, "schemas up to date")


def test_the_server_refuses_to_start_on_invalid_rules(write_rules: Callable[..., Path]) -> None:
    rules = write_rules("- name: x\n  action: {name: kubernetes:terminat}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "server", "-r", str(rules), "--listen-port", "0"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 1
    assert f"{rules}:2:18: 'kubernetes:terminat' is not a known actionner" in proc.stderr


def test_rbac_prints_exactly_what_the_rules_actionners_and_notifiers_need(
    write_rules: Callable[..., Path], tmp_path: Path
) -> None:
    import yaml

    rules = write_rules(
        "- name: mark\n  action:\n    name: kubernetes:labelize\n    parameters: {labels: {a: b}}\n"
    )
    config = tmp_path / "c.yaml"
    config.write_text("defaultNotifiers: [k8sevents]\n")
    code, out = run("rbac", "-r", str(rules), "-c", str(config))
    assert code == 0
    role = yaml.safe_load(out)
    assert role["kind"] == "ClusterRole"
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "patch"]},
    ]
