"""``falco-talon test``: passing and failing suites, their diffs, exit codes and reports."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.rulect.conftest import ROOT, Result

Talon = Callable[..., Result]
Write = Callable[[str, str], Path]


def line_of(path: Path, text: str) -> int:
    """The 1-based line of ``path`` holding ``text``."""
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def test_the_example_suites_pass_on_seed_and_v03_rules(talon: Talon) -> None:
    seed = talon("test", "-c", "examples/config.yaml", "examples/tests/seed.yaml", cwd=ROOT)
    assert seed.code == 0, seed.out + seed.err
    assert "4 passed, 0 failed, 0 error(s)" in seed.out
    v03 = talon("test", "-c", "examples/v03/config.yaml", "examples/tests/v03.yaml", cwd=ROOT)
    assert v03.code == 0, v03.out + v03.err
    assert "4 passed, 0 failed" in v03.out


def test_a_directory_of_test_files_runs_every_file(talon: Talon) -> None:
    # examples/tests holds both suites; against the seed rules the v0.3 suite fails.
    result = talon("test", "-c", "examples/config.yaml", "examples/tests", cwd=ROOT)
    assert result.code == 1
    assert "(8 case(s) in 2 file(s))" in result.out
    assert "FAIL  examples/tests/v03.yaml:" in result.out
    assert "FAIL  examples/tests/seed.yaml" not in result.out


def test_wrong_order_fails_with_both_rules_and_their_lines(
    talon: Talon, examples: Path, write: Write
) -> None:
    write(
        "order.yaml",
        """
        tests:
          - name: terminate first
            event: event.json
            expect:
              order: [Rule Terminate, Rule NetworkPolicy]
        """,
    )
    result = talon("test", "-r", "rules.yaml", "order.yaml")
    assert result.code == 1
    rules = examples / "rules.yaml"
    assert "FAIL  order.yaml:2: terminate first" in result.out
    assert (
        "order.yaml:5:31: order: expected Rule NetworkPolicy to run after "
        "[actions] Rule Terminate: kubernetes:terminate planned, but it runs before it"
    ) in result.out
    terminate = line_of(rules, "- name: Rule Terminate")
    netpol = line_of(rules, "- name: Rule NetworkPolicy")
    assert f"rule 'Rule NetworkPolicy' at rules.yaml:{netpol}:3" in result.out
    assert f"rule 'Rule Terminate' at rules.yaml:{terminate}:3" in result.out
    assert "1. [before-actions] Rule NetworkPolicy: kubernetes:networkpolicy planned" in result.out
    assert "0 passed, 1 failed, 0 error(s)" in result.out


def test_an_unexpected_skip_names_the_rule_that_superseded_it(
    talon: Talon, examples: Path, write: Write
) -> None:
    """A rule added later with continue: false silently supersedes another: the test says
    which rule did it, and where."""
    write(
        "skip.yaml",
        """
        tests:
          - name: the pod is labelled
            event: event.json
            expect:
              steps:
                - {rule: Rule NetworkPolicy}
                - {rule: Rule Exec forensics}
                - {rule: Rule Labelize, outcome: planned}
                - {rule: Rule Terminate}
          - name: the pod is labelled (partial)
            event: event.json
            expect:
              acting: [Rule Labelize]
        """,
    )
    result = talon("test", "-r", "rules.yaml", "skip.yaml")
    assert result.code == 1
    terminate = line_of(examples / "rules.yaml", "- name: Rule Terminate")
    assert (
        "skip.yaml:8:11: step 3: expected Rule Labelize: planned, got [actions] Rule Labelize: "
        "kubernetes:labelize skipped (superseded by rule 'Rule Terminate', continue: false)"
    ) in result.out
    assert f"rule 'Rule Terminate' at rules.yaml:{terminate}:3 (continue: false)" in result.out
    assert (
        "acting: expected 'Rule Labelize' to act, but it does not (skipped: superseded by "
        "rule 'Rule Terminate', continue: false)"
    ) in result.out
    assert "0 passed, 2 failed" in result.out


def test_a_missing_notifier_fails(talon: Talon, examples: Path, write: Write) -> None:
    write(
        "notify.yaml",
        """
        tests:
          - name: slack hears about the termination
            event: event.json
            expect:
              notifiers:
                Rule Terminate: [slack, k8sevents]
          - name: k8sevents hears about it (defaultNotifiers)
            event: event.json
            expect:
              notifiers:
                Rule Terminate: [k8sevents]
                Rule Labelize: []
        """,
    )
    write("config.yaml", "defaultNotifiers: [k8sevents]\n")
    result = talon("test", "-c", "config.yaml", "-r", "rules.yaml", "notify.yaml")
    assert result.code == 1
    assert (
        "notify.yaml:6:25: notifiers of 'Rule Terminate': expected [k8sevents, slack], got "
        "[k8sevents]; missing [slack]"
    ) in result.out
    assert "FAIL  notify.yaml:2: slack hears about the termination" in result.out
    assert "k8sevents hears about it" not in result.out  # it passed
    assert "1 passed, 1 failed" in result.out


def test_nothing_happens_and_overrides_of_the_event(
    talon: Talon, examples: Path, write: Write
) -> None:
    write(
        "nothing.yaml",
        """
        tests:
          - name: kube-system pods are not labelled nor killed
            event: event.json
            output_fields: {k8s.ns.name: kube-system}
            expect:
              not_acting: [Rule Labelize, Rule Terminate]
              acting: [Rule NetworkPolicy]
          - name: a warning does not terminate
            event: event.json
            priority: Warning
            expect:
              order: [Rule Exec forensics, Rule Labelize]
              not_acting: [Rule Terminate]
          - name: another Falco rule, Falcosidekick's shape, inline
            event:
              uuid: 0b5e3c5e-8d5c-4a53-a3c2-5b8f4e2f2a10
              rule: Write below etc
              priority: Error
              output_fields: {fd.name: /etc/shadow}
              tags: [filesystem]
            expect:
              matched: []
          - name: but the shell does match
            event: event.json
            expect:
              matched: []
        """,
    )
    result = talon("test", "-r", "rules.yaml", "nothing.yaml")
    assert result.code == 1
    assert "3 passed, 1 failed" in result.out
    assert (
        "nothing.yaml:26:16: expected nothing to happen, but 4 rule(s) matched: "
        "[Rule Labelize, Rule NetworkPolicy, Rule Exec forensics, Rule Terminate]"
    ) in result.out
    assert "(matched, not expected)" in result.out


def test_an_event_file_that_does_not_exist_is_an_error_at_its_line(
    talon: Talon, examples: Path, write: Write
) -> None:
    write(
        "missing.yaml",
        """
        tests:
          - name: runs
            event: event.json
            expect: {acting: [Rule Terminate]}
          - name: cannot run
            event: events/nope.json
            expect: {matched: []}
          - name: not an event
            event: rules.yaml
            expect: {matched: []}
        """,
    )
    result = talon("test", "-r", "rules.yaml", "missing.yaml")
    assert result.code == 2
    assert "ERROR missing.yaml:5: cannot run" in result.out
    assert (
        "missing.yaml:6:12: cannot read event file 'events/nope.json': No such file or directory"
    ) in result.out
    assert "missing.yaml:9:12: event file 'rules.yaml' is not valid JSON" in result.out
    assert "1 passed, 0 failed, 2 error(s)" in result.out


def test_an_invalid_test_file_is_reported_at_file_line_column(
    talon: Talon, examples: Path, write: Write
) -> None:
    write(
        "bad.yaml",
        """
        tests:
          - name: typo
            event: event.json
            expect:
              steps:
                - {rule: Rule Terminate, outcome: ran}
              not_actin: [Rule Labelize]
          - name: typo
            event: event.json
            expect: {}
        """,
    )
    write("broken.yaml", "tests:\n  - name: [unclosed\n")
    result = talon("test", "-r", "rules.yaml", "bad.yaml", "broken.yaml", "nowhere.yaml")
    assert result.code == 2
    lines = result.out.splitlines()
    assert (
        "ERROR bad.yaml:6:43: 'ran' is not an outcome: planned (would run) or skipped "
        "(at $.tests[0].expect.steps[0].outcome)"
    ) in lines
    assert (
        "ERROR bad.yaml:7:7: unknown key 'not_actin'; allowed: acting, matched, not_acting, "
        "notifiers, order, steps (at $.tests[0].expect.not_actin)"
    ) in lines
    assert any(line.startswith("ERROR bad.yaml:10:13: {} should be non-empty") for line in lines)
    assert any(line.startswith("ERROR broken.yaml:3:1: YAML syntax error") for line in lines)
    assert "ERROR nowhere.yaml:1:1: cannot read: No such file or directory (at $)" in lines


def test_usage_errors_exit_2(talon: Talon, examples: Path) -> None:
    none = talon("test", "-r", "rules.yaml")
    assert none.code == 2
    assert "no test files given" in none.err
    bad = talon("test", "-r", "rules.yaml", "-o", "xml", "t.yaml")
    assert bad.code == 2
    assert "-o/--output must be text or json" in bad.err


def test_invalid_rules_fail_like_check(talon: Talon, write: Write) -> None:
    write("rules.yaml", "- name: x\n  action: {name: kubernetes:terminat}\n")
    write("t.yaml", "tests: []\n")
    result = talon("test", "-r", "rules.yaml", "t.yaml")
    assert result.code == 1
    assert result.err.startswith("rules.yaml:2:")


def test_junit_xml_reports_each_case_for_ci(talon: Talon, examples: Path, write: Write) -> None:
    write(
        "suite.yaml",
        """
        tests:
          - name: isolated first
            event: event.json
            expect: {order: [Rule NetworkPolicy, Rule Terminate]}
          - name: labelled
            event: event.json
            expect: {acting: [Rule Labelize]}
          - name: no event
            event: nope.json
            expect: {matched: []}
        """,
    )
    write("broken.yaml", "tests: 3\n")
    result = talon(
        "test", "-r", "rules.yaml", "suite.yaml", "broken.yaml", "--junit", "out/report.xml"
    )
    assert result.code == 2
    root = ET.parse(examples / "out" / "report.xml").getroot()
    assert root.tag == "testsuites"
    assert (root.get("tests"), root.get("failures"), root.get("errors")) == ("4", "1", "2")
    suites = {s.get("name"): s for s in root.iter("testsuite")}
    assert set(suites) == {"suite.yaml", "broken.yaml"}
    cases = {c.get("name"): c for c in suites["suite.yaml"].iter("testcase")}
    assert list(cases) == ["isolated first", "labelled", "no event"]
    assert cases["isolated first"].find("failure") is None
    assert cases["isolated first"].get("line") == "2"
    failure = cases["labelled"].find("failure")
    assert failure is not None
    assert failure.get("message") == (
        "acting: expected 'Rule Labelize' to act, but it does not (skipped: superseded by "
        "rule 'Rule Terminate', continue: false)"
    )
    assert "rule 'Rule Terminate' at rules.yaml:" in (failure.text or "")
    error = cases["no event"].find("error")
    assert error is not None
    assert "cannot read event file 'nope.json'" in (error.get("message") or "")
    (load,) = suites["broken.yaml"].iter("testcase")
    load_error = load.find("error")
    assert load_error is not None
    assert (load_error.text or "").startswith("broken.yaml:1:8: 3 must be array")
    assert float(root.get("time") or "x") >= 0


def test_json_report(talon: Talon, examples: Path, write: Write) -> None:
    write(
        "suite.yaml",
        """
        tests:
          - name: passes
            event: event.json
            expect: {not_acting: [Rule Labelize]}
          - name: fails
            event: event.json
            expect: {not_acting: [Rule Terminate]}
        """,
    )
    result = talon("test", "-r", "rules.yaml", "suite.yaml", "-o", "json")
    assert result.code == 1
    report = json.loads(result.out)
    assert (report["passed"], report["failed"], report["errors"], report["exit_code"]) == (
        1,
        1,
        0,
        1,
    )
    (suite,) = report["files"]
    passes, fails = suite["cases"]
    assert passes["status"] == "passed" and passes["problems"] == []
    assert fails["status"] == "failed"
    assert fails["at"] == "suite.yaml:5:5"
    (problem,) = fails["problems"]
    assert problem["at"] == "suite.yaml:7:27"
    assert problem["message"].startswith("not_acting: expected 'Rule Terminate' not to act")
    assert fails["got"]["matched"][-1] == "Rule Terminate"  # explain's JSON record


@pytest.mark.parametrize("inline", [False, True])
def test_record_writes_a_suite_that_passes_as_is(
    talon: Talon, examples: Path, inline: bool
) -> None:
    extra = ["--inline"] if inline else []
    recorded = talon(
        "test", "--record", "event.json", "event-warning.json", "-r", "rules.yaml",
        "-o", "tests/recorded.yaml", *extra,
    )  # fmt: skip
    assert recorded.code == 0, recorded.err
    assert "2 case(s) written to tests/recorded.yaml" in recorded.err
    text = (examples / "tests" / "recorded.yaml").read_text()
    assert text.startswith("# Recorded by `falco-talon test --record`")
    data = yaml.safe_load(text)
    critical, warning = data["tests"]
    if inline:
        assert critical["event"]["priority"] == "Critical"
    else:
        assert critical["event"] == "../event.json"  # relative to the test file
    assert critical["expect"]["steps"][2] == {
        "stage": "actions",
        "rule": "Rule Labelize",
        "action": "kubernetes:labelize",
        "outcome": "skipped",
        "reason": "superseded by rule 'Rule Terminate', continue: false",
    }
    assert "Rule Terminate" not in warning["expect"]["matched"]
    again = talon("test", "-r", "rules.yaml", "tests/recorded.yaml")
    assert again.code == 0, again.out
    assert "2 passed, 0 failed" in again.out
    # The recording pins today's behaviour: a rule change that supersedes a rule fails it.
    rules = examples / "rules.yaml"
    rules.write_text(rules.read_text().replace("  continue: true\n", "  continue: false\n"))
    changed = talon("test", "-r", "rules.yaml", "tests/recorded.yaml")
    assert changed.code == 1
    assert "superseded by rule 'Rule Labelize', continue: false" in changed.out


def test_record_v03_rules_to_standard_output_round_trips(talon: Talon, write: Write) -> None:
    recorded = talon(
        "test", "-c", "examples/v03/config.yaml", "--record",
        "examples/v03/event-shell.json", "examples/v03/event-package.json",
        "examples/v03/event-sensitive.json", cwd=ROOT,
    )  # fmt: skip
    assert recorded.code == 0, recorded.err
    data = yaml.safe_load(recorded.out)
    assert data["tests"][0]["event"] == "examples/v03/event-shell.json"  # relative to cwd
    package = data["tests"][1]["expect"]["steps"]
    assert package[2]["action_name"] == "Kill pod"
    assert package[2]["reason"] == "chain stopped: action 'Cut egress' has continue: false"
    path = write("recorded.yaml", recorded.out.replace("examples/", str(ROOT / "examples") + "/"))
    again = talon("test", "-c", "examples/v03/config.yaml", str(path), cwd=ROOT)
    assert again.code == 0, again.out
    assert "3 passed" in again.out


def test_the_schema_for_editors_is_rendered_and_accepts_the_examples() -> None:
    schema = json.loads((ROOT / "schemas" / "rules-test.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    for suite in sorted((ROOT / "examples" / "tests").glob("*.yaml")):
        jsonschema.validate(yaml.safe_load(suite.read_text()), schema)
    assert schema["$defs"]["step"]["properties"]["outcome"]["enum"] == ["planned", "skipped"]


def test_a_v03_chain_stop_names_the_action_that_stopped_it(talon: Talon, write: Write) -> None:
    suite = write(
        "v03.yaml",
        f"""
        tests:
          - name: a package manager gets the pod killed
            event: {ROOT}/examples/v03/event-package.json
            expect:
              order:
                - {{rule: Package manager in a container, action_name: Cut egress}}
                - {{rule: Package manager in a container, action_name: Kill pod}}
        """,
    )
    result = talon("test", "-c", "examples/v03/config.yaml", str(suite), cwd=ROOT)
    assert result.code == 1
    rules = ROOT / "examples" / "v03" / "rules.yaml"
    lines = rules.read_text().splitlines()
    cut = next(
        n
        for n, line in enumerate(lines, 1)
        if "- action: Cut egress" in line and "continue: false" in lines[n]
    )
    assert (
        "order: expected Package manager in a container: Kill pod to run, but it does not "
        "(skipped: chain stopped: action 'Cut egress' has continue: false)"
    ) in result.out
    assert (
        f"action 'Cut egress' of 'Package manager in a container' at "
        f"examples/v03/rules.yaml:{cut}:7 (continue: false)"
    ) in result.out
