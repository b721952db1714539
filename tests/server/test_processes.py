"""``processes: 2``: a supervisor and two server processes sharing one port.

Real: ``falco-talon server`` (through ``tests/nats/replica.py``, which registers the
test-only ``test:mark`` actionner first: it appends the event id to a file the processes
share) started as a subprocess, its two server processes forked by it, the kernel spreading
connections over them (SO_REUSEPORT), real HTTP, real signals. A connection kept open is
served by one process; ``/healthz`` on it says which (``pid``), so a test can send on
purpose to one process and then to the other.
"""

from __future__ import annotations

import copy
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FALCO_EVENT, poll
from tests.env.natsserver import free_port
from tests.nats.conftest import KUBECONFIG

ROOT = Path(__file__).resolve().parents[2]
MARK = "- name: mark\n  action: {name: test:mark, parameters: {seconds: %s}}\n"
THROTTLED = (
    "- name: once a minute\n  action: {name: test:mark}\n"
    "  throttle: {max: 1, per: pod, within: 60s}\n"
)


def event(**over: Any) -> dict[str, Any]:
    out = copy.deepcopy(FALCO_EVENT)
    out["uuid"] = str(uuid.uuid4())
    out.update(over)
    return out


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line[len(name)] not in " {":
            continue
        series, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(value)
    return total


