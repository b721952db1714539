"""``falco-talon test``: rule test cases run through ``explain``, compared, reported.

Position in the flow: none at run time. Each case of a test file (:mod:`engine.testsuite`)
runs through :func:`engine.explain.explain` (the server's matcher and state machine, dry run:
nothing touched, nothing sent); its JSON record (:func:`engine.explain.explain_json`) is
compared with the case's expectations. A failing expectation names the rule(s) that made
the difference at their ``FILE:LINE:COLUMN`` in the rules. Reports: text for people, JSON,
JUnit XML for CI systems. :func:`record` writes cases from what the engine does today.
"""

from __future__ import annotations

import os
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml

from engine.contract.actionners import ActionnerRegistry
from engine.contract.event import FalcoEvent
from engine.explain import explain, explain_json
from engine.rules import Rule, RuleSet
from engine.sourcemap import Position, SourceError
from engine.testsuite import Case, Suite

PASSED, FAILED, ERROR = "passed", "failed", "error"
_QUOTED_RULE = re.compile(r"rule '((?:[^'\\]|\\.)*)'")
_QUOTED_ACTION = re.compile(r"action '((?:[^'\\]|\\.)*)'")

Step = Mapping[str, Any]
"""A step of ``explain -o json``: stage, rule, action, [action_name], outcome, reason."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One expectation that does not hold."""

    message: str
    at: Position | None = None
    """Where the expectation stands in the test file."""
    where: tuple[str, ...] = ()
    """The rules (and v0.3 actions) that made the difference, each with its position."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "message": self.message,
            "at": str(self.at) if self.at else None,
            "where": list(self.where),
        }


@dataclass(slots=True)
class CaseResult:
    case: Case
    status: str
    problems: list[Problem] = field(default_factory=list)
    got: dict[str, Any] | None = None
    """The ``explain -o json`` record of the case's event."""
    seconds: float = 0.0


@dataclass(slots=True)
class SuiteResult:
    suite: Suite
    cases: list[CaseResult] = field(default_factory=list)


@dataclass(slots=True)
class Report:
    suites: list[SuiteResult] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for s in self.suites for c in s.cases if c.status == status)

    @property
    def load_errors(self) -> list[SourceError]:
        """Problems that kept whole files or cases from loading."""
        return [e for s in self.suites for e in s.suite.errors]

    @property
    def exit_code(self) -> int:
        """2 when a test file or case is invalid, 1 when a case fails, else 0."""
        if self.load_errors or self.count(ERROR):
            return 2
        return 1 if self.count(FAILED) else 0


# -- running -----------------------------------------------------------------------------------


async def run_suites(
    suites: Sequence[Suite],
    rules: RuleSet,
    actionners: ActionnerRegistry,
    default_notifiers: tuple[str, ...] = (),
) -> Report:
    """Every case of every suite, in order."""
    report = Report()
    for suite in suites:
        result = SuiteResult(suite)
        for case in suite.cases:
            result.cases.append(await run_case(case, rules, actionners, default_notifiers))
        report.suites.append(result)
    return report


async def run_case(
    case: Case,
    rules: RuleSet,
    actionners: ActionnerRegistry,
    default_notifiers: tuple[str, ...] = (),
) -> CaseResult:
    if case.event is None:
        message = case.error.message if case.error else "no event"
        at = case.error.position if case.error else case.position
        return CaseResult(case, ERROR, [Problem(message, at)])
    start = time.perf_counter()
    got = explain_json(await explain(case.event, rules, actionners, default_notifiers))
    seconds = time.perf_counter() - start
    problems = compare(case, got, {r.name: r for r in rules.rules})
    return CaseResult(case, FAILED if problems else PASSED, problems, got, seconds)


# -- comparing ---------------------------------------------------------------------------------


def compare(case: Case, got: Mapping[str, Any], rules: Mapping[str, Rule]) -> list[Problem]:
    """Every expectation of ``case`` that ``got`` (an explain record) does not meet."""
    expect = case.expect
    steps: list[Step] = list(got["steps"])
    ctx = _Context(rules, steps, list(got["matched"]))
    out: list[Problem] = []
    checks: dict[str, Callable[[Any, Mapping[str, Any], _Context], Found]] = {
        "matched": _check_matched,
        "steps": _check_steps,
        "order": _check_order,
        "acting": _check_acting,
        "not_acting": _check_not_acting,
        "notifiers": _check_notifiers,
    }
    for key, check in checks.items():
        if key in expect:
            for msg, where, index in check(expect[key], got, ctx):
                at = case.positions.get(f"{key}[{index}]") if index is not None else None
                out.append(Problem(msg, at or case.positions.get(key), where))
    return out


