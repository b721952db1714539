"""What the chart renders is what the server accepts: its config and rules directory pass
``falco-talon check``, load in the intended order, and start a server that is healthy."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.chart.conftest import FALCO_TALON, Rendered
from tests.conftest import FALCO_EVENT
from tests.env.natsserver import TestNats
from tests.env.testenv import TestEnvInfo, free_port


@pytest.fixture(params=["default", "all-options"])
def rendered(request: pytest.FixtureRequest) -> Rendered:
    name = "default_render" if request.param == "default" else "all_render"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]


def test_the_rendered_config_and_rules_pass_falco_talon_check(
    rendered: Rendered, tmp_path: Path
) -> None:
    config, rules = rendered.write(tmp_path)
    res = subprocess.run(
        [str(FALCO_TALON), "check", "-c", str(config), "-r", str(rules)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "valid" in res.stdout


def test_the_server_evaluates_rules_override_after_the_rules(
    all_render: Rendered, tmp_path: Path
) -> None:
    config, rules = all_render.write(tmp_path)
    event = tmp_path / "event.json"
    event.write_text(json.dumps(FALCO_EVENT | {"priority": "Critical"}))
    res = subprocess.run(
        [
            *(str(FALCO_TALON), "explain", "-c", str(config), "-r", str(rules)),
            *("--event", str(event), "-o", "json"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(res.stdout)["matched"] == ["Isolate", "Label", "Forensics", "Terminate"]


def post_event(port: int, log: Path) -> tuple[int, str]:
    """POST one event: (202, "accepted") once stored in the stream. A 503 (the store's
    acknowledgement slower than 2 s, seen once on a loaded CI machine) says "retry later",
    and a sender that retries sends it again after Retry-After; so does this, a few times."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/", data=json.dumps(FALCO_EVENT).encode()
    )
    reply: tuple[int, str] = (0, "")
    for _ in range(3):
        try:
            with urllib.request.urlopen(request, timeout=5) as r:
                return r.status, json.loads(r.read())["status"]
        except urllib.error.HTTPError as exc:
            assert exc.code == 503 and exc.headers["Retry-After"], log.read_text()
            reply = (exc.code, json.loads(exc.read())["error"])
            time.sleep(float(exc.headers["Retry-After"]))
    return reply


@pytest.mark.kubernetes
def test_the_rendered_config_and_rules_start_a_healthy_server(
    rendered: Rendered, tmp_path: Path, testenv: TestEnvInfo
) -> None:
    config, rules = rendered.write(tmp_path)
    port = free_port()
    log = tmp_path / "server.log"
    # kubeConfig is empty in the rendered config (in-cluster in the pod); KUBECONFIG, the
    # environment form of that setting, points this local run at the test apiserver.
    env = {**os.environ, "KUBECONFIG": str(testenv.kubeconfig)}
    nats_server = None
    if "nats" in rendered.config():
        # The same for the queue: a real nats-server requiring a token, reached through
        # NATS_URL and NATS_TOKENFILE; the stream, subject and the rest are the rendered ones.
        token = tmp_path / "nats-token"
        token.write_text("4f1c0de5a1e")
        nats_server = TestNats(tmp_path / "nats", token="4f1c0de5a1e")
        env |= {"NATS_URL": nats_server.start(), "NATS_TOKENFILE": str(token)}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                *(str(FALCO_TALON), "server", "-c", str(config), "-r", str(rules)),
                *("--listen-address", "127.0.0.1", "--listen-port", str(port)),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        status, body = 0, {}
        deadline = time.monotonic() + 90  # a loaded CI machine starts it slowly
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                    status, body = r.status, json.loads(r.read())
                break
            except OSError:
                time.sleep(0.1)
        assert status == 200, f"exit {proc.poll()}; log:\n{log.read_text()}"
        assert body["status"] == "ok"
        assert body["rules"] == sum(
            len(yaml.safe_load(text)) for text in rendered.rules_files().values()
        )
        if nats_server is not None:
            stream = rendered.config()["nats"]["stream"]
            while time.monotonic() < deadline and "NATS connected" not in log.read_text():
                time.sleep(0.1)
            connected = [x for x in log.read_text().splitlines() if "NATS connected" in x]
            assert connected and stream in connected[0], log.read_text()
            assert post_event(port, log) == (202, "accepted"), log.read_text()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        if nats_server is not None:
            nats_server.stop()
