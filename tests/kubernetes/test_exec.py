"""``kubernetes:exec`` through the real apiserver: the apiserver proxies ``pods/exec`` to the
project's test kubelet (``tests/env/kubelet``), which runs the command as a local process in
a sandbox directory per container — the one stand-in here, since there are no containers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine.contract.kubeapi import KubeApi
from tests.kubernetes.conftest import Cluster
from tests.kubernetes.harness import event_for, outcomes, start_talon

pytestmark = pytest.mark.kubernetes

SEED_RULES = Path("examples/rules.yaml").read_text()


def exec_rule(command: str, **params: Any) -> str:
    extra = "".join(f"      {k}: {v!r}\n" for k, v in params.items())
    return (
        "- name: forensics\n  action:\n    name: kubernetes:exec\n    parameters:\n"
        f"      command: {command!r}\n{extra}"
    )


async def test_exec_runs_the_command_in_every_container_and_returns_its_output(
    aiohttp_client: Any, tmp_path: Path, kube: KubeApi, cluster: Cluster
) -> None:
    cluster.standalone("shell", {"app": "web"}, containers=("app", "sidecar"))
    talon = await start_talon(
        aiohttp_client, tmp_path, exec_rule('echo "hello from $HOSTNAME"; echo warn >&2')
    )
    run = await talon.send(event_for("shell", cluster.ns))
    assert outcomes(run) == [("forensics", "succeeded", "command ran in 2 container(s)")]
    containers = run.steps[0].result.output["containers"]  # type: ignore[union-attr]
    assert containers == {
        c: {"stdout": "hello from shell\n", "stderr": "warn\n", "exit_code": 0, "timed_out": False}
        for c in ("app", "sidecar")
    }


async def test_a_failing_command_is_a_failed_action_with_its_exit_code_and_output(
    aiohttp_client: Any, tmp_path: Path, kube: KubeApi, cluster: Cluster
) -> None:
    cluster.standalone("shell", {"app": "web"})
    talon = await start_talon(
        aiohttp_client, tmp_path, exec_rule("echo partial; echo oops >&2; exit 3")
    )
    run = await talon.send(event_for("shell", cluster.ns))
    assert outcomes(run) == [("forensics", "failed", "command failed in app: exit code 3")]
    assert run.steps[0].result.output["containers"]["app"]["stderr"] == "oops\n"  # type: ignore[union-attr]


async def test_a_command_that_runs_too_long_is_stopped_and_reported(
    aiohttp_client: Any, tmp_path: Path, kube: KubeApi, cluster: Cluster
) -> None:
    cluster.standalone("shell", {"app": "web"})
    talon = await start_talon(aiohttp_client, tmp_path, exec_rule("sleep 30", timeout=1))
    run = await talon.send(event_for("shell", cluster.ns))
    assert outcomes(run) == [("forensics", "failed", "command failed in app: timed out after 1s")]


async def test_the_seed_rules_isolate_and_inspect_before_they_terminate(
    aiohttp_client: Any, tmp_path: Path, kube: KubeApi, cluster: Cluster
) -> None:
    rs = cluster.replicaset("web", replicas=2)
    talon = await start_talon(aiohttp_client, tmp_path, SEED_RULES)
    run = await talon.send(event_for(rs.pods[0], cluster.ns, priority="Critical"))
    assert [(s.stage.value, s.rule.action, s.outcome.value) for s in run.steps] == [
        ("before-actions", "kubernetes:networkpolicy", "succeeded"),
        ("before-actions", "kubernetes:exec", "succeeded"),
        ("actions", "kubernetes:labelize", "skipped"),
        ("actions", "kubernetes:terminate", "succeeded"),  # 50% of 2 = 1 ready pod remains
    ]
    forensics = run.steps[1].result.output["containers"]["app"]  # type: ignore[union-attr]
    assert forensics["exit_code"] == 0
    assert forensics["stdout"].startswith(f"forensics for {rs.pods[0]}\n")
    assert cluster.get_pod(rs.pods[0]) is None


async def test_execs_running_at_the_same_time_leave_the_shared_client_working(
    aiohttp_client: Any, tmp_path: Path, kube: KubeApi, cluster: Cluster
) -> None:
    """The client library's exec swaps the transport of the ApiClient it is given for a
    websocket while it connects; on the client every other call shares, two execs starting
    together left it swapped for good, and every later call of the replica failed
    ("Handshake status 200 OK"). Execs and label patches interleaved, then a plain read."""
    cluster.standalone("shell", {"app": "web"})
    rules = (
        "- name: forensics\n  match: {rules: [exec me]}\n  action:\n"
        "    name: kubernetes:exec\n    parameters: {command: 'sleep 0.2; echo done'}\n"
        "- name: mark\n  match: {rules: [label me]}\n  action:\n"
        "    name: kubernetes:labelize\n    parameters: {labels: {marked: 'yes'}}\n"
    )
    talon = await start_talon(aiohttp_client, tmp_path, rules, workers=16)
    for i in range(24):
        event = event_for("shell", cluster.ns, rule="exec me" if i % 2 else "label me")
        event["uuid"] = f"00000000-0000-4000-8000-{i:012d}"
        resp = await talon.client.post("/", json=event)
        assert resp.status == 202, await resp.text()
    await talon.service.queue.join()
    assert len(talon.runs) == 24
    bad = [outcomes(run) for run in talon.runs if outcomes(run)[0][1] != "succeeded"]
    assert not bad, bad
    assert (await kube.read_pod(cluster.ns, "shell"))["metadata"]["labels"]["marked"] == "yes"