Found = Iterable[tuple[str, tuple[str, ...], int | str | None]]
"""(message, the rules that made the difference, the index of the expectation's entry)."""


@dataclass(slots=True)
class _Context:
    rules: Mapping[str, Rule]
    steps: list[Step]
    matched: list[str]

    def rule_at(self, name: str, note: str = "") -> str:
        rule = self.rules.get(name)
        if rule is None:
            return f"{name!r}: no rule of that name in the rules"
        return f"{name!r} at {rule.position}" + (f" ({note})" if note else "")

    def step_where(self, step: Step) -> tuple[str, ...]:
        """The step's rule, and the rule or v0.3 action its reason names."""
        out = [self.rule_at(step["rule"])]
        reason = str(step.get("reason") or "")
        for name in _QUOTED_RULE.findall(reason):
            if name != step["rule"]:
                out.append(self.rule_at(name, _why(self.rules.get(name))))
        rule = self.rules.get(step["rule"])
        for name in _QUOTED_ACTION.findall(reason):
            for action in rule.chain if rule else ():
                if action.name == name:
                    flags = "continue: false" if not action.continue_ else "failed"
                    out.append(
                        f"action {name!r} of {step['rule']!r} at {action.position} ({flags})"
                    )
                    break
        return tuple(dict.fromkeys(out))

    def why_not_running(self, want: Step) -> tuple[str, tuple[str, ...]]:
        """Why no step matching ``want`` (a rule name, maybe more) runs: the rule did not
        match, or the step is skipped and by what."""
        name = want["rule"]
        matcher = {k: v for k, v in want.items() if k not in ("outcome", "reason")}
        skipped = [s for s in self.steps if s["outcome"] == "skipped" and step_matches(matcher, s)]
        if skipped:
            s = skipped[0]
            return f"skipped: {s['reason']}", self.step_where(s)
        if any(s["rule"] == name for s in self.steps):
            return "the rule has no such step", (self.rule_at(name),)
        if name not in self.rules:
            return "no rule of that name", ()
        return "did not match the event", (self.rule_at(name),)

    def runs(self, name: str) -> list[Step]:
        return [s for s in self.steps if s["rule"] == name and s["outcome"] == "planned"]


def _why(rule: Rule | None) -> str:
    if rule is None:
        return ""
    return "continue: false" if not rule.continue_ else ""


def _names(names: Iterable[str]) -> str:
    return "[" + ", ".join(names) + "]"


def show_step(step: Step) -> str:
    """``[actions] Rule X: kubernetes:labelize skipped (reason)``, as far as ``step`` says."""
    parts = []
    if "stage" in step:
        parts.append(f"[{step['stage']}]")
    what = step.get("action", "")
    if step.get("action_name"):
        what = f"{step['action_name']} ({what})" if what else str(step["action_name"])
    parts.append(f"{step['rule']}:" if what or "outcome" in step else str(step["rule"]))
    if what:
        parts.append(what)
    if "outcome" in step:
        parts.append(str(step["outcome"]))
    text = " ".join(parts)
    if step.get("reason"):
        text += f" ({step['reason']})"
    return text


def step_matches(expected: Step, step: Step) -> bool:
    for key, want in expected.items():
        if key == "reason":
            have = str(step.get("reason") or "")
            if (want == "" and have != "") or want not in have:
                return False
        elif step.get(key) != want:
            return False
    return True


def _check_matched(expected: list[str], got: Mapping[str, Any], ctx: _Context) -> Found:
    if expected == ctx.matched:
        return
    where: list[str] = []
    for name in ctx.matched:
        if name not in expected:
            where.append(ctx.rule_at(name, "matched, not expected"))
    for name in expected:
        if name not in ctx.matched:
            where.append(ctx.rule_at(name, "expected, did not match"))
    if not where:
        where.append("same rules, another order: rule order is file order, then rule order")
    if not expected:
        message = f"expected nothing to happen, but {len(ctx.matched)} rule(s) matched: "
        yield message + _names(ctx.matched), tuple(where), None
        return
    yield f"matched: expected {_names(expected)}, got {_names(ctx.matched)}", tuple(where), None


