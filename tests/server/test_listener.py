"""Authenticated ingest on a real port: TLS (reloaded when its files change), mutual TLS,
bearer tokens, the probes port, and slow clients, each with the request shape the client
that uses it sends (Falco's http_output with a client certificate, Falcosidekick's webhook
output with an Authorization header). Real sockets, real TLS with trustme certificates;
the server is ``engine.server.serve`` stopped by a real SIGTERM."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import os
import re
import signal
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from engine import listener as listener_module
from engine.contract.actionners import ActionnerRegistry
from engine.contract.errors import ConfigError
from engine.listener import ListenerConfig
from engine.pipeline import Pipeline
from engine.rules import RuleSet
from engine.server import Service, serve
from tests.conftest import FALCO_EVENT, sidekick_shape
from tests.recording import Recorder

RULES = "- name: record everything\n  action: {name: test:record}\n"
TOKEN = "s3cr3t-t0ken-value"

# What each client sends (headers as the client sets them).
FALCO_HEADERS = {"Content-Type": "application/json", "User-Agent": "falcosecurity/falco/0.39.2"}
SIDEKICK_HEADERS = {
    "Content-Type": "application/json; charset=utf-8",
    "User-Agent": "Falcosidekick",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@dataclass
class Certs:
    """The server's certificate and key files, and the client CA file (a second CA, which
    signs the clients' certificates)."""

    cert: str
    key: str
    client_ca: str
    clients: trustme.CA


@pytest.fixture
def certs(tmp_path: Path, ca: trustme.CA) -> Certs:
    server = ca.issue_cert("127.0.0.1", "localhost")
    clients = trustme.CA()
    out = Certs(
        str(tmp_path / "tls.crt"), str(tmp_path / "tls.key"), str(tmp_path / "ca.crt"), clients
    )
    server.cert_chain_pems[0].write_to_path(out.cert)
    server.private_key_pem.write_to_path(out.key)
    clients.cert_pem.write_to_path(out.client_ca)
    return out


def client_context(ca: trustme.CA, cert: trustme.LeafCert | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    if cert is not None:
        cert.configure_cert(ctx)
    return ctx


Running = Callable[..., Any]


@pytest.fixture
async def running(
    registry: ActionnerRegistry, load_rules: Callable[..., RuleSet]
) -> AsyncIterator[Running]:
    """``async with running(config) as (service, port):`` serve() on a free port."""
    tasks: list[asyncio.Task[None]] = []

    @asynccontextmanager
    async def run(config: ListenerConfig) -> AsyncIterator[tuple[Service, int]]:
        service = Service(Pipeline(load_rules(RULES), registry), workers=2)
        port = free_port()
        task = asyncio.create_task(serve(service, "127.0.0.1", port, config))
        tasks.append(task)
        probe = config.probes_port or port
        for _ in range(300):
            if task.done():
                task.result()
            try:
                _, w = await asyncio.open_connection("127.0.0.1", probe)
                w.close()
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                break
            except OSError:
                await asyncio.sleep(0.02)
        try:
            yield service, port
        finally:
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.wait_for(task, 10)

    yield run
    for task in tasks:
        if not task.done():
            task.cancel()


async def post(
    url: str,
    body: dict[str, Any],
    *,
    headers: dict[str, str] | None = None,
    ssl_ctx: ssl.SSLContext | bool = True,
) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            url, data=json.dumps(body).encode(), headers=headers or FALCO_HEADERS, ssl=ssl_ctx
        ) as resp,
    ):
        return resp.status, await resp.json()


# -- TLS and mutual TLS ----------------------------------------------------------------------


async def test_falco_with_a_client_certificate_is_accepted_over_mutual_tls(
    running: Running, certs: Certs, ca: trustme.CA, recorder: Recorder
) -> None:
    config = ListenerConfig(
        cert_file=certs.cert, key_file=certs.key, client_ca_file=certs.client_ca
    )
    falco = certs.clients.issue_cert("falco.falco.svc")
    async with running(config) as (service, port):
        status, body = await post(
            f"https://127.0.0.1:{port}/", FALCO_EVENT, ssl_ctx=client_context(ca, falco)
        )
        assert status == 202 and body["status"] == "accepted"
        await service.queue.join()
    assert recorder.calls == [("record everything", "test:record")]


