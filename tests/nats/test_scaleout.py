"""The durable shared queue: publish before 2xx, deduplication, shared work, redelivery,
dead letters (and their notification) and throttles shared across replicas. See
conftest.py for what is real."""

from __future__ import annotations

import asyncio
import copy
import time
import uuid
from pathlib import Path
from typing import Any

import nats
import trustme

from tests.conftest import FALCO_EVENT
from tests.env.natsserver import TestNats
from tests.nats.conftest import Replica, marks, post, wait_until
from tests.notifiers.conftest import Receiver

MARK = "- name: mark\n  action: {name: test:mark, parameters: {seconds: %s}}\n"


def event(**over: Any) -> dict[str, Any]:
    out = copy.deepcopy(FALCO_EVENT)
    out["uuid"] = str(uuid.uuid4())
    out.update(over)
    return out


def nats_config(server: TestNats, **over: Any) -> dict[str, Any]:
    return {"nats": {"url": server.url, "ackWait": 2, **over}, "workers": 8}


def test_2xx_only_once_stored_503_while_nats_is_down_and_nothing_accepted_is_lost(
    tmp_path: Path, nats_server: TestNats, replicas: list[Replica]
) -> None:
    r = Replica(tmp_path, "a", nats_config(nats_server), MARK % 0)
    replicas.append(r.start())
    before = event()
    assert post(r.url, before)[0] == 202
    # (stopped while its ack is on the way, it would run again: at least once, README)
    wait_until(lambda: r.finished()[before["uuid"]] == 1, 20, "the first event to finish")
    nats_server.stop()
    wait_until(lambda: r.count("NATS disconnected") >= 1, 10, "the replica to see NATS gone")
    status, headers, body = post(r.url, event())
    assert status == 503
    assert headers["Retry-After"] == "2"
    assert body["error"] == "queue unavailable, retry later"
    # accepted while NATS was down, so never run: it is stored, waiting
    queued = event()
    nats_server.start()
    wait_until(lambda: post(r.url, queued)[0] in (200, 202), 30, "NATS to accept again")
    after = event()
    assert post(r.url, after)[0] == 202
    ids = {before["uuid"], queued["uuid"], after["uuid"]}
    wait_until(lambda: set(r.finished()) >= ids, 30, "every accepted event to finish")
    assert all(r.finished()[i] == 1 for i in ids)
    assert all(marks(r.marks)[i] == 1 for i in ids)


def test_an_event_reaching_an_idle_replica_runs_at_once_not_when_its_pull_expires(
    tmp_path: Path, nats_server: TestNats, replicas: list[Replica]
) -> None:
    # An idle consumer's pull waits 2 s for an event here (1 s in production), and expires
    # again and again while the replica idles: each expiry is an empty pull, not a failure
    # (it was taken for one: a warning and a pause of 0.5 s, ~0.5 s tails on the real node).
    # A pull that held its first event until it expired (as a pull of several does when the
    # stream is empty: ~1 s tails on the real node) would keep each event for 2 s.
    # Its pulls for the other free workers get 0.1 ms here (20 ms in production): each one
    # after an event expires at once, as they do on a busy node.
    waits = {"TALON_TEST_WAIT_FOR_ONE": "2", "TALON_TEST_TAKE_WHAT_IS_THERE": "0.0001"}
    r = Replica(tmp_path, "a", nats_config(nats_server), MARK % 0, env=waits)
    replicas.append(r.start())
    for _ in range(3):
        time.sleep(2.5)  # the consumer idle again: a pull expired, the next one waiting
        sent = event()
        assert post(r.url, sent)[0] == 202
        wait_until(lambda i=sent["uuid"]: r.finished()[i] == 1, 10, "the event to finish")
    # An empty pull is no failure: nothing logged, no pause before the next pull.
    assert r.count("NATS fetch failed") == 0, r.log_path.read_text()[-2000:]