def _align(expected: list[Step], steps: list[Step]) -> list[tuple[int, int]]:
    """The longest run of (expected, got) index pairs that match, in order (an LCS)."""
    n, m = len(expected), len(steps)
    best = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            best[i][j] = (
                best[i + 1][j + 1] + 1
                if step_matches(expected[i], steps[j])
                else max(best[i + 1][j], best[i][j + 1])
            )
    pairs, i, j = [], 0, 0
    while i < n and j < m:
        if step_matches(expected[i], steps[j]) and best[i][j] == best[i + 1][j + 1] + 1:
            pairs.append((i, j))
            i, j = i + 1, j + 1
        elif best[i + 1][j] >= best[i][j + 1]:
            i += 1
        else:
            j += 1
    return pairs


def _check_steps(expected: list[Step], got: Mapping[str, Any], ctx: _Context) -> Found:
    """Exactly these steps: each expected step not found in its place is paired with the
    step of the same rule found there instead, else reported missing; leftovers unexpected."""
    steps = ctx.steps
    bounds = [*_align(expected, steps), (len(expected), len(steps))]
    prev_i, prev_j = 0, 0
    for end_i, end_j in bounds:
        extra = list(range(prev_j, end_j))
        for i in range(prev_i, end_i):
            want = expected[i]
            same = next(
                (
                    j
                    for j in extra
                    if steps[j]["rule"] == want["rule"]
                    and want.get("action_name", steps[j].get("action_name"))
                    == steps[j].get("action_name")
                ),
                None,
            )
            if same is not None:
                extra.remove(same)
                yield (
                    f"step {same + 1}: expected {show_step(want)}, got {show_step(steps[same])}",
                    ctx.step_where(steps[same]),
                    i,
                )
                continue
            name = want["rule"]
            elsewhere = next((j for j, s in enumerate(steps) if step_matches(want, s)), None)
            where: tuple[str, ...]
            if elsewhere is not None:
                reason, where = f"it is step {elsewhere + 1}", (ctx.rule_at(name),)
            elif any(s["rule"] == name for s in steps):
                reason, where = "the rule has no such step", (ctx.rule_at(name),)
            else:
                reason, where = ctx.why_not_running(want)
            yield f"missing step: expected {show_step(want)} ({reason})", where, i
        for j in extra:
            yield f"step {j + 1}: unexpected {show_step(steps[j])}", ctx.step_where(steps[j]), None
        prev_i, prev_j = end_i + 1, end_j + 1


def _check_order(expected: list[str | Step], got: Mapping[str, Any], ctx: _Context) -> Found:
    wanted: list[Step] = [{"rule": e} if isinstance(e, str) else e for e in expected]
    running = [s for s in ctx.steps if s["outcome"] == "planned"]
    pos = 0
    previous: Step | None = None
    for n, entry in enumerate(wanted):
        want = {**entry, "outcome": "planned"}
        index = next((j for j in range(pos, len(running)) if step_matches(want, running[j])), None)
        if index is not None:
            pos, previous = index + 1, running[index]
            continue
        shown = show_step(entry)
        earlier = next((s for s in running[:pos] if step_matches(want, s)), None)
        if earlier is not None and previous is not None:
            yield (
                f"order: expected {shown} to run after {show_step(previous)}, but it runs "
                f"before it",
                (ctx.rule_at(want["rule"]), ctx.rule_at(previous["rule"])),
                n,
            )
        else:
            reason, where = ctx.why_not_running(want)
            yield f"order: expected {shown} to run, but it does not ({reason})", where, n
        return


def _check_acting(expected: list[str], got: Mapping[str, Any], ctx: _Context) -> Found:
    for n, name in enumerate(expected):
        if not ctx.runs(name):
            reason, where = ctx.why_not_running({"rule": name})
            yield f"acting: expected {name!r} to act, but it does not ({reason})", where, n


def _check_not_acting(expected: list[str], got: Mapping[str, Any], ctx: _Context) -> Found:
    for n, name in enumerate(expected):
        running = ctx.runs(name)
        if running:
            yield (
                f"not_acting: expected {name!r} not to act, but it does: "
                + "; ".join(show_step(s) for s in running),
                (ctx.rule_at(name),),
                n,
            )


