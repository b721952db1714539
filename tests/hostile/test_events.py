"""The event decoder and ``POST /`` against any bytes and any JSON: an event or an
``EventError`` (HTTP: 202, or 400/413 with a JSON body naming the problem), never a 500,
an escaping exception, a hang or growing memory."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from engine.contract.actionners import ActionnerRegistry
from engine.contract.event import EventError, FalcoEvent, decode_event
from engine.listener import PROTOCOL_LOG, Guard, GuardedSite, ListenerConfig
from engine.pipeline import Pipeline
from engine.rules import RuleSet
from engine.server import Service, create_app
from tests.conftest import FALCO_EVENT

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)

field_values = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)

event_like = st.fixed_dictionaries(
    {
        "rule": st.text(),
        "priority": st.sampled_from(["Warning", "Critical", "debug", "", "Bogus"]) | st.text(),
        "output_fields": st.dictionaries(
            st.text(), field_values | st.lists(field_values, max_size=4) | json_values
        ),
    },
    optional={
        "uuid": st.text() | json_values,
        "source": st.none() | st.text(),
        "hostname": st.none() | st.text(),
        "output": st.none() | st.text(),
        "time": st.text(),
        "tags": st.none() | st.lists(st.text(), max_size=4) | json_values,
    },
)


def decodes_cleanly(body: bytes) -> FalcoEvent | EventError:
    """What a user of the decoder may see: an event that answers every question, or an
    EventError with a JSON-able body."""
    try:
        event = decode_event(body)
    except EventError as exc:
        orjson.dumps(exc.as_json())
        assert exc.message and len(exc.message) < 1000
        return exc
    for key in event.output_fields:
        event.field(key)
    event.target  # noqa: B018 -- computing it must not fail
    orjson.dumps(event.to_dict())
    return event


@given(st.binary(max_size=2000))
def test_any_bytes_decode_to_an_event_or_an_event_error(body: bytes) -> None:
    decodes_cleanly(body)


@given(json_values)
def test_any_json_decodes_to_an_event_or_an_event_error(value: Any) -> None:
    decodes_cleanly(json.dumps(value).encode())


@given(event_like)
def test_any_event_shaped_object_decodes_or_names_its_bad_field(value: dict[str, Any]) -> None:
    result = decodes_cleanly(json.dumps(value).encode())
    if isinstance(result, EventError) and result.field is not None:
        assert result.field.split(".")[0] in value or result.field in (
            "rule",
            "priority",
            "output_fields",
        )


def _event(**fields: Any) -> dict[str, Any]:
    return {**FALCO_EVENT, "output_fields": fields}


DEEP = b"[" * 100_000 + b"]" * 100_000
HOSTILE: list[tuple[str, bytes, int, str]] = [
    ("100,000 nested arrays", DEEP, 400, "not valid JSON"),
    (
        "100,000 nested arrays in a field",
        json.dumps(_event(a=0)).encode().replace(b'"a": 0', b'"a": ' + DEEP),
        400,
        "not valid JSON",
    ),
    (
        "a 5,000-digit integer",
        json.dumps(_event(a=0)).encode().replace(b'"a": 0', b'"a": 1' + b"0" * 5000),
        400,
        "not valid JSON",
    ),
    (
        "an integer above 64 bits",
        json.dumps(_event(a=0)).encode().replace(b'"a": 0', b'"a": 123456789012345678901234567890'),
        202,
        "",
    ),
    ("1e400", json.dumps(_event(a=0)).encode().replace(b'"a": 0', b'"a": 1e400'), 400, "infinity"),
    (
        "NaN",
        json.dumps(_event(a=0)).encode().replace(b'"a": 0', b'"a": NaN'),
        400,
        "not valid JSON",
    ),
    (
        "Infinity",
        json.dumps(_event(a=0)).encode().replace(b'"a": 0', b'"a": -Infinity'),
        400,
        "not valid JSON",
    ),
    (
        "duplicate keys",
        b'{"rule": "a", "rule": "b", "priority": "Warning", "output_fields": {}}',
        202,
        "",
    ),
    (
        "10,000 output fields",
        json.dumps(_event(**{f"f.{i}": i for i in range(10_000)})).encode(),
        202,
        "",
    ),
    ("a 900 KB string", json.dumps(_event(a="x" * 900_000)).encode(), 202, ""),
    (
        "a 100 KB field name of the wrong type",
        json.dumps(_event(**{"n" * 100_000: {"x": 1}})).encode(),
        400,
        "characters)' must be",
    ),
    ("invalid UTF-8", b'{"rule": "\xc3\x28", "priority": "W", "output_fields": {}}', 400, "UTF-8"),
    ("UTF-16", json.dumps(FALCO_EVENT).encode("utf-16"), 400, "byte-order mark"),
    (
        "a lone surrogate",
        b'{"rule": "\\ud800", "priority": "W", "output_fields": {}}',
        400,
        "surrogate",
    ),
    ("over maxBodySize", json.dumps(_event(a="x" * 1_100_000)).encode(), 413, "maxBodySize"),
]


@pytest.mark.parametrize(("name", "body", "status", "error"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_named_hostile_bodies_decode_cleanly(
    name: str, body: bytes, status: int, error: str
) -> None:
    if status == 413:
        return  # the size limit is the server's, below
    start = time.monotonic()
    result = decodes_cleanly(body)
    assert time.monotonic() - start < 2
    if status == 202:
        assert isinstance(result, FalcoEvent)
    else:
        assert isinstance(result, EventError) and error in result.message


def test_a_huge_integral_float_prints_as_a_float_not_invented_digits() -> None:
    event = decode_event(json.dumps(_event(big=1e300, small=3.0, exact=2.0**52)).encode())
    assert event.field("big") == "1e+300"
    assert (event.field("small"), event.field("exact")) == ("3", str(2**52))


def test_decoding_hostile_bodies_again_and_again_does_not_grow_memory() -> None:
    bodies = [h[1] for h in HOSTILE if h[2] == 400]
    for body in bodies:  # warm caches
        decodes_cleanly(body)
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for _ in range(20):
            for body in bodies:
                decodes_cleanly(body)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert grown < 256 * 1024


# -- over HTTP: one real server (the listener serve() uses), in a thread, for all examples


@pytest.fixture(scope="module")
def server_url(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    from engine.rules import RulesLoader
    from tests.recording import Recorder, make_registry

    registry: ActionnerRegistry = make_registry(Recorder())
    rules_file = tmp_path_factory.mktemp("rules") / "rules.yaml"
    rules_file.write_text("- name: record\n  action: {name: test:record}\n")
    ruleset: RuleSet = RulesLoader(registry).load([rules_file])
    loop = asyncio.new_event_loop()
    started = threading.Event()
    port_box: list[int] = []
    stop_box: list[Callable[[], None]] = []

    async def main() -> None:
        service = Service(Pipeline(ruleset, registry), queue_size=100_000, workers=2)
        await service.start()
        runner = web.AppRunner(
            create_app(service), access_log=None, handle_signals=False, logger=PROTOCOL_LOG
        )
        await runner.setup()
        site = GuardedSite(runner, "127.0.0.1", 0, Guard(ListenerConfig()))
        await site.start()
        port_box.append(site.port)
        done = asyncio.Event()
        stop_box.append(lambda: loop.call_soon_threadsafe(done.set))
        started.set()
        await done.wait()
        await service.stop()
        await runner.cleanup()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(10)
    yield f"127.0.0.1:{port_box[0]}"
    stop_box[0]()
    thread.join(30)
    loop.close()


def post_raw(where: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    host, port = where.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(
            "POST", "/", body=body, headers=headers or {"Content-Type": "application/json"}
        )
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


@pytest.mark.parametrize("encoding", ["deflate", "gzip"])
def test_a_body_not_in_its_content_encoding_gets_400_when_it_comes_after_the_head(
    server_url: str, encoding: str
) -> None:
    """The head first, the body a moment later (as TCP may split them): the body does not
    decode, and the answer is a 400 at once, not a wait until bodyTimeout (30 s) while
    aiohttp's own 400 queues behind the request (the fuzzer found it, one time in ten)."""
    import socket

    host, port = server_url.split(":")
    for _ in range(5):
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Encoding: " + encoding.encode() + b"\r\nContent-Length: 2\r\n\r\n"
            )
            time.sleep(0.05)
            sock.sendall(b"{}")
            answer = b""
            while b"\r\n\r\n" not in answer:
                chunk = sock.recv(4096)  # a 5 s timeout: raises rather than waiting 30 s
                assert chunk, answer
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 400"), answer