def test_the_same_event_sent_twice_to_two_replicas_acts_once(
    tmp_path: Path, nats_server: TestNats, replicas: list[Replica]
) -> None:
    a = Replica(tmp_path, "a", nats_config(nats_server), MARK % 0)
    b = Replica(tmp_path, "b", nats_config(nats_server), MARK % 0)
    replicas += [a.start(), b.start()]
    with_uuid = event()
    without = {k: v for k, v in event(time="2026-11-29T15:00:00Z").items() if k != "uuid"}
    answers = [post(a.url, with_uuid), post(b.url, with_uuid), post(a.url, with_uuid)]
    assert [s for s, _, _ in answers] == [202, 200, 200]
    assert answers[1][2] == {"status": "duplicate", "id": with_uuid["uuid"]}
    # no uuid: the same rule, output, time and hostname is the same event
    assert [post(b.url, without)[0], post(a.url, without)[0]] == [202, 200]
    wait_until(lambda: sum(marks(a.marks).values()) >= 2, 20, "both events to run")
    time.sleep(1.0)
    assert sum(marks(a.marks).values()) == 2
    assert marks(a.marks)[with_uuid["uuid"]] == 1
    assert a.metric("falco_talon_events_deduplicated_total") == 2  # its 2nd of each


def test_two_replicas_share_the_work_and_each_event_finishes_exactly_once(
    tmp_path: Path, nats_server: TestNats, replicas: list[Replica]
) -> None:
    a = Replica(tmp_path, "a", nats_config(nats_server), MARK % 0.05)
    b = Replica(tmp_path, "b", nats_config(nats_server), MARK % 0.05)
    replicas += [a.start(), b.start()]
    sent = [event() for _ in range(200)]
    for i, e in enumerate(sent):
        assert post((a, b)[i % 2].url, e)[0] == 202
    ids = {e["uuid"] for e in sent}

    def done() -> bool:
        return set(a.finished() + b.finished()) >= ids

    wait_until(done, 60, "every event to finish")
    both = a.finished() + b.finished()
    assert set(both) == ids
    assert set(both.values()) == {1}
    assert set(marks(a.marks).values()) == {1}
    assert len(a.finished()) > 20 and len(b.finished()) > 20, (len(a.finished()), len(b.finished()))


def test_a_replica_killed_with_events_in_flight_loses_none(
    tmp_path: Path, nats_server: TestNats, replicas: list[Replica]
) -> None:
    a = Replica(tmp_path, "a", nats_config(nats_server), MARK % 1.0)
    b = Replica(tmp_path, "b", nats_config(nats_server), MARK % 1.0)
    replicas += [a.start(), b.start()]
    sent = [event() for _ in range(40)]
    for e in sent:
        assert post(a.url, e)[0] == 202
    wait_until(lambda: a.count("event run finished") >= 1, 20, "a to be running events")
    a.kill()  # kill -9, its runs in flight unacked
    ids = {e["uuid"] for e in sent}
    wait_until(lambda: set(a.finished() + b.finished()) >= ids, 90, "every event to finish")
    # each replica finished each event at most once; what a had in flight went to b (an
    # event a finished but was killed before acking finishes in b too: at least once)
    assert set(a.finished().values()) == {1} and set(b.finished().values()) == {1}
    assert b.count("event redelivered") >= 1
    assert set(marks(a.marks)) == ids


def notifying(config: dict[str, Any], webhook: Receiver) -> dict[str, Any]:
    return {**config, "notifiers": {"webhook": {"url": webhook.url("/talon")}}}


def given_up(webhook: Receiver) -> list[dict[str, Any]]:
    return [b for b in webhook.bodies if b["outcome"] == "given-up"]