def _check_notifiers(
    expected: Mapping[str, list[str]], got: Mapping[str, Any], ctx: _Context
) -> Found:
    notified: Mapping[str, list[str]] = got["notifiers"]
    for name, want in expected.items():
        have = notified.get(name, [])
        if set(want) == set(have):
            continue
        missing = [n for n in want if n not in have]
        extra = [n for n in have if n not in want]
        detail = []
        if missing:
            detail.append(f"missing {_names(missing)}")
        if extra:
            detail.append(f"unexpected {_names(extra)}")
        where: tuple[str, ...]
        if not ctx.runs(name):
            reason, where = ctx.why_not_running({"rule": name})
            detail.append(f"{name!r} does not act: {reason}")
        elif name in ctx.rules:
            where = (ctx.rule_at(name, "notifiers: " + _names(ctx.rules[name].notifiers)),)
        else:
            where = (ctx.rule_at(name),)
        yield (
            f"notifiers of {name!r}: expected {_names(sorted(want))}, got "
            f"{_names(sorted(have))}; " + ", ".join(detail),
            where,
            name,
        )


# -- reports -----------------------------------------------------------------------------------


def plan_lines(got: Mapping[str, Any]) -> list[str]:
    """The run record, as the diff's "got" side."""
    if not got["matched"]:
        return ["no rule matches: nothing happens"]
    lines = ["matched: " + _names(got["matched"])]
    for i, step in enumerate(got["steps"], 1):
        lines.append(f"{i}. {show_step(step)}")
    for rule, names in got["notifiers"].items():
        lines.append(f"notifiers of {rule}: {_names(names) if names else 'none'}")
    return lines


def case_text(result: CaseResult) -> list[str]:
    case = result.case
    label = {PASSED: "PASS ", FAILED: "FAIL ", ERROR: "ERROR"}[result.status]
    lines = [f"{label} {case.position.file}:{case.position.line}: {case.name}"]
    if result.status == PASSED:
        return lines
    for p in result.problems:
        lines.append(f"  {p.at}: {p.message}" if p.at else f"  {p.message}")
        lines.extend(
            f"      rule {w}" if not w.startswith(("action ", "same ")) else f"      {w}"
            for w in p.where
        )
    if result.got is not None:
        lines.append("  got:")
        lines.extend(f"    {line}" for line in plan_lines(result.got))
    return lines


def report_text(report: Report, verbose: bool = False) -> str:
    lines: list[str] = []
    for suite in report.suites:
        lines.extend(f"ERROR {e}" for e in suite.suite.errors)
        for result in suite.cases:
            if verbose or result.status != PASSED:
                lines.extend(case_text(result))
    passed, failed, errors = report.count(PASSED), report.count(FAILED), report.count(ERROR)
    errors += len(report.load_errors)
    files = len(report.suites)
    total = sum(len(s.cases) for s in report.suites)
    lines.append(
        f"{passed} passed, {failed} failed, {errors} error(s) ({total} case(s) in {files} file(s))"
    )
    return "\n".join(lines)


def report_json(report: Report) -> dict[str, Any]:
    """``falco-talon test -o json``: counts, then each file with its cases."""
    return {
        "passed": report.count(PASSED),
        "failed": report.count(FAILED),
        "errors": report.count(ERROR) + len(report.load_errors),
        "exit_code": report.exit_code,
        "files": [
            {
                "file": s.suite.file,
                "errors": [str(e) for e in s.suite.errors],
                "cases": [
                    {
                        "name": c.case.name,
                        "at": str(c.case.position),
                        "status": c.status,
                        "problems": [p.as_dict() for p in c.problems],
                        "got": c.got,
                    }
                    for c in s.cases
                ],
            }
            for s in report.suites
        ],
    }