def test_a_body_not_in_its_content_encoding_gets_400_at_once_after_expect_100_continue(
    server_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The same body sent with its head, as ``http.client`` sends it, after ``Expect:
    100-continue`` (the client not waiting for the ``100``): the handler may not have started
    reading the body when its bytes fail to decode, and the body must fail all the same
    rather than wait for bodyTimeout (the fuzzer found it, about one time in a hundred:
    hence 300 tries), and without an "Unhandled exception" traceback in the log."""
    caplog.set_level(logging.INFO, "falco_talon.http")
    headers = {
        "Content-Type": "application/json",
        "Content-Encoding": "deflate",
        "Expect": "100-continue",
    }
    for n in range(300):
        status, reply = post_raw(server_url, b"\xc3\xd9" if n % 2 else b"\xc3", headers)
        assert status == 400 and reply["error"], (n, status, reply)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@given(st.binary(max_size=2000))
def test_any_body_gets_202_or_a_4xx_with_a_json_error(server_url: str, body: bytes) -> None:
    status, reply = post_raw(server_url, body)
    assert status == 202 or (400 <= status < 500 and reply["error"]), (status, reply)


@given(json_values | event_like)
def test_any_json_body_gets_202_or_a_4xx_with_a_json_error(server_url: str, value: Any) -> None:
    status, reply = post_raw(server_url, json.dumps(value).encode())
    assert status == 202 or (400 <= status < 500 and reply["error"]), (status, reply)


@pytest.mark.parametrize(("name", "body", "status", "error"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_named_hostile_bodies_over_http(
    server_url: str, name: str, body: bytes, status: int, error: str
) -> None:
    start = time.monotonic()
    got, reply = post_raw(server_url, body)
    assert time.monotonic() - start < 5
    assert got == status, reply
    if status != 202:
        assert error in reply["error"]


header_values = st.text(
    st.characters(min_codepoint=32, max_codepoint=255, exclude_characters="\x7f"), max_size=60
)


@given(
    st.binary(max_size=500) | json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {},
        optional={
            "Content-Type": header_values
            | st.sampled_from(["application/json", "multipart/form-data; boundary=x"]),
            "Content-Encoding": st.sampled_from(["gzip", "deflate", "br", "identity", "x"]),
            "traceparent": header_values,
            "Authorization": header_values,
            "Expect": st.just("100-continue"),
        },
    ),
)
def test_any_body_with_any_headers_gets_202_or_a_4xx(
    server_url: str, body: bytes, headers: dict[str, str]
) -> None:
    status, reply = post_raw(server_url, body, headers)
    assert status == 202 or (400 <= status < 500 and reply["error"]), (status, reply)