def test_an_event_that_kills_its_replica_every_time_is_dead_lettered_after_max_deliver(
    tmp_path: Path, nats_server: TestNats, replicas: list[Replica], webhook: Receiver
) -> None:
    rules = (
        "- name: poison\n  match: {rules: [Poison]}\n  action: {name: test:die}\n"
        "  notifiers: [webhook]\n"
        "- name: mark\n  match: {rules: [Terminal shell in container]}\n"
        "  action: {name: test:mark}\n"
    )
    config = notifying(nats_config(nats_server, maxDeliver=2, ackWait=1), webhook)
    r = Replica(tmp_path, "a", config, rules)
    replicas.append(r.start())
    poison = event(rule="Poison")
    assert post(r.url, poison)[0] == 202
    # Kubernetes would restart the pod each time; so does this loop
    deadline = time.monotonic() + 60
    while r.count("event given up") == 0 and time.monotonic() < deadline:
        if r.proc is not None and r.proc.poll() is not None:
            r.start()
        time.sleep(0.1)
    assert r.runs == 3  # killed by deliveries 1 and 2; the 3rd dead-lettered it
    log = next(x for x in r.records() if x.get("message", "").startswith("event given up"))
    assert log["event_id"] == poison["uuid"]
    assert log["level"] == "error"
    assert r.metric("falco_talon_events_dead_lettered_total") == 1
    # the rule's notifier hears of it: no run ever finished, so no last error
    wait_until(lambda: given_up(webhook), 20, "the given-up notification")
    [note] = webhook.bodies
    assert (note["rule"], note["action"], note["event_id"]) == (
        "poison",
        "test:die",
        poison["uuid"],
    )
    assert note["error"] == "given up after 2 deliveries: moved to falco-talon.events.dead"
    assert note["output"] == {"deliveries": 2, "dead_letter_subject": "falco-talon.events.dead"}
    # the replica goes on with other events
    other = event()
    assert post(r.url, other)[0] == 202
    wait_until(lambda: r.finished()[other["uuid"]] == 1, 20, "the next event to finish")
    assert asyncio.run(_dead_letters(nats_server.url)) == [poison["uuid"]]


def test_an_action_failing_temporarily_is_redelivered_then_given_up_and_notified_once(
    tmp_path: Path, nats_server: TestNats, replicas: list[Replica], webhook: Receiver
) -> None:
    rules = (
        "- name: terminate while the API is down\n  action: {name: test:unavailable}\n"
        "  notifiers: [webhook]\n"
    )
    config = notifying(nats_config(nats_server, maxDeliver=3), webhook)
    a = Replica(tmp_path, "a", config, rules)
    b = Replica(tmp_path, "b", config, rules)
    replicas += [a.start(), b.start()]
    doomed = event()
    assert post(a.url, doomed)[0] == 202
    wait_until(lambda: given_up(webhook), 30, "the given-up notification")
    time.sleep(2.0)  # anything more would come now: a 4th delivery is ~4 s after the 3rd
    [note] = webhook.bodies  # no notification for the deliveries that were retried
    assert note["event_id"] == doomed["uuid"]
    assert (note["status"], note["outcome"]) == ("given-up", "given-up")
    assert (note["rule"], note["action"]) == ("terminate while the API is down", "test:unavailable")
    assert note["error"] == (
        "given up after 3 deliveries: moved to falco-talon.events.dead (last error: the API "
        "server is unavailable (503) (after 2 attempts))"
    )
    assert note["output"] == {"deliveries": 3, "dead_letter_subject": "falco-talon.events.dead"}
    assert note["event_output"] == doomed["output"]
    records = a.records() + b.records()
    retried = [x for x in records if str(x.get("message")).startswith("event failed temporarily")]
    assert [x["delivery"] for x in sorted(retried, key=lambda x: x["delivery"])] == [1, 2]
    [log] = [x for x in records if str(x.get("message")).startswith("event given up")]
    assert log["level"] == "error" and log["event_id"] == doomed["uuid"]
    assert log["message"] == (
        "event given up after 3 deliveries: moved to falco-talon.events.dead (last error: the "
        "API server is unavailable (503) (after 2 attempts))"
    )
    dead = a.metric("falco_talon_events_dead_lettered_total")
    assert dead + b.metric("falco_talon_events_dead_lettered_total") == 1
    assert not a.finished() and not b.finished()  # never acked as finished
    assert asyncio.run(_dead_letters(nats_server.url)) == [doomed["uuid"]]


async def _dead_letters(url: str) -> list[str]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe("falco-talon.events.dead", stream="FALCO_TALON_DEAD")
        msgs = await sub.fetch(10, timeout=2)
        return [m.headers["Falco-Talon-Event-Id"] for m in msgs if m.headers]
    finally:
        await nc.close()