@pytest.mark.parametrize("who", ["no certificate", "a certificate from another CA"])
async def test_a_client_without_a_valid_certificate_is_refused_in_the_handshake(
    running: Running, certs: Certs, ca: trustme.CA, recorder: Recorder, who: str
) -> None:
    config = ListenerConfig(
        cert_file=certs.cert, key_file=certs.key, client_ca_file=certs.client_ca
    )
    cert = None if who == "no certificate" else trustme.CA().issue_cert("intruder")
    async with running(config) as (_, port):
        ctx = client_context(ca, cert)
        with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
            # TLS 1.3: the refusal may surface on the first read rather than the connect.
            await post(f"https://127.0.0.1:{port}/", FALCO_EVENT, ssl_ctx=ctx)
        # Refused before HTTP: no event got in, and a raw handshake fails too.
        with pytest.raises((ssl.SSLError, ConnectionError)):
            r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
            w.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            data = await asyncio.wait_for(r.read(100), 5)
            if not data:
                raise ConnectionError("closed")
    assert recorder.calls == []


async def test_plain_http_to_a_tls_port_gets_nothing(running: Running, certs: Certs) -> None:
    config = ListenerConfig(cert_file=certs.cert, key_file=certs.key)
    async with running(config) as (_, port):
        with pytest.raises(aiohttp.ClientError):
            await post(f"http://127.0.0.1:{port}/", FALCO_EVENT)


async def peer_common_name(port: int, ctx: ssl.SSLContext) -> str:
    _, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    cert = w.get_extra_info("peercert")
    w.close()
    return str(dict(x[0] for x in cert["subject"])["commonName"])


