"""Scaling out on the real node: two falco-talon replicas behind their Service share the NATS
JetStream server the chart deploys (a StatefulSet running the image of ``make image-nats``, its
store on a PersistentVolume). Each event is acted on once, whichever replica it reached; the
same event sent to both replicas is acted on once; events stored in NATS outlive the NATS pod.

Outcomes are counted where an operator counts them: the Kubernetes Events falco-talon leaves on
the pod (one per action, naming the event), each replica's /metrics, the replicas' logs."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.cluster.conftest import Posted, Talon, pod_events, poll
from tests.env.cluster import NATS_IMAGE, NATS_VOLUME, RELEASE, TALON_NAMESPACE, Cluster

pytestmark = pytest.mark.cluster

NATS_POD = f"{RELEASE}-nats-0"
TARGET = "standalone"  # the demo pod the label events are about
ACTIONS = "falco_talon_actions_total"
LABELIZED = {"actionner": "kubernetes:labelize", "outcome": "succeeded"}


@pytest.fixture
def replicas(cluster: Cluster, talon: Talon) -> list[Any]:
    """The two falco-talon pods, each connected to NATS."""
    cluster.wait_talon_ready(talon.url)
    pods = poll(
        "2 running falco-talon replicas", lambda: r if len(r := talon.running()) == 2 else None
    )
    return sorted(pods, key=lambda p: p.metadata.name)


def labelized(talon: Talon, pods: list[Any]) -> dict[str, float]:
    return {p.metadata.name: talon.counter(p, ACTIONS, **LABELIZED) for p in pods}


def events_naming(core: Any, ids: set[str]) -> Counter[str]:
    """How many Kubernetes Events falco-talon left on TARGET for each of these event ids."""
    return Counter(
        e.metadata.annotations["falco-talon/event-id"]
        for e in pod_events(core, TARGET)
        if (e.metadata.annotations or {}).get("falco-talon/event-id") in ids
    )


def test_two_replicas_share_the_nats_statefulset_of_the_chart(
    cluster: Cluster, core: Any, talon: Talon, replicas: list[Any]
) -> None:
    nats = core.read_namespaced_pod(NATS_POD, TALON_NAMESPACE)
    assert nats.status.phase == "Running"
    # the chart's default image (values: pullPolicy Never), imported into containerd by `up`
    assert nats.status.container_statuses[0].image == NATS_IMAGE
    assert nats.spec.security_context.run_as_user == 65532
    for pod in replicas:
        connected = [
            r
            for r in talon.logs()
            if r["_pod"] == pod.metadata.name and r.get("message") == "NATS connected"
        ]
        assert connected and connected[0]["stream"] == "FALCO_TALON", pod.metadata.name
    # the store is on the claim, bound to the volume under the cluster's state directory
    claim = core.read_namespaced_persistent_volume_claim(f"data-{NATS_POD}", TALON_NAMESPACE)
    assert claim.status.phase == "Bound" and claim.spec.volume_name == NATS_VOLUME
    store = Path(core.read_persistent_volume(NATS_VOLUME).spec.host_path.path)
    assert (store / "jetstream" / "$G" / "streams" / "FALCO_TALON").is_dir()
    # more than one replica: a disruption budget the controller-manager computes
    policy: Any = client.PolicyV1Api(core.api_client)
    budget = poll(
        "the PodDisruptionBudget's status",
        lambda: (
            b
            if (
                b := policy.read_namespaced_pod_disruption_budget(RELEASE, TALON_NAMESPACE)
            ).status.current_healthy
            == 2
            else None
        ),
    )
    assert budget.status.disruptions_allowed == 1
    anti = replicas[0].spec.affinity.pod_anti_affinity
    (term,) = anti.preferred_during_scheduling_ignored_during_execution
    assert term.pod_affinity_term.topology_key == "kubernetes.io/hostname"


def test_each_event_posted_through_the_service_is_acted_on_once(
    talon: Talon, core: Any, replicas: list[Any]
) -> None:
    before = labelized(talon, replicas)
    received = {
        p.metadata.name: talon.counter(p, "falco_talon_events_received_total") for p in replicas
    }
    ids = {talon.send("Talon e2e label", TARGET) for _ in range(40)}  # each 202: stored in NATS
    assert len(ids) == 40

    def done() -> dict[str, float] | None:
        now = labelized(talon, replicas)
        return now if sum(now.values()) - sum(before.values()) >= len(ids) else None

    poll("40 label actions counted by the replicas together", done, 120)
    time.sleep(3)  # anything more would be a second run of some event
    after = labelized(talon, replicas)
    ran = {name: after[name] - before[name] for name in after}
    assert sum(ran.values()) == len(ids), ran
    # the Service spread the POSTs over both replicas, and both replicas ran events
    accepted = {
        p.metadata.name: talon.counter(p, "falco_talon_events_received_total")
        - received[p.metadata.name]
        for p in replicas
    }
    assert all(n > 0 for n in accepted.values()), accepted
    assert all(n > 0 for n in ran.values()), ran
    # one LabelizeSucceeded Event per event, on the pod, naming the event
    per_event = poll(
        "a Kubernetes Event for each of the 40 events",
        lambda: c if len(c := events_naming(core, ids)) == len(ids) else None,
        60,
    )
    assert set(per_event.values()) == {1}, {i: n for i, n in per_event.items() if n != 1}
    assert talon.pods() and {p.metadata.name for p in talon.running()} == set(before)  # no restart


def test_the_same_event_sent_to_each_replica_is_acted_on_once(
    talon: Talon, core: Any, replicas: list[Any]
) -> None:
    before = labelized(talon, replicas)
    deduplicated = {
        p.metadata.name: talon.counter(p, "falco_talon_events_deduplicated_total") for p in replicas
    }
    body = talon.event("Talon e2e label", TARGET)  # Falcosidekick's uuid: the event's identity
    first, second = replicas
    answers: list[Posted] = [
        talon.post_to(first, body),
        talon.post_to(second, body),
        talon.post(body),  # and once more through the Service
    ]
    assert [(a.status, a.body.get("status")) for a in answers] == [
        (202, "accepted"),
        (200, "duplicate"),
        (200, "duplicate"),
    ]
    assert {a.id for a in answers} == {body["uuid"]}
    assert talon.wait_outcome(body["uuid"])["outcome"] == "succeeded"
    poll("the Event of the action", lambda: events_naming(core, {body["uuid"]}), 60)
    time.sleep(3)
    assert events_naming(core, {body["uuid"]}) == Counter({body["uuid"]: 1})
    after = labelized(talon, replicas)
    assert sum(after.values()) - sum(before.values()) == 1
    dedup_after = {
        p.metadata.name: talon.counter(p, "falco_talon_events_deduplicated_total") for p in replicas
    }
    # B answered its copy duplicate; the Service's copy went to either replica
    assert dedup_after[second.metadata.name] - deduplicated[second.metadata.name] >= 1
    assert sum(dedup_after.values()) - sum(deduplicated.values()) == 2


def test_events_stored_in_nats_outlive_the_nats_pod(
    cluster: Cluster, talon: Talon, core: Any, replicas: list[Any]
) -> None:
    """40 slow events (an exec of 2 s) fill the replicas' 32 workers and wait in the stream;
    the NATS pod is deleted meanwhile. While it is away a POST is refused (503, Retry-After),
    never accepted unstored; every event ever accepted reaches an outcome once NATS is back:
    the ones waiting in the stream from its claim, the ones whose ack was lost by redelivery."""
    accepted = [talon.send("Talon e2e slow", TARGET) for _ in range(40)]
    uid = core.read_namespaced_pod(NATS_POD, TALON_NAMESPACE).metadata.uid
    core.delete_namespaced_pod(NATS_POD, TALON_NAMESPACE)
    answers: list[Posted] = []

    def back() -> bool:
        posted = talon.post(talon.event("Talon e2e label", TARGET))
        answers.append(posted)
        if posted.status == 202:
            accepted.append(posted.id)
        pod = core.read_namespaced_pod(NATS_POD, TALON_NAMESPACE)
        ready = any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])
        return pod.metadata.uid != uid and ready and posted.status == 202

    poll("the NATS pod replaced, and events accepted again", back, 180, every=0.2)
    assert {a.status for a in answers} <= {202, 503}, [a.status for a in answers]
    refused = [a for a in answers if a.status == 503]
    assert all(a.headers.get("Retry-After") for a in refused)
    # ackWait (30 s) bounds the wait for the runs whose ack went with the old pod

    def missing() -> list[str]:
        done = {r["event_id"] for r in talon.logs() if "outcome" in r and "event_id" in r}
        return [e for e in accepted if e not in done]

    poll("an outcome for every accepted event", lambda: not missing(), 180, every=1.0)
    assert {p.metadata.name for p in talon.running()} == {p.metadata.name for p in replicas}
