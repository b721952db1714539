"""Falco Talon v0.3 configuration keys and variables, beside today's, and the v0.3 commands.

Real: config files on disk read by the loader, the installed notifiers, the CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from engine.cli import cli
from engine.config import ConfigError, config_schema, load_settings, redacted
from engine.contract.notifiers import NotifierRegistry
from engine.plugins import load_plugins


@pytest.fixture
def notifiers() -> NotifierRegistry:
    return load_plugins()[1]


def test_a_v03_config_file_gives_the_same_settings_as_its_camelcase_twin(
    notifiers: NotifierRegistry,
) -> None:
    v03 = load_settings("examples/v03/config.yaml", notifiers, env={})
    camel = load_settings("examples/v03/config-camel.yaml", notifiers, env={})
    assert v03 == camel
    # what the server logs as its "effective configuration" at start-up
    assert redacted(v03, notifiers) == redacted(camel, notifiers)
    assert v03.server.listen_port == 2803  # quoted in the v0.3 file
    assert v03.tracing.endpoint == "otel-collector.monitoring:4317"
    assert v03.notifications.notifiers["webhook"]["method"] == "PUT"
    assert v03.logging.print_all_events is True


def test_v03_environment_variables_give_the_same_settings_as_todays(
    notifiers: NotifierRegistry,
) -> None:
    url = "https://hooks.slack.com/services/T0/B0/x"
    v03 = {
        "LISTEN_ADDRESS": "127.0.0.2",
        "LISTEN_PORT": "2900",
        "RULES_FILES": "a.yaml b.yaml",
        "WATCH_RULES": "false",
        "PRINT_ALL_EVENTS": "true",
        "LOG_FORMAT": "json",
        "DEFAULT_NOTIFIERS": "slack",
        "NOTIFIERS_SLACK_WEBHOOK_URL": url,
        "NOTIFIERS_WEBHOOK_URL": "https://example.com/hook",
        "NOTIFIERS_WEBHOOK_HTTP_METHOD": "PUT",
        "OTEL_TRACES_ENABLED": "true",
        "OTEL_COLLECTOR_ENDPOINT": "collector",
        "OTEL_COLLECTOR_PORT": "4317",
        "OTEL_COLLECTOR_USE_INSECURE_GRPC": "false",
        "DEDUPLICATION_LEADER_ELECTION": "false",
        "DEDUPLICATION_TIME_WINDOW_SECONDS": "9",
    }
    camel = {
        "LISTENADDRESS": "127.0.0.2",
        "LISTENPORT": "2900",
        "RULESFILE": "a.yaml,b.yaml",
        "WATCHRULES": "false",
        "PRINTALLEVENTS": "true",
        "LOGFORMAT": "json",
        "DEFAULTNOTIFIERS": "slack",
        "NOTIFIERS_SLACK_WEBHOOKURL": url,
        "NOTIFIERS_WEBHOOK_URL": "https://example.com/hook",
        "NOTIFIERS_WEBHOOK_METHOD": "PUT",
        "OTEL_ENABLED": "true",
        "OTEL_ENDPOINT": "collector:4317",
        "OTEL_INSECURE": "false",
        "DEDUPLICATION_LEADERELECTION": "false",
        "DEDUPLICATION_TIMEWINDOWSECONDS": "9",
    }
    a = load_settings(None, notifiers, env=v03)
    b = load_settings(None, notifiers, env=camel)
    assert a == b
    assert a.rules.files == ["a.yaml", "b.yaml"]
    assert a.deduplication.time_window_seconds == 9
    assert a.notifications.notifiers["slack"]["webhookurl"] == url


def test_one_file_with_both_spellings_of_a_key_is_an_error_naming_both(
    tmp_path: Path, notifiers: NotifierRegistry
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "listenPort: 2803\nlisten_port: 2804\nnotifiers:\n  slack:\n"
        "    webhookurl: https://a.example\n    webhook_url: https://b.example\n"
    )
    with pytest.raises(ConfigError) as info:
        load_settings(str(path), notifiers, env={})
    assert str(info.value).splitlines()[1:] == [
        f"  {path}:2:1: listen_port (Falco Talon v0.3) and listenPort at {path}:1:1 are the "
        "same setting; keep one (at $.listen_port)",
        f"  {path}:6:5: notifiers.slack.webhook_url (Falco Talon v0.3) and "
        f"notifiers.slack.webhookurl at {path}:5:5 are the same setting; keep one "
        "(at $.notifiers.slack.webhook_url)",
    ]


def test_both_spellings_of_a_variable_with_different_values_is_an_error(
    notifiers: NotifierRegistry,
) -> None:
    with pytest.raises(ConfigError, match=r"environment LISTEN_PORT .* and LISTENPORT"):
        load_settings(None, notifiers, env={"LISTEN_PORT": "1", "LISTENPORT": "2"})


def test_a_bad_v03_value_is_reported_at_its_position(
    tmp_path: Path, notifiers: NotifierRegistry
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("log_format: color\nwatch_rules: sometimes\n")
    with pytest.raises(ConfigError, match=rf"{path}:2:14: must be boolean"):
        load_settings(str(path), notifiers, env={})


def test_the_config_schema_offers_both_spellings(notifiers: NotifierRegistry) -> None:
    schema = config_schema(notifiers)
    props = schema["properties"]
    assert {"listenPort", "listen_port", "rulesFile", "rules_files"} <= set(props)
    assert {"enabled", "traces_enabled", "collector_endpoint"} <= set(props["otel"]["properties"])
    assert {"webhookurl", "webhook_url"} <= set(
        props["notifiers"]["properties"]["slack"]["properties"]
    )
    assert {"leader_election", "leaderElection"} <= set(props["deduplication"]["properties"])
    committed = json.loads(Path("schemas/config.schema.json").read_text())
    assert "listen_port" in committed["properties"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("actionners", "list"), "kubernetes:terminate"),
        (("notifiers", "list"), "slack"),
        (("outputs", "list"), "no outputs installed"),
        (("rules", "check", "-r", "examples/v03/rules.yaml"), "3 rule(s) in 1 file(s): valid"),
        (("rules", "print", "-r", "examples/v03/rules.yaml"), "- rule: Shell in a container"),
    ],
)
def test_the_v03_commands(args: tuple[str, ...], expected: str) -> None:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output
    assert expected in result.output


def test_outputs_list_as_json_is_an_empty_list() -> None:
    result = CliRunner().invoke(cli, ["outputs", "list", "-o", "json"])
    assert (result.exit_code, json.loads(result.output)) == (0, [])


def test_check_reads_the_rules_files_a_v03_config_names() -> None:
    result = CliRunner().invoke(cli, ["check", "-c", "examples/v03/config.yaml"])
    assert (result.exit_code, result.output) == (0, "5 rule(s) in 2 file(s): valid\n")