async def test_a_replaced_certificate_is_served_to_new_connections_without_restart(
    running: Running,
    certs: Certs,
    ca: trustme.CA,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(listener_module, "CHECK_INTERVAL", 0.0)
    first = ca.issue_cert("127.0.0.1", common_name="first")
    first.cert_chain_pems[0].write_to_path(certs.cert)
    first.private_key_pem.write_to_path(certs.key)
    config = ListenerConfig(cert_file=certs.cert, key_file=certs.key)
    async with running(config) as (_, port):
        ctx = client_context(ca)
        assert await peer_common_name(port, ctx) == "first"
        # Rotate the way a Secret mount does: new files, renamed into place.
        second = ca.issue_cert("127.0.0.1", common_name="second")
        tmp = Path(certs.cert).parent
        second.cert_chain_pems[0].write_to_path(str(tmp / "new.crt"))
        second.private_key_pem.write_to_path(str(tmp / "new.key"))
        os.replace(tmp / "new.key", certs.key)
        os.replace(tmp / "new.crt", certs.cert)
        assert await peer_common_name(port, ctx) == "second"
        status, _ = await post(f"https://127.0.0.1:{port}/", FALCO_EVENT, ssl_ctx=ctx)
        assert status == 202
        # A half-written pair (new cert, old key) keeps the working one in service.
        third = ca.issue_cert("127.0.0.1", common_name="third")
        third.cert_chain_pems[0].write_to_path(certs.cert)
        assert await peer_common_name(port, ctx) == "second"
        third.private_key_pem.write_to_path(certs.key)
        assert await peer_common_name(port, ctx) == "third"


async def test_a_replaced_client_ca_decides_who_gets_in_from_then_on(
    running: Running, certs: Certs, ca: trustme.CA, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(listener_module, "CHECK_INTERVAL", 0.0)
    config = ListenerConfig(
        cert_file=certs.cert, key_file=certs.key, client_ca_file=certs.client_ca
    )
    old_client = certs.clients.issue_cert("falco-old")
    new_ca = trustme.CA()
    new_client = new_ca.issue_cert("falco-new")
    async with running(config) as (_, port):
        url = f"https://127.0.0.1:{port}/"
        assert (await post(url, FALCO_EVENT, ssl_ctx=client_context(ca, old_client)))[0] == 202
        new_ca.cert_pem.write_to_path(certs.client_ca + ".new")
        os.replace(certs.client_ca + ".new", certs.client_ca)
        assert (await post(url, FALCO_EVENT, ssl_ctx=client_context(ca, new_client)))[0] == 202
        with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
            await post(url, FALCO_EVENT, ssl_ctx=client_context(ca, old_client))


def test_unreadable_tls_files_fail_at_start_naming_the_file(tmp_path: Path, certs: Certs) -> None:
    from engine.listener import listener_setup

    missing = str(tmp_path / "nope.crt")
    with pytest.raises(ConfigError, match=r"tls.certFile .*nope.crt.*cannot load"):
        listener_setup(ListenerConfig(cert_file=missing, key_file=certs.key))
    with pytest.raises(ConfigError, match=r"tls.clientCAFile .*nope.crt"):
        listener_setup(
            ListenerConfig(cert_file=certs.cert, key_file=certs.key, client_ca_file=missing)
        )
    with pytest.raises(ConfigError, match="set both or neither"):
        ListenerConfig(cert_file=certs.cert)


# -- bearer token ----------------------------------------------------------------------------


async def test_falcosidekick_webhook_with_the_bearer_token_is_accepted(
    running: Running, tmp_path: Path, recorder: Recorder
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    event = sidekick_shape(FALCO_EVENT)
    async with running(ListenerConfig(token_file=str(token_file))) as (service, port):
        status, body = await post(
            f"http://127.0.0.1:{port}/",
            event,
            headers={**SIDEKICK_HEADERS, "Authorization": f"Bearer {TOKEN}"},
        )
        assert (status, body["id"]) == (202, event["uuid"])
        await service.queue.join()
    assert recorder.contexts[0].event.id == event["uuid"]


@pytest.mark.parametrize(
    ("authorization", "error"),
    [
        (None, "missing Authorization header: send 'Authorization: Bearer <token>'"),
        ("Basic dXNlcjpwYXNz", "the Authorization header must be 'Bearer <token>'"),
        ("Bearer wrong-token", "invalid bearer token"),
        (f"Bearer {TOKEN}x", "invalid bearer token"),
    ],
)
async def test_a_request_without_the_right_token_gets_401_naming_the_problem(
    running: Running,
    recorder: Recorder,
    caplog: pytest.LogCaptureFixture,
    authorization: str | None,
    error: str,
) -> None:
    headers = dict(SIDEKICK_HEADERS)
    if authorization:
        headers["Authorization"] = authorization
    async with running(ListenerConfig(token=TOKEN)) as (service, port):
        with caplog.at_level(logging.DEBUG):
            async with (
                aiohttp.ClientSession() as session,
                session.post(f"http://127.0.0.1:{port}/", json=FALCO_EVENT, headers=headers) as r,
            ):
                assert r.status == 401
                assert r.headers["WWW-Authenticate"].startswith("Bearer")
                text = await r.text()
        assert json.loads(text) == {"error": error}
        assert 'reason="unauthorized"' in service.metrics.render().decode()
    assert recorder.calls == []
    assert TOKEN not in text and TOKEN not in caplog.text
    assert "wrong-token" not in caplog.text


async def test_probes_need_no_token_on_the_shared_port(running: Running) -> None:
    async with running(ListenerConfig(token=TOKEN)) as (_, port), aiohttp.ClientSession() as s:
        for path in ("/healthz", "/metrics"):
            async with s.get(f"http://127.0.0.1:{port}{path}") as r:
                assert r.status == 200


async def test_a_changed_token_file_takes_effect_without_restart(
    running: Running, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(listener_module, "CHECK_INTERVAL", 0.0)
    token_file = tmp_path / "token"
    token_file.write_text("old-token")
    async with running(ListenerConfig(token_file=str(token_file))) as (_, port):
        url = f"http://127.0.0.1:{port}/"
        auth = {**SIDEKICK_HEADERS, "Authorization": "Bearer old-token"}
        assert (await post(url, FALCO_EVENT, headers=auth))[0] == 202
        (tmp_path / "new").write_text("new-token\n")
        os.replace(tmp_path / "new", token_file)
        assert (await post(url, FALCO_EVENT, headers=auth))[0] == 401
        auth["Authorization"] = "Bearer new-token"
        assert (await post(url, FALCO_EVENT, headers=auth))[0] == 202


def test_an_empty_or_missing_token_file_fails_at_start(tmp_path: Path) -> None:
    from engine.listener import listener_setup

    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match=r"auth.tokenFile .*empty: the file is empty"):
        listener_setup(ListenerConfig(token_file=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match=r"auth.tokenFile .*absent: cannot read"):
        listener_setup(ListenerConfig(token_file=str(tmp_path / "absent")))


# -- probes port -----------------------------------------------------------------------------


async def test_the_probes_port_serves_health_and_metrics_in_plain_http_beside_mutual_tls(
    running: Running, certs: Certs, ca: trustme.CA
) -> None:
    probes = free_port()
    config = ListenerConfig(
        cert_file=certs.cert,
        key_file=certs.key,
        client_ca_file=certs.client_ca,
        token=TOKEN,
        probes_port=probes,
    )
    falco = certs.clients.issue_cert("falco")
    async with running(config) as (_, port), aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{probes}/healthz") as r:
            assert r.status == 200 and (await r.json())["status"] == "ok"
        async with session.get(f"http://127.0.0.1:{probes}/metrics") as r:
            assert r.status == 200 and "falco_talon" in await r.text()
        async with session.post(f"http://127.0.0.1:{probes}/", json=FALCO_EVENT) as r:
            assert r.status == 404  # no ingest on the probes port
            assert await r.json() == {"error": "Not Found"}
        ctx = client_context(ca, falco)
        async with session.get(f"https://127.0.0.1:{port}/healthz", ssl=ctx) as r:
            assert r.status == 404  # the event port serves POST / only
        headers = {**FALCO_HEADERS, "Authorization": f"Bearer {TOKEN}"}
        status, _ = await post(
            f"https://127.0.0.1:{port}/", FALCO_EVENT, headers=headers, ssl_ctx=ctx
        )
        assert status == 202


# -- slow clients ----------------------------------------------------------------------------


async def trickle(port: int, data: bytes, every: float, first: bytes = b"") -> tuple[bytes, float]:
    """Send ``data`` one byte per ``every`` seconds; what came back and when it closed.
    ``first``: a whole request sent before, on the same connection, its reply read first."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if first:
        writer.write(first)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 "), head
        length = re.search(rb"Content-Length: (\d+)", head, re.I)
        await reader.readexactly(int(length.group(1)) if length else 0)
    start = time.monotonic()

    async def feed() -> None:
        for i in range(len(data)):
            if reader.at_eof():
                return
            try:
                writer.write(data[i : i + 1])
                await writer.drain()
            except ConnectionError:
                return
            await asyncio.sleep(every)

    feeder = asyncio.create_task(feed())
    try:
        reply = await asyncio.wait_for(reader.read(), 10)
    finally:
        feeder.cancel()
        writer.close()
    return reply, time.monotonic() - start


async def test_a_client_trickling_its_headers_is_closed_and_others_are_served(
    running: Running,
) -> None:
    config = ListenerConfig(header_timeout=0.6, body_timeout=5)
    head = b"POST / HTTP/1.1\r\nHost: talon\r\nContent-Type: application/json\r\n\r\n"
    async with running(config) as (_, port):
        slow = [asyncio.create_task(trickle(port, head, 0.1)) for _ in range(20)]
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        status, _ = await post(f"http://127.0.0.1:{port}/", FALCO_EVENT)
        assert status == 202 and time.monotonic() - t0 < 0.5
        for reply, took in await asyncio.gather(*slow):
            assert reply.startswith(b"HTTP/1.1 408 ")
            assert b"headerTimeout" in reply
            assert took < 2


async def test_the_probes_port_times_out_a_trickled_head_on_a_kept_alive_connection(
    running: Running,
) -> None:
    """The head timer is re-armed for each request on the probes port too, not only for the
    first one of a connection."""
    probes = free_port()
    health = b"GET /healthz HTTP/1.1\r\nHost: talon\r\n"
    async with running(ListenerConfig(header_timeout=0.3, probes_port=probes)):
        reply, took = await trickle(probes, health, 0.1, first=health + b"\r\n")
        assert reply.startswith(b"HTTP/1.1 408 ") and b"headerTimeout" in reply
        assert took < 2


async def test_a_client_that_connects_and_sends_nothing_is_closed(running: Running) -> None:
    async with running(ListenerConfig(header_timeout=0.3)) as (_, port):
        reply, took = await trickle(port, b"", 0)
        assert reply.startswith(b"HTTP/1.1 408 ") and took < 2


async def test_a_client_trickling_its_body_gets_408_and_is_closed(running: Running) -> None:
    body = json.dumps(FALCO_EVENT).encode()
    head = (
        b"POST / HTTP/1.1\r\nHost: talon\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    async with running(ListenerConfig(header_timeout=5, body_timeout=0.5)) as (service, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head)
        writer.write(body[:10])
        t0 = time.monotonic()
        reply = await asyncio.wait_for(reader.read(), 5)
        assert time.monotonic() - t0 < 2
        writer.close()
        assert reply.startswith(b"HTTP/1.1 408 ")
        assert b"bodyTimeout" in reply
        status, _ = await post(f"http://127.0.0.1:{port}/", FALCO_EVENT)
        assert status == 202
        assert 'reason="body_timeout"' in service.metrics.render().decode()


async def test_keep_alive_connections_send_several_events(running: Running) -> None:
    config = ListenerConfig(header_timeout=0.3)
    async with running(config) as (_, port), aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.post(f"http://127.0.0.1:{port}/", json=FALCO_EVENT) as r:
                assert r.status == 202
            await asyncio.sleep(0.4)  # idle past headerTimeout: the keep-alive is not cut


async def test_an_unread_body_after_a_401_does_not_time_out_the_idle_connection(
    running: Running,
) -> None:
    body = json.dumps(FALCO_EVENT).encode()

    def request(token: str) -> bytes:
        return (
            b"POST / HTTP/1.1\r\nHost: talon\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + token.encode() + b"\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
        )

    async def response(reader: asyncio.StreamReader) -> bytes:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = int(re.search(rb"Content-Length: (\d+)", head, re.I).group(1))  # type: ignore[union-attr]
        return head + await reader.readexactly(length)

    async with running(ListenerConfig(token=TOKEN, header_timeout=0.3)) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request("wrong"))
        assert (await response(reader)).startswith(b"HTTP/1.1 401 ")
        await asyncio.sleep(0.1)
        writer.write(body)  # the body of the refused request, after the reply
        await asyncio.sleep(0.6)  # idle past headerTimeout
        writer.write(request(TOKEN) + body)
        assert (await response(reader)).startswith(b"HTTP/1.1 202 ")
        writer.close()


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\nContent-Length: 2\r\n\r\n{}",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nabc\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 100_000 + b"\r\n\r\n",
    ],
    ids=["request line", "NUL in a header", "chunk size", "100 KB header"],
)
async def test_a_malformed_request_gets_400_and_one_quiet_log_line(
    running: Running, caplog: pytest.LogCaptureFixture, request_bytes: bytes
) -> None:
    async with running(ListenerConfig()) as (_, port):
        with caplog.at_level(logging.DEBUG):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request_bytes)
            reply = await asyncio.wait_for(reader.read(), 5)
            writer.close()
        assert reply.split(b" ")[1] in (b"400", b"431")
        error = json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]
        assert error.startswith("malformed HTTP request: ") and "\x00" not in error
        status, _ = await post(f"http://127.0.0.1:{port}/", FALCO_EVENT)
        assert status == 202  # the server goes on
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "Traceback" not in caplog.text and "\\x00" not in caplog.text
    assert "malformed request from 127.0.0.1 refused with 4" in caplog.text


@pytest.mark.parametrize(
    "authorization",
    [b"Bearer \xff\xfe", b"Bearer " + b"x" * 7000, b"bearer  " + TOKEN.encode() + b"\xc3", b"\x80"],
    ids=["invalid UTF-8", "7 KB", "token plus a byte", "a lone byte"],
)
async def test_any_authorization_header_gets_401_never_500(
    running: Running, authorization: bytes
) -> None:
    body = json.dumps(FALCO_EVENT).encode()
    async with running(ListenerConfig(token=TOKEN)) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: " + authorization + b"\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        reply = await asyncio.wait_for(reader.readuntil(b"}"), 5)
        writer.close()
    assert reply.startswith(b"HTTP/1.1 401 "), reply
    assert TOKEN.encode() not in reply


@pytest.mark.parametrize(
    ("encoding", "body", "status", "error"),
    [
        ("gzip", json.dumps(FALCO_EVENT).encode(), 400, "the body cannot be read"),
        ("deflate", b"not deflated", 400, "the body cannot be read"),
        ("gzip", gzip.compress(json.dumps(FALCO_EVENT).encode()), 202, ""),
        ("gzip", gzip.compress(b" " * 20_000_000), 413, "maxBodySize"),
    ],
    ids=["gzip that is not", "deflate that is not", "real gzip", "a gzip bomb"],
)
async def test_a_content_encoding_is_decoded_or_refused_with_a_4xx(
    running: Running, encoding: str, body: bytes, status: int, error: str
) -> None:
    headers = {**FALCO_HEADERS, "Content-Encoding": encoding}
    async with (
        running(ListenerConfig()) as (_, port),
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.post(f"http://127.0.0.1:{port}/", data=body, headers=headers) as resp,
    ):
        assert resp.status == status
        if error:
            assert error in (await resp.json())["error"]
