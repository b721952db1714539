"""The listener's settings: tls.*, auth.*, headerTimeout, bodyTimeout, probesPort from the
file and the environment; the token is a secret, never shown."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.config import ConfigError, load_settings, redacted
from engine.contract.notifiers import NotifierRegistry

TOKEN = "tok-4f9a-never-printed"


def test_listener_settings_come_from_the_file_and_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "tls:\n  certFile: /tls/tls.crt\n  keyFile: /tls/tls.key\n"
        "auth:\n  tokenFile: /auth/token\nheaderTimeout: 5\nprobesPort: 2804\n"
    )
    s = load_settings(
        str(path),
        NotifierRegistry(),
        env={"TLS_CLIENTCAFILE": "/ca/ca.crt", "BODYTIMEOUT": "12.5"},
    )
    assert (s.tls.cert_file, s.tls.key_file, s.tls.client_ca_file) == (
        "/tls/tls.crt",
        "/tls/tls.key",
        "/ca/ca.crt",
    )
    assert s.auth.token_file == "/auth/token"
    assert (s.server.header_timeout, s.server.body_timeout, s.server.probes_port) == (
        5,
        12.5,
        2804,
    )


def test_the_token_from_the_environment_is_never_shown(tmp_path: Path) -> None:
    s = load_settings(None, NotifierRegistry(), env={"AUTH_TOKEN": TOKEN})
    assert s.auth.token == TOKEN
    shown = json.dumps(redacted(s, NotifierRegistry()))
    assert TOKEN not in shown and '"token": "********"' in shown
    assert TOKEN not in repr(s)


def test_a_bad_listener_setting_names_its_origin_without_the_token(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(f"auth:\n  token: {TOKEN}\n  tokenfile: /x\nheaderTimeout: 0\n")
    with pytest.raises(ConfigError) as err:
        load_settings(str(path), NotifierRegistry(), env={})
    message = str(err.value)
    assert f"{path}:3:14" in message and "did you mean 'tokenFile'" in message
    assert f"{path}:4:16" in message and "headerTimeout" in message
    assert TOKEN not in message