class Talon:
    """The supervisor (the process the test started) and what it logs."""

    def __init__(self, tmp_path: Path, rules: str, **config: Any) -> None:
        self.dir = tmp_path
        self.port = free_port()
        (tmp_path / "kubeconfig").write_text(KUBECONFIG)
        cfg = {
            "listenAddress": "127.0.0.1",
            "listenPort": self.port,
            "logFormat": "json",
            "watchRules": False,
            "kubeConfig": str(tmp_path / "kubeconfig"),
            "processes": 2,
            **config,
        }
        (tmp_path / "config.yaml").write_text(json.dumps(cfg))
        self.rules = tmp_path / "rules.yaml"
        self.rules.write_text(rules)
        self.log = tmp_path / "talon.log"
        self.marks = tmp_path / "marks"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> Talon:
        files = ["-c", str(self.dir / "config.yaml"), "-r", str(self.rules)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.nats.replica", "server", *files],
                cwd=ROOT,
                env={**os.environ, "TALON_TEST_MARKS": str(self.marks)},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if wait:
            poll(lambda: self.raise_if_exited() or bool(self.lines("server processes listening")))
        return self

    def raise_if_exited(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"exited {self.proc.returncode}: {self.log.read_text()[-3000:]}")
        return False

    def records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def lines(self, message: str) -> list[dict[str, Any]]:
        return [r for r in self.records() if str(r.get("message", "")).startswith(message)]

    def pids(self) -> dict[int, int]:
        """Each server process's pid, by process number, as the supervisor announced them."""
        first = self.lines("server processes listening")[0]
        pids = {i + 1: int(p) for i, p in enumerate(first["pids"].split(","))}
        for again in self.lines("server process started again"):
            pids[again["server_process"]] = again["pid"]
        return pids

    def connection(self) -> tuple[http.client.HTTPConnection, int]:
        """A kept-open connection and the pid of the server process serving it."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        return conn, int(self.request(conn, "GET", "/healthz")[1]["pid"])

    def one_connection_each(self) -> dict[int, http.client.HTTPConnection]:
        """One kept-open connection to each server process."""
        out: dict[int, http.client.HTTPConnection] = {}
        for _ in range(200):
            conn, pid = self.connection()
            if pid in out:
                conn.close()
            else:
                out[pid] = conn
            if len(out) == 2:
                return out
        raise AssertionError(f"200 connections, all to {set(out)}")

    @staticmethod
    def request(
        conn: http.client.HTTPConnection, method: str, path: str, body: Any = None
    ) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        text = resp.read().decode()
        return resp.status, json.loads(text) if path != "/metrics" else text

    def once(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """A request on a connection of its own (the kernel picks the process)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            return self.request(conn, method, path, body)
        finally:
            conn.close()

    def marked(self) -> list[str]:
        return self.marks.read_text().split() if self.marks.exists() else []

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def gone(pid: int) -> bool:
    """The process exited (a zombie no one reaped yet counts)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except OSError:
        return True


@pytest.fixture
def talons(tmp_path: Path) -> Iterator[Callable[..., Talon]]:
    started: list[Talon] = []

    def make(rules: str, **config: Any) -> Talon:
        where = tmp_path / f"talon{len(started)}"
        where.mkdir()
        talon = Talon(where, rules, **config)
        started.append(talon)
        return talon

    yield make
    for talon in started:
        if talon.proc is not None:
            talon.stop()
            for pid in talon.pids().values() if talon.lines("server processes listening") else ():
                assert gone(pid), "a server process outlived its supervisor"


def test_one_process_serves_alone_as_before(talons: Callable[..., Talon]) -> None:
    talon = talons(MARK % 0, processes=1)
    talon.start(wait=False)
    poll(lambda: talon.raise_if_exited() or bool(talon.lines("listening")))
    assert talon.once("POST", "/", event())[0] == 202
    health = talon.once("GET", "/healthz")[1]
    assert not {"process", "processes", "pid"} & set(health)
    poll(lambda: len(talon.marked()) == 1)
    assert not talon.lines("starting server processes")
    assert all("process" not in r for r in talon.records())  # the logs do not change
    assert talon.stop() == 0


def test_both_server_processes_take_connections_and_handle_events(
    talons: Callable[..., Talon],
) -> None:
    talon = talons(MARK % 0).start()
    pids = set(talon.pids().values())
    assert len(pids) == 2 and talon.proc is not None and talon.proc.pid not in pids
    sent = [event() for _ in range(40)]
    assert [talon.once("POST", "/", e)[0] for e in sent] == [202] * 40
    poll(lambda: len(talon.marked()) == 40)
    assert sorted(talon.marked()) == sorted(e["uuid"] for e in sent)
    acted = {r["process"] for r in talon.lines("test:mark succeeded")}
    assert acted == {1, 2}  # each process logs its own actions, named
    health = [talon.once("GET", "/healthz")[1] for _ in range(20)]
    assert {h["pid"] for h in health} == pids
    assert {(h["processes"], h["process"]) for h in health} == {(2, 1), (2, 2)}


def test_events_sent_without_a_uuid_get_distinct_v4_ids_from_both_processes(
    talons: Callable[..., Talon],
) -> None:
    """The ids made up for events without a ``uuid`` are random version-4 UUIDs, and two
    forked server processes never make up the same ones (each draws its own sequence)."""
    talon = talons(MARK % 0).start()
    ids = []
    for n in range(60):
        sent = event(output=f"shell {n}")
        del sent["uuid"]
        status, reply = talon.once("POST", "/", sent)
        assert status == 202
        ids.append(reply["id"])
    poll(lambda: len(talon.marked()) == 60)
    assert sorted(talon.marked()) == sorted(ids)
    assert {r["process"] for r in talon.lines("test:mark succeeded")} == {1, 2}
    assert len(set(ids)) == 60
    assert {(uuid.UUID(i).version, str(uuid.UUID(i))) == (4, i) for i in ids} == {True}


def test_the_same_event_sent_to_both_processes_acts_once(talons: Callable[..., Talon]) -> None:
    talon = talons(MARK % 0).start()
    one, other = talon.one_connection_each().values()
    sidekick = event()
    assert talon.request(one, "POST", "/", sidekick) == (
        202,
        {"status": "accepted", "id": sidekick["uuid"]},
    )
    assert talon.request(other, "POST", "/", sidekick) == (
        200,
        {"status": "duplicate", "id": sidekick["uuid"]},
    )
    racing = event()  # and 20 connections at once, landing where the kernel puts them

    def post(_: int) -> int:
        return talon.once("POST", "/", racing)[0]

    with ThreadPoolExecutor(20) as pool:
        statuses = sorted(pool.map(post, range(20)))
    assert statuses == [200] * 19 + [202]
    poll(lambda: len(talon.marked()) == 2)
    time.sleep(1)  # nothing more comes
    assert sorted(talon.marked()) == sorted([sidekick["uuid"], racing["uuid"]])
    for conn in (one, other):
        text = talon.request(conn, "GET", "/metrics")[1]
        assert metric(text, "falco_talon_events_deduplicated_total") == 20
        assert metric(text, "falco_talon_actions_total", outcome="succeeded") == 2


def test_a_throttle_counts_the_actions_of_both_processes(talons: Callable[..., Talon]) -> None:
    talon = talons(THROTTLED, queueSize=2000).start()

    def post(_: int) -> int:
        return talon.once("POST", "/", event())[0]

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(post, range(400)))
    assert statuses == [202] * 400
    conns = talon.one_connection_each()

    def skipped(conn: http.client.HTTPConnection) -> float:
        text = talon.request(conn, "GET", "/metrics")[1]
        return metric(text, "falco_talon_actions_total", outcome="skipped")

    poll(lambda: all(skipped(c) == 399 for c in conns.values()))
    assert len(talon.marked()) == 1
    throttled = talon.lines("test:mark skipped")
    assert {r["process"] for r in throttled} == {1, 2}
    assert "throttled: 1 actions on pod demo/web-7d4b9c7f5d-x2x8k within 60s" in str(throttled[0])


def test_metrics_from_either_process_are_the_totals_of_both(talons: Callable[..., Talon]) -> None:
    talon = talons(MARK % 0).start()
    sent = 60
    assert [talon.once("POST", "/", event())[0] for _ in range(sent)] == [202] * sent
    poll(lambda: len(talon.marked()) == sent)
    conns = talon.one_connection_each()

    def totals(conn: http.client.HTTPConnection) -> tuple[float, ...]:
        text = talon.request(conn, "GET", "/metrics")[1]
        return (
            metric(text, "falco_talon_events_received_total"),
            metric(text, "falco_talon_events_processed_total", state="notified"),
            metric(text, "falco_talon_actions_total", actionner="test:mark"),
            metric(text, "falco_talon_event_processing_seconds_count"),
            metric(text, "falco_talon_queue_depth"),
        )

    poll(lambda: all(totals(c) == (sent, sent, sent, sent, 0) for c in conns.values()))
    text = talon.request(next(iter(conns.values())), "GET", "/metrics")[1]
    assert "# TYPE falco_talon_events_received_total counter" in text
    assert text.count("falco_talon_rules_info{") == 1
    assert text.count('falco_talon_spans_total{outcome="exported"}') == 1  # tracing off: 0


def test_sigterm_drains_both_processes_and_the_supervisor_exits_0(
    talons: Callable[..., Talon],
) -> None:
    talon = talons(MARK % 1.0, workers=2).start()
    conns = talon.one_connection_each()
    sent = [event() for _ in range(8)]
    for i, e in enumerate(sent):  # four to each process: two running, two queued
        assert talon.request(list(conns.values())[i % 2], "POST", "/", e)[0] == 202
    assert talon.proc is not None
    talon.proc.send_signal(signal.SIGTERM)
    assert talon.proc.wait(60) == 0
    assert sorted(talon.marked()) == sorted(e["uuid"] for e in sent)
    assert {r["process"] for r in talon.lines("stopped")} == {0, 1, 2}


def test_a_killed_server_process_is_started_again_while_the_other_keeps_serving(
    talons: Callable[..., Talon],
) -> None:
    talon = talons(MARK % 0).start()
    before = [event() for _ in range(20)]
    assert [talon.once("POST", "/", e)[0] for e in before] == [202] * 20
    poll(lambda: len(talon.marked()) == 20)
    time.sleep(1)  # the counts are written behind, every 0.5 s
    victim, survivor = talon.pids()[1], talon.pids()[2]
    os.kill(victim, signal.SIGKILL)
    poll(lambda: bool(talon.lines("server process died")))  # reaped: its socket is shut
    died = talon.lines("server process died")[0]
    assert (died["pid"], died["how"]) == (victim, "killed by signal 9")
    during = [event() for _ in range(20)]
    assert [talon.once("POST", "/", e)[0] for e in during] == [202] * 20
    poll(lambda: bool(talon.lines("server process started again")))
    now = set(talon.pids().values())
    assert victim not in now and survivor in now
    poll(lambda: {talon.once("GET", "/healthz")[1]["pid"] for _ in range(20)} == now)
    poll(lambda: len(talon.marked()) == 40)

    def received() -> float:
        return metric(talon.once("GET", "/metrics")[1], "falco_talon_events_received_total")

    poll(lambda: received() == 40)  # the dead process's counts stay in the totals


def test_invalid_rules_are_reported_once_by_the_supervisor(
    talons: Callable[..., Talon],
) -> None:
    talon = talons("- name: x\n  action: {name: test:nope}\n")
    talon.start(wait=False)
    assert talon.proc is not None and talon.proc.wait(60) == 1
    out = talon.log.read_text()
    assert out.count("'test:nope' is not a known actionner") == 1
    assert "starting server processes" not in out


def test_a_port_in_use_is_reported_once_by_the_supervisor(talons: Callable[..., Talon]) -> None:
    talon = talons(MARK % 0)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", talon.port))
        taken.listen()
        talon.start(wait=False)
        assert talon.proc is not None and talon.proc.wait(60) == 1
    out = talon.log.read_text()
    assert out.count(f"listenPort {talon.port} on 127.0.0.1: Address already in use") == 1
    assert "starting server processes" not in out


def test_a_server_process_that_keeps_failing_to_start_stops_the_supervisor_with_1(
    talons: Callable[..., Talon],
) -> None:
    talon = talons(MARK % 0).start()
    talon.rules.write_text("- name: x\n  action: {name: test:nope}\n")  # broken since checked
    os.kill(talon.pids()[1], signal.SIGKILL)
    assert talon.proc is not None and talon.proc.wait(90) == 1
    assert len(talon.lines("server process died: starting it again")) == 1
    assert len(talon.lines("server process failed to start: starting it again")) == 4
    assert talon.lines("server process failed to start 5 times in a row: stopping")
    assert talon.log.read_text().count("'test:nope' is not a known actionner") == 5
    assert {r["process"] for r in talon.lines("stopped")} == {0, 2}  # the other drained


def test_a_rules_change_is_reloaded_and_logged_by_each_process(
    talons: Callable[..., Talon],
) -> None:
    talon = talons(MARK % 0, watchRules=True).start()
    poll(lambda: len(talon.lines("watching rules")) == 2)
    first = talon.once("GET", "/healthz")[1]["rules_checksum"]
    talon.rules.write_text(MARK % 0 + "- name: another\n  action: {name: test:mark}\n")
    poll(lambda: len(talon.lines("rules reloaded")) == 2)
    assert {r["process"] for r in talon.lines("rules reloaded")} == {1, 2}
    for pid, conn in talon.one_connection_each().items():
        health = talon.request(conn, "GET", "/healthz")[1]
        assert (health["pid"], health["rules"]) == (pid, 2)
        assert health["rules_checksum"] != first


def test_server_processes_whose_supervisor_was_killed_stop_by_themselves(
    talons: Callable[..., Talon],
) -> None:
    talon = talons(MARK % 0).start()
    pids = talon.pids().values()
    assert talon.proc is not None
    talon.proc.kill()  # kill -9: nothing forwards SIGTERM, nothing reaps or cleans up
    talon.proc.wait(10)
    poll(lambda: all(gone(pid) for pid in pids))
    assert {r["process"] for r in talon.lines("the supervisor is gone: stopping")} == {1, 2}
    assert {r["process"] for r in talon.lines("stopped")} == {1, 2}  # drained, as on SIGTERM
    shutil.rmtree(talon.lines("starting server processes")[0]["shared_state"])
