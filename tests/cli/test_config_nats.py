"""The ``nats`` section and the deduplication window: file keys, variables, the v0.3
spelling, validation, and the token never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import ConfigError, load_settings, redacted
from engine.contract.notifiers import NotifierRegistry
from engine.plugins import load_plugins


@pytest.fixture
def notifiers() -> NotifierRegistry:
    return load_plugins()[1]


def test_nats_is_off_by_default_and_dedup_is_five_seconds(notifiers: NotifierRegistry) -> None:
    settings = load_settings(None, notifiers, env={})
    assert settings.nats.url == ""
    assert settings.nats.stream == "FALCO_TALON"
    assert (settings.nats.ack_wait, settings.nats.max_deliver) == (30.0, 5)
    assert settings.deduplication.time_window_seconds == 5


def test_nats_from_the_environment(notifiers: NotifierRegistry) -> None:
    env = {
        "NATS_URL": "nats://10.0.0.1:4222",
        "NATS_STREAM": "EVENTS",
        "NATS_TOKENFILE": "/run/token",
        "NATS_TLS": "caFile=/ca.pem,certFile=/c.pem,keyFile=/k.pem",
        "NATS_ACKWAIT": "10",
        "NATS_MAXDELIVER": "3",
        "DEDUPLICATION_TIME_WINDOW_SECONDS": "9",
    }
    s = load_settings(None, notifiers, env=env)
    assert (s.nats.url, s.nats.stream, s.nats.token_file) == (
        "nats://10.0.0.1:4222",
        "EVENTS",
        "/run/token",
    )
    assert s.nats.tls == {"caFile": "/ca.pem", "certFile": "/c.pem", "keyFile": "/k.pem"}
    assert (s.nats.ack_wait, s.nats.max_deliver) == (10.0, 3)
    assert s.deduplication.time_window_seconds == 9


def test_the_v03_dedup_window_sets_the_window(tmp_path: Path, notifiers: NotifierRegistry) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("deduplication:\n  leader_election: true\n  time_window_seconds: 12\n")
    assert load_settings(str(path), notifiers, env={}).deduplication.time_window_seconds == 12


def test_the_token_is_never_shown(tmp_path: Path, notifiers: NotifierRegistry) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("nats:\n  url: nats://127.0.0.1:4222\n  token: hunter2-token\n")
    shown = redacted(load_settings(str(path), notifiers, env={}), notifiers)
    assert shown["nats"]["token"] == "********"
    path.write_text("nats:\n  url: localhost\n  token: hunter2-token\n")
    with pytest.raises(ConfigError) as err:
        load_settings(str(path), notifiers, env={})
    assert "nats.url" in str(err.value) or "$.nats.url" in str(err.value)
    assert "hunter2" not in str(err.value)


def test_a_bad_throttle_is_reported(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from engine.cli import cli

    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "- name: x\n  action: {name: kubernetes:terminate}\n"
        "  throttle: {max: 0, per: cluster, within: soon}\n"
    )
    result = CliRunner().invoke(cli, ["check", "-r", str(rules)])
    assert result.exit_code == 1
    out = result.output
    assert "throttle.max" in out and "throttle.per" in out and "throttle.within" in out
    assert "is not a duration" in out


@pytest.mark.parametrize(
    ("seed", "token", "complaint"),
    [
        (b"SUAKZ-not-checked-here", "t0ken", "nkeySeedFile and token/tokenFile are exclusive"),
        (b"-----BEGIN PRIVATE KEY-----", "", "holds no user NKEY seed"),
        (None, "", "cannot read"),
    ],
    ids=["with-a-token", "not-a-seed", "missing"],
)
def test_an_unusable_nkey_seed_file_stops_the_start_with_the_reason(
    tmp_path: Path, seed: bytes | None, token: str, complaint: str
) -> None:
    from engine.natsqueue import NatsConfig, NatsQueue

    path = tmp_path / "user.nk"
    if seed is not None:
        path.write_bytes(seed)
    queue = NatsQueue(NatsConfig("nats://127.0.0.1:4222", token=token, nkey_seed_file=str(path)))
    with pytest.raises(ConfigError) as err:
        queue._connect_options()
    assert complaint in str(err.value)
    assert "SUAKZ" not in str(err.value) and "t0ken" not in str(err.value)
