"""Scaling out with NATS JetStream.

Real: nats-server processes (built from the Go module proxy by ``tests/env/build.sh nats``,
JetStream file store under the test's tmp dir, stopped and killed by pid), and falco-talon
replicas, each the real CLI (``falco-talon server``) in its own process with the real
nats-py client and real HTTP. The only test-only parts are two actionners registered by
``tests/nats/replica.py`` (``test:mark`` writes the event id to a file shared by the
replicas, ``test:die`` SIGKILLs its replica, ``test:unavailable`` always fails
temporarily) and a kubeconfig naming an API server that is never contacted (no rule here
touches Kubernetes). Webhook notifications go to a real local HTTP receiver (the one of
tests/notifiers, served from a thread of its own: the replicas are other processes).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.env.natsserver import TestNats, free_port, nats_bin_dir
from tests.notifiers.conftest import Receiver

ROOT = Path(__file__).resolve().parents[2]
KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: none, cluster: {server: "https://127.0.0.1:9"}}]
users: [{name: none, user: {token: unused}}]
contexts: [{name: none, context: {cluster: none, user: none}}]
current-context: none
"""


def post(url: str, event: dict[str, Any], timeout: float = 10.0) -> tuple[int, dict[str, str], Any]:
    """POST an event; (status, headers, JSON body)."""
    req = urllib.request.Request(
        url + "/", data=json.dumps(event).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return int(resp.status), dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return int(e.code), dict(e.headers), json.loads(e.read())


class Replica:
    """One falco-talon replica process."""

    def __init__(
        self,
        workdir: Path,
        name: str,
        config: dict[str, Any],
        rules: str,
        env: dict[str, str] | None = None,
    ) -> None:
        self.env = env or {}
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (self.dir / "kubeconfig").write_text(KUBECONFIG)
        cfg = {
            "listenAddress": "127.0.0.1",
            "listenPort": self.port,
            "logFormat": "json",
            "watchRules": False,
            "kubeConfig": str(self.dir / "kubeconfig"),
            **config,
        }
        (self.dir / "config.yaml").write_text(json.dumps(cfg))
        (self.dir / "rules.yaml").write_text(rules)
        self.log_path = self.dir / "replica.log"
        self.marks = workdir / "marks"
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    def start(self, wait_for: str = "NATS connected") -> Replica:
        self.runs += 1
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the process
        env = {**os.environ, "TALON_TEST_MARKS": str(self.marks), **self.env}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.nats.replica",
                "server",
                "-c",
                str(self.dir / "config.yaml"),
                "-r",
                str(self.dir / "rules.yaml"),
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.count(wait_for) >= self.runs:  # (it may have died since: a poison event)
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited: {self.log_path.read_text()[-3000:]}")
            time.sleep(0.05)
        raise AssertionError(f"{self.name} not ready: {self.log_path.read_text()[-3000:]}")

    def records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def count(self, text: str) -> int:
        return sum(1 for r in self.records() if text in str(r.get("message", r.get("msg", ""))))

    def finished(self) -> Counter[str]:
        """Event id -> runs that reached a final state and were acked, in this replica."""
        return Counter(
            str(r.get("event_id"))
            for r in self.records()
            if str(r.get("message", r.get("msg", ""))).startswith("event run finished")
        )

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith(name + " ") or line.startswith(name + "{"):
                    return float(line.rsplit(" ", 1)[1])
        return 0.0

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def marks(path: Path) -> Counter[str]:
    return Counter(path.read_text().split()) if path.exists() else Counter()


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="session")
def nats_built() -> Path:
    return nats_bin_dir()


@pytest.fixture
def nats_server(tmp_path: Path, nats_built: Path) -> Iterator[TestNats]:
    server = TestNats(tmp_path / "nats")
    server.start()
    yield server
    server.kill()


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[list[Replica]]:
    made: list[Replica] = []
    yield made
    for r in made:
        r.kill()


@pytest.fixture
def webhook() -> Iterator[Receiver]:
    """A real HTTP receiver for the ``webhook`` notifier of replica processes: it records
    every request and answers 200, served by its own event loop in a thread."""
    rec = Receiver()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="webhook-receiver", daemon=True)
    thread.start()

    async def serve() -> web.AppRunner:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", rec.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        rec.base = f"http://127.0.0.1:{port}"
        return runner

    runner = asyncio.run_coroutine_threadsafe(serve(), loop).result(10)
    yield rec
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()
