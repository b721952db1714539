"""The rules loader and the config loader against any bytes and any YAML: a rule set or
``RulesInvalid``, settings or ``ConfigError``, every error at ``FILE:LINE:COLUMN``; never an
escaping exception, a hang or growing memory. Includes the classic YAML bombs by name."""

from __future__ import annotations

import contextlib
import re
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from engine.config import ConfigError, load_settings
from engine.plugins import load_plugins
from engine.rules import RulesInvalid, RulesLoader

AT = re.compile(r"^(invalid configuration:\n  )?\S+:\d+:\d+: ", re.MULTILINE)
"""An error message that starts at FILE:LINE:COLUMN."""

ACTIONNERS, NOTIFIERS = load_plugins()
LOADER = RulesLoader(ACTIONNERS, NOTIFIERS)

yaml_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text()
    | st.sampled_from(["rule", "action", "name", "kubernetes:terminate", "listenPort", "otel"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "name",
                    "match",
                    "action",
                    "rules",
                    "parameters",
                    "listenPort",
                    "notifiers",
                    "otel",
                ]
            )
            | st.text(max_size=8),
            children,
            max_size=4,
        )
    ),
    max_leaves=25,
)

yaml_snippets = st.lists(
    st.sampled_from(
        [
            "- ",
            "name: ",
            "action: ",
            "{",
            "}",
            "[",
            "]",
            "&a ",
            "*a",
            "<<: ",
            "!!binary ",
            "!!timestamp ",
            "!foo ",
            ".nan",
            ".inf",
            "? ",
            ": ",
            "\n",
            "  ",
            "'",
            '"',
            "#",
            "2001-13-45",
            "0x1F",
            "1e999",
            "~",
            "|",
            ">",
            "---\n",
            "...\n",
            "%YAML 1.1\n",
            "\t",
            "kubernetes:terminate",
            "rule: x",
            "\\u0000",
        ]
    ),
    max_size=40,
).map("".join)


def load_rules_cleanly(file: str, text: str) -> None:
    start = time.monotonic()
    try:
        LOADER.load_texts([(file, text)])
    except RulesInvalid as exc:
        assert exc.errors
        for error in exc.errors:
            assert AT.match(str(error)), str(error)
    assert time.monotonic() - start < 5


def load_config_cleanly(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    start = time.monotonic()
    try:
        load_settings(str(path), NOTIFIERS, env={})
    except ConfigError as exc:
        assert AT.match(str(exc)), str(exc)
    assert time.monotonic() - start < 5


@given(st.text(max_size=500))
def test_any_text_is_a_rule_set_or_rules_invalid(text: str) -> None:
    load_rules_cleanly("rules.yaml", text)


@given(yaml_snippets)
def test_any_yaml_ish_text_is_a_rule_set_or_rules_invalid(text: str) -> None:
    load_rules_cleanly("rules.yaml", text)


@given(yaml_values)
def test_any_yaml_document_is_a_rule_set_or_rules_invalid(value: Any) -> None:
    load_rules_cleanly("rules.yaml", yaml.safe_dump(value))


@given(st.binary(max_size=300) | yaml_snippets.map(str.encode))
def test_any_bytes_are_settings_or_a_config_error(tmp_path: Path, data: bytes) -> None:
    load_config_cleanly(tmp_path / "config.yaml", data)


@given(yaml_values)
def test_any_yaml_document_is_settings_or_a_config_error(tmp_path: Path, value: Any) -> None:
    load_config_cleanly(tmp_path / "config.yaml", yaml.safe_dump(value).encode())


def billion_laughs(levels: int = 9) -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        name, prev = chr(97 + i), chr(96 + i)
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


BOMBS: list[tuple[str, str, str]] = [
    ("billion laughs", billion_laughs(), "alias bomb"),
    (
        "billion laughs inside a rule",
        "- name: x\n  action:\n    name: kubernetes:labelize\n    parameters:\n      labels:\n"
        + "".join("        " + line + "\n" for line in billion_laughs().splitlines()),
        "alias bomb",
    ),
    ("a recursive alias", "a: &a [*a]\n", "recursive alias"),
    ("a recursive mapping", "&a {x: *a}\n", "recursive alias"),
    ("100,000 nested lists", "[" * 100_000 + "]" * 100_000, "nested deeper than"),
    ("5,000 nested mappings", "{a: " * 5000 + "1" + "}" * 5000, "nested deeper than"),
    ("an impossible date", "- name: 2001-13-45\n  action: {name: x}\n", "month must be in 1..12"),
    ("an unknown tag", "listenPort: !foo 1\n", "could not determine a constructor"),
    ("a 5,000-digit integer", "listenPort: 1" + "0" * 5000 + "\n", "cannot read this value"),
    ("NaN", "actionTimeout: .nan\n", "not a finite number"),
    ("Infinity", "shutdownTimeout: .inf\n", "not a finite number"),
    ("binary", "listenAddress: !!binary aGVsbG8=\n", "binary values"),
    ("a list as a key", "? [a, b]\n: c\n", "a key must be a plain value"),
    ("a merge of a scalar", "a: {<<: 5}\n", "for merging"),
    ("duplicate keys", "dryRun: true\ndryRun: false\n", "duplicate key 'dryRun'"),
    ("an empty timestamp", "listenAddress: !!timestamp ''\n", "cannot read this value"),
    ("a NUL character", "listenAddress: a\x00b\n", "unacceptable character"),
]


@pytest.mark.parametrize(("name", "text", "error"), BOMBS, ids=[b[0] for b in BOMBS])
def test_named_yaml_bombs_are_clean_errors_in_rules_and_config(
    tmp_path: Path, name: str, text: str, error: str
) -> None:
    start = time.monotonic()
    with pytest.raises(RulesInvalid) as rules_err:
        LOADER.load_texts([("rules.yaml", text)])
    with pytest.raises(ConfigError) as config_err:
        (tmp_path / "config.yaml").write_text(text)
        load_settings(str(tmp_path / "config.yaml"), NOTIFIERS, env={})
    assert time.monotonic() - start < 10
    for message in (str(rules_err.value), str(config_err.value)):
        assert AT.match(message), message
    if name != "an impossible date":  # the config sees a list, not a mapping, first
        assert error in str(config_err.value)
    assert error in str(rules_err.value) or name in ("duplicate keys",)


def test_invalid_utf8_is_reported_at_its_line_and_column(tmp_path: Path) -> None:
    data = b"dryRun: true\nlistenAddress: 'caf\xe9'\n"
    config = tmp_path / "config.yaml"
    config.write_bytes(data)
    with pytest.raises(ConfigError, match=r"config.yaml:2:20: not valid UTF-8 \(byte 0xe9\)"):
        load_settings(str(config), NOTIFIERS, env={})
    rules = tmp_path / "rules.yaml"
    rules.write_bytes(b"- name: caf\xe9\n")
    with pytest.raises(RulesInvalid, match=r"rules.yaml:1:12: not valid UTF-8"):
        LOADER.load([rules])


def test_loading_bombs_again_and_again_does_not_grow_memory() -> None:
    small = [t for n, t, _ in BOMBS if "laughs" not in n and "nested" not in n]

    def once() -> None:
        for text in small:
            with contextlib.suppress(RulesInvalid):
                LOADER.load_texts([("rules.yaml", text)])

    once()
    once()
    tracemalloc.start()
    try:
        once()
        before = tracemalloc.take_snapshot()
        for _ in range(5):
            once()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert grown < 100 * 1024