def junit_xml(report: Report) -> str:
    """JUnit XML (the schema CI systems read): a testsuite per file, a testcase per case;
    ``failure`` for an expectation not met, ``error`` for an invalid file or event."""
    root = ET.Element("testsuites", name="falco-talon test")
    totals = {"tests": 0, "failures": 0, "errors": 0}
    total_time = 0.0
    for s in report.suites:
        suite = ET.SubElement(root, "testsuite", name=s.suite.file, file=s.suite.file)
        counts = {"tests": 0, "failures": 0, "errors": 0}
        seconds = 0.0
        for error in s.suite.errors:
            counts["tests"] += 1
            counts["errors"] += 1
            tc = ET.SubElement(
                suite,
                "testcase",
                name=f"(load) {error.position}",
                classname=_classname(s),
                file=s.suite.file,
                line=str(error.position.line),
                time="0",
            )
            ET.SubElement(tc, "error", message=error.message, type="invalid test file").text = str(
                error
            )
        for c in s.cases:
            counts["tests"] += 1
            seconds += c.seconds
            tc = ET.SubElement(
                suite,
                "testcase",
                name=c.case.name,
                classname=_classname(s),
                file=c.case.file,
                line=str(c.case.position.line),
                time=f"{c.seconds:.6f}",
            )
            if c.status == PASSED:
                continue
            text = "\n".join(case_text(c))
            first = c.problems[0].message if c.problems else c.status
            if c.status == ERROR:
                counts["errors"] += 1
                ET.SubElement(tc, "error", message=first, type="invalid test").text = text
            else:
                counts["failures"] += 1
                ET.SubElement(tc, "failure", message=first, type="expectation").text = text
        for k, v in counts.items():
            suite.set(k, str(v))
            totals[k] += v
        suite.set("skipped", "0")
        suite.set("time", f"{seconds:.6f}")
        total_time += seconds
    for k, v in totals.items():
        root.set(k, str(v))
    root.set("time", f"{total_time:.6f}")
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _classname(s: SuiteResult) -> str:
    return Path(s.suite.file).with_suffix("").as_posix().replace("/", ".").lstrip(".")


# -- recording ---------------------------------------------------------------------------------


RECORD_HEADER = (
    "# Recorded by `falco-talon test --record` from what the engine does today with these\n"
    "# rules: review every expectation before committing; then `falco-talon test` keeps it so.\n"
)


def expectation(got: Mapping[str, Any]) -> dict[str, Any]:
    """The full expectation that ``got`` (an explain record) meets: matched, steps, notifiers."""
    if not got["matched"]:
        return {"matched": _FlowList()}
    steps = []
    for s in got["steps"]:
        step = {k: s[k] for k in ("stage", "rule", "action") if k in s}
        if s.get("action_name"):
            step["action_name"] = s["action_name"]
        step["outcome"] = s["outcome"]
        if s.get("reason"):
            step["reason"] = s["reason"]
        steps.append(_Flow(step))
    notifiers = {rule: _FlowList(names) for rule, names in got["notifiers"].items()}
    return {"matched": _FlowList(got["matched"]), "steps": steps, "notifiers": notifiers}


async def record(
    events: Sequence[tuple[Path, FalcoEvent]],
    rules: RuleSet,
    actionners: ActionnerRegistry,
    default_notifiers: tuple[str, ...] = (),
    base: Path | None = None,
    inline: bool = False,
) -> str:
    """A test file (YAML) with one case per event, expecting what happens today. Event paths
    are written relative to ``base`` (the test file's folder), or inline."""
    cases: list[dict[str, Any]] = []
    names: set[str] = set()
    for path, event in events:
        got = explain_json(await explain(event, rules, actionners, default_notifiers))
        name = f"{path.stem}: {event.rule} ({event.priority})"
        n = 2
        while name in names:
            name = f"{path.stem}: {event.rule} ({event.priority}) #{n}"
            n += 1
        names.add(name)
        ref = _event_ref(path, base, inline)
        cases.append({"name": name, "event": ref, "expect": expectation(got)})

    return RECORD_HEADER + _dump({"tests": cases})


def _event_ref(path: Path, base: Path | None, inline: bool) -> Any:
    if inline:
        return orjson.loads(path.read_bytes())
    return os.path.relpath(path.resolve(), (base or Path.cwd()).resolve())


class _Flow(dict[str, Any]):
    """A mapping written on one line (``{rule: X, outcome: planned}``): a recorded step."""


class _FlowList(list[Any]):
    """A list written on one line: recorded rule and notifier names."""


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


_Dumper.add_representer(
    _Flow, lambda d, data: d.represent_mapping("tag:yaml.org,2002:map", data, flow_style=True)
)

_Dumper.add_representer(
    _FlowList, lambda d, data: d.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)
)


def _dump(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=4096)
