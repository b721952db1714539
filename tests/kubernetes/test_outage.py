"""An outage of the Kubernetes API: calls are retried, the failure is reported, the server
keeps serving, and the next event after recovery acts normally. The real kube-apiserver
process is stopped and started again (same port, same etcd)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from engine.contract.kubeapi import KubeApi
from tests.env.testenv import TestEnv
from tests.kubernetes.conftest import Cluster
from tests.kubernetes.harness import event_for, outcomes, start_talon

pytestmark = pytest.mark.kubernetes


async def test_an_apiserver_outage_is_retried_reported_and_survived(
    aiohttp_client: Any,
    tmp_path: Path,
    kube: KubeApi,
    cluster: Cluster,
    control_plane: TestEnv,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rs = cluster.replicaset("web", replicas=2)
    talon = await start_talon(
        aiohttp_client, tmp_path, "- name: kill\n  action: {name: kubernetes:terminate}\n"
    )
    control_plane.stop_apiserver()
    try:
        with caplog.at_level(logging.WARNING):
            run = await talon.send(event_for(rs.pods[0], cluster.ns, uuid="during-outage"))
        [(rule, outcome, reason)] = outcomes(run)
        assert (rule, outcome) == ("kill", "failed")
        # terminate's one call (no GET before it): the DELETE, retried, then reported
        pod = f"{cluster.ns}/{rs.pods[0]}"
        assert reason.startswith(f"delete pod {pod}: Kubernetes API unreachable")
        assert reason.endswith("after 3 attempt(s)")
        retries = [r for r in caplog.records if "retry" in r.getMessage()]
        assert len(retries) == 2
        failure = next(
            r for r in caplog.records if r.getMessage().startswith("kubernetes:terminate failed")
        )
        assert failure.fields["event_id"] == "during-outage"  # type: ignore[attr-defined]
        health = await talon.client.get("/healthz")
        assert health.status == 200
    finally:
        control_plane.start_apiserver()
    run = await talon.send(event_for(rs.pods[1], cluster.ns))
    assert outcomes(run)[0][1] == "succeeded"
    assert cluster.get_pod(rs.pods[1]) is None
