"""What the chart renders is what the server accepts: its config and rules directory pass
``falco-talon check``, load in the intended order, and start a server that is healthy."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.chart.conftest import FALCO_TALON, Rendered
from tests.conftest import FALCO_EVENT
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
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
