"""The memory of a ``falco-talon server`` that acts on a real cluster.

The official Kubernetes client's generated API classes import the pydantic models their
methods name: ``CoreV1Api`` alone costs ~80 MB of a process's memory, the five classes the
actionners once used ~100 MB, pushing a server to ~170 MB before its first event. The
actionners and notifiers speak plain REST instead (``KubeApi.request``); this checks, on a
real server process with a kubeconfig, that running a command in the pod (``pods/exec``,
through the test kubelet), labelling, terminating and reporting with Kubernetes Events
stays under the project's 100 MB a process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

from tests.env.talon import start_server
from tests.env.testenv import TestEnvInfo
from tests.kubernetes.conftest import Cluster
from tests.kubernetes.harness import event_for

LIMIT_MIB = 100
EVENTS = 30
RULES = """\
- name: kill
  action: {name: kubernetes:terminate}
- name: label
  before: true
  continue: true
  action: {name: kubernetes:label, parameters: {labels: {a: b}}}
- name: forensics
  before: true
  continue: true
  action: {name: kubernetes:exec, parameters: {command: "echo collected"}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert server.poll() is None, f"the server exited: {log.read_text()[-2000:]}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"the server did not listen: {log.read_text()[-2000:]}")


def _status_mib(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def test_a_server_executing_labelling_terminating_and_reporting_stays_under_100_mb(
    testenv: TestEnvInfo, cluster: Cluster, tmp_path: Path
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    log = tmp_path / "server.log"
    port = _free_port()
    env = {
        **os.environ,
        "KUBECONFIG": str(testenv.kubeconfig),
        "LOGFORMAT": "json",
        "WATCHRULES": "false",
        "DEFAULTNOTIFIERS": "k8sevents",
    }
    with log.open("wb") as out:
        server = start_server(rules, port, env, out)
    try:
        _wait_port(port, server, log)
        pods = [f"mem-{i}" for i in range(EVENTS)]
        for pod in pods:
            cluster.standalone(pod, {"app": "mem"})
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/",
                data=json.dumps(event_for(pod, cluster.ns, uuid=str(uuid.uuid4()))).encode(),
                method="POST",
            )
            with urllib.request.urlopen(request, timeout=10) as resp:
                assert 200 <= resp.status < 300
        # Done when every pod is gone and each got its three Events (exec, label, terminate).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            left = cluster.core.list_namespaced_pod(cluster.ns).items
            events = cluster.core.list_namespaced_event(cluster.ns).items
            if not left and len(events) >= 3 * EVENTS:
                break
            time.sleep(0.2)
        assert [p.metadata.name for p in left] == [], log.read_text()[-2000:]
        reasons = sorted({e.reason for e in events})
        assert reasons == ["ExecSucceeded", "LabelSucceeded", "TerminateSucceeded"], (
            log.read_text()[-2000:]
        )
        assert len(events) == 3 * EVENTS
        rss, peak = _status_mib(server.pid, "VmRSS"), _status_mib(server.pid, "VmHWM")
        assert peak < LIMIT_MIB, (
            f"falco-talon server peaked at {peak:.0f} MiB (now {rss:.0f} MiB) after "
            f"{EVENTS} exec + label + terminate events with Kubernetes Events; the limit is "
            f"{LIMIT_MIB} MiB (did something load the client's generated API classes?)"
        )
    finally:
        server.terminate()
        server.wait(10)