def test_a_throttle_is_shared_by_the_replicas(
    tmp_path: Path, nats_server: TestNats, replicas: list[Replica]
) -> None:
    rules = (
        "- name: mark\n  action: {name: test:mark}\n"
        "  throttle: {max: 2, per: workload, within: 60s}\n"
    )
    a = Replica(tmp_path, "a", nats_config(nats_server), rules)
    b = Replica(tmp_path, "b", nats_config(nats_server), rules)
    replicas += [a.start(), b.start()]
    sent = [event() for _ in range(30)]
    for i, e in enumerate(sent):
        assert post((a, b)[i % 2].url, e)[0] == 202
    ids = {e["uuid"] for e in sent}
    wait_until(lambda: set(a.finished() + b.finished()) >= ids, 60, "every event to finish")
    assert sum(marks(a.marks).values()) == 2
    skipped = [
        x
        for x in a.records() + b.records()
        if "throttled: 2 actions on workload demo/web" in str(x.get("message"))
    ]
    assert len(skipped) == 28


def test_token_in_a_file_and_tls_to_nats_and_a_wrong_token_refuses_events(
    tmp_path: Path, nats_built: Path, replicas: list[Replica]
) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    server = TestNats(
        tmp_path / "nats",
        token="s3cret-t0ken",
        tls_cert=tmp_path / "server.pem",
        tls_key=tmp_path / "server.pem",
    )
    server.start()
    try:
        (tmp_path / "token").write_text("s3cret-t0ken\n")
        tls = {"caFile": str(tmp_path / "ca.pem")}
        good = Replica(
            tmp_path,
            "good",
            nats_config(server, tokenFile=str(tmp_path / "token"), tls=tls),
            MARK % 0,
        )
        replicas.append(good.start())
        sent = event()
        assert post(good.url, sent)[0] == 202
        wait_until(lambda: good.finished()[sent["uuid"]] == 1, 20, "the event to finish")
        bad = Replica(
            tmp_path, "bad", nats_config(server, token="n0t-the-t0ken", tls=tls), MARK % 0
        )
        replicas.append(bad.start(wait_for="listening"))
        wait_until(lambda: bad.count("Authorization Violation") >= 1, 20, "the refusal")
        assert post(bad.url, event())[0] == 503
        logs = (bad.log_path.read_text(), good.log_path.read_text())
        assert not any(t in text for t in ("s3cret", "n0t-the") for text in logs)
    finally:
        server.kill()


def test_an_nkey_seed_authenticates_and_a_wrong_one_refuses_events(
    tmp_path: Path, nats_built: Path, replicas: list[Replica]
) -> None:
    """NATS knows the user by its public NKEY only; the replica holding the seed connects
    and its events run; one with another user's seed is refused (503), and no seed is
    written to a log."""
    import os

    import nkeys

    def seed() -> bytes:
        return bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))

    allowed, other = seed(), seed()
    public = nkeys.from_seed(bytearray(allowed)).public_key.decode()
    server = TestNats(tmp_path / "nats", nkey=public)
    server.start()
    try:
        (tmp_path / "user.nk").write_bytes(allowed + b"\n")
        (tmp_path / "other.nk").write_bytes(other)
        good = Replica(
            tmp_path, "good", nats_config(server, nkeySeedFile=str(tmp_path / "user.nk")), MARK % 0
        )
        replicas.append(good.start())
        sent = event()
        assert post(good.url, sent)[0] == 202
        wait_until(lambda: good.finished()[sent["uuid"]] == 1, 20, "the event to finish")
        bad = Replica(
            tmp_path, "bad", nats_config(server, nkeySeedFile=str(tmp_path / "other.nk")), MARK % 0
        )
        replicas.append(bad.start(wait_for="listening"))
        wait_until(lambda: bad.count("Authorization Violation") >= 1, 20, "the refusal")
        assert post(bad.url, event())[0] == 503
        logs = bad.log_path.read_text() + good.log_path.read_text()
        assert allowed.decode() not in logs and other.decode() not in logs
    finally:
        server.kill()
