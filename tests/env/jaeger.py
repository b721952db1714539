"""A real, local Jaeger v2 (in-memory storage) for tracing tests.

The ``jaeger`` binary (``github.com/jaegertracing/jaeger/cmd/jaeger``) is built
by ``tests/env/build.sh jaeger`` and cached under
``${XDG_CACHE_HOME:-~/.cache}/falco-talon/testenv/jaeger-<version>/``. This
module only needs the Python standard library.

Every listener is bound to 127.0.0.1 on a port picked at random: OTLP gRPC,
OTLP HTTP, the query HTTP API (``/api/...``, placeholder UI) and the query gRPC
API. With ``tls=JaegerTls(cert, key)`` both OTLP receivers serve TLS with that
certificate (the query API stays plain HTTP); with ``client_ca`` too, they
require a client certificate that CA signed (mutual TLS) and refuse the
handshake without one. The collector's own metrics (``:8888``) are turned off and no other
extension (health check, zpages, expvar, remote sampling, pprof) is enabled,
so several instances can run side by side and none touches the default ports.

Library use, e.g. from a pytest fixture::

    jaeger = TestJaeger(tmp_path_factory.mktemp("jaeger"))
    info = jaeger.start()   # JaegerInfo(otlp_grpc_endpoint="127.0.0.1:PORT", ...)
    # point an OTLP exporter at info.otlp_http_traces_url or info.otlp_grpc_endpoint
    trace = jaeger.wait_for_trace("falco-talon", lambda t: len(t["spans"]) == 3)
    jaeger.stop()

``traces()`` / ``trace()`` return Jaeger's v1 JSON model: a trace is
``{"traceID", "spans": [...], "processes": {...}}`` and a span has ``spanID``,
``operationName``, ``references`` (``[{"refType": "CHILD_OF", "spanID", ...}]``),
``startTime`` / ``duration`` (microseconds), ``tags`` (``[{"key", "type",
"value"}]``), ``logs`` (``[{"timestamp", "fields"}]``) and ``processID``.
``span_tags()`` and ``parent_span_id()`` flatten the common look-ups.

Command line (from the repository root), runs in the foreground until Ctrl-C::

    python -m tests.env.jaeger [--state-dir DIR]
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import IO, Any

from tests.env import testenv
from tests.env.testenv import free_port, pid_matches, terminate_pid

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "build.sh"
HOST = "127.0.0.1"
BINARY = "jaeger"
STORE = "memstore"

Trace = dict[str, Any]
Span = dict[str, Any]


class JaegerError(RuntimeError):
    """The test Jaeger could not be built, started, stopped or queried."""

    __test__ = False  # not a pytest test class


@dataclasses.dataclass(frozen=True)
class JaegerTls:
    """TLS on the OTLP receivers: PEM files (Jaeger v2's ``configtls`` settings)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None
    """Set: clients must present a certificate this CA signed (mutual TLS)."""

    def yaml(self, indent: int) -> str:
        pad = " " * indent
        lines = [
            f"{pad}tls:",
            f"{pad}  cert_file: {self.cert_file}",
            f"{pad}  key_file: {self.key_file}",
        ]
        if self.client_ca_file is not None:
            lines.append(f"{pad}  client_ca_file: {self.client_ca_file}")
        return "\n" + "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class JaegerInfo:
    """How to reach a running test Jaeger."""

    otlp_grpc_endpoint: str  # "127.0.0.1:PORT" (plaintext unless started with tls)
    otlp_http_endpoint: str  # "http(s)://127.0.0.1:PORT" (base URL, no /v1/traces)
    query_url: str  # "http://127.0.0.1:PORT": /api/services, /api/traces...
    query_grpc_endpoint: str  # "127.0.0.1:PORT" (jaeger.api_v2/api_v3 QueryService)
    pid: int
    log_path: Path
    config_path: Path
    state_dir: Path

    @property
    def otlp_http_traces_url(self) -> str:
        """Full OTLP/HTTP traces URL, what ``OTLPSpanExporter(endpoint=...)`` wants."""
        return f"{self.otlp_http_endpoint}/v1/traces"

    def otel_env(self) -> dict[str, str]:
        """``OTEL_EXPORTER_OTLP_*`` variables pointing an OTel SDK at this instance (HTTP)."""
        return {
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.otlp_http_endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
        }


# --------------------------------------------------------------------------
# helpers on Jaeger's JSON model


def span_tags(span: Mapping[str, Any]) -> dict[str, Any]:
    """A span's ``tags`` list as ``{key: value}``."""
    return {t["key"]: t.get("value") for t in span.get("tags") or ()}


def parent_span_id(span: Mapping[str, Any]) -> str | None:
    """The ``spanID`` of the span's CHILD_OF parent, if it has one."""
    for ref in span.get("references") or ():
        if ref.get("refType") == "CHILD_OF":
            return str(ref["spanID"])
    return None


_LOOKBACK = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def lookback_seconds(lookback: str | float) -> float:
    """``"90s"``, ``"15m"``, ``"1h"``, ``"2d"`` (or a number of seconds) in seconds."""
    if isinstance(lookback, int | float):
        return float(lookback)
    m = _LOOKBACK.match(lookback)
    if not m:
        raise ValueError(f"bad lookback {lookback!r} (expected e.g. '30s', '15m', '1h', '2d')")
    return float(m.group(1)) * _UNIT_SECONDS[m.group(2) or "s"]


def _log(msg: str) -> None:
    print(f"[jaeger] {msg}", file=sys.stderr, flush=True)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def _accepts(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def _config_yaml(
    ports: Mapping[str, int], max_traces: int, log_level: str, tls: JaegerTls | None = None
) -> str:
    tls_yaml = tls.yaml(8) if tls is not None else ""
    return f"""\
# generated by tests/env/jaeger.py: Jaeger v2 (v1.76.0 schema), everything on {HOST}
service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    resource:
      service.name: jaeger
    metrics:
      level: none          # no Prometheus endpoint on :8888
    logs:
      level: {log_level}

extensions:
  jaeger_storage:
    backends:
      {STORE}:
        memory:
          max_traces: {max_traces}
  jaeger_query:
    storage:
      traces: {STORE}
    enable_tracing: false  # keep Jaeger's own spans out of the store
    http:
      endpoint: {HOST}:{ports["query_http"]}
    grpc:
      endpoint: {HOST}:{ports["query_grpc"]}

receivers:
  otlp:
    protocols:
      grpc:
        endpoint: {HOST}:{ports["otlp_grpc"]}{tls_yaml}
      http:
        endpoint: {HOST}:{ports["otlp_http"]}{tls_yaml}

processors:
  batch:
    timeout: 50ms          # spans are queryable almost at once

exporters:
  jaeger_storage_exporter:
    trace_storage: {STORE}
"""


# Instances with a running process, stopped at interpreter exit if the test forgot.
_RUNNING: weakref.WeakSet[TestJaeger] = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    for jaeger in list(_RUNNING):
        with contextlib.suppress(Exception):
            jaeger.stop()


# --------------------------------------------------------------------------
# the instance


class TestJaeger:
    """One Jaeger v2 process with in-memory storage, recorded in ``state_dir``.

    ``state_dir`` holds ``jaeger.yaml``, ``jaeger.log`` and ``jaeger.pid``; it
    defaults to a fresh temporary directory, removed by ``stop()`` (pass one
    to keep the log). An instance holds an exclusive
    lock on its state directory while running, so two instances never share
    one; a ``jaeger`` left running from that directory by a dead test session
    is stopped by the next ``start()``.
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        state_dir: str | os.PathLike[str] | None = None,
        *,
        bin_dir: str | os.PathLike[str] | None = None,
        startup_timeout: float = 30.0,
        stop_timeout: float = 10.0,
        max_traces: int = 100_000,
        log_level: str = "info",
        tls: JaegerTls | None = None,
    ) -> None:
        self._own_dir = state_dir is None
        if state_dir is None:
            state_dir = tempfile.mkdtemp(prefix="falco-talon-jaeger-")
        self.state_dir = Path(state_dir).absolute()
        self._bin_dir = Path(bin_dir) if bin_dir is not None else None
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.max_traces = max_traces
        self.log_level = log_level
        self.tls = tls
        self._info: JaegerInfo | None = None
        self._lock_file: IO[str] | None = None

    # ---- paths
    @property
    def config_path(self) -> Path:
        return self.state_dir / "jaeger.yaml"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "jaeger.log"

    @property
    def pid_path(self) -> Path:
        return self.state_dir / "jaeger.pid"

    @property
    def info(self) -> JaegerInfo:
        """Connection details; raises if not started."""
        if self._info is None:
            raise JaegerError("TestJaeger is not started")
        return self._info

    # ---- binary
    def bin_dir(self) -> Path:
        """Directory holding ``jaeger``; runs ``build.sh jaeger`` if needed."""
        if self._bin_dir is None:
            res = subprocess.run(
                ["bash", str(BUILD_SCRIPT), "jaeger"],
                stdout=subprocess.PIPE,
                text=True,
                check=False,
            )
            if res.returncode != 0:
                raise JaegerError(
                    f"{BUILD_SCRIPT} jaeger failed (exit {res.returncode}); see its output above"
                )
            lines = res.stdout.strip().splitlines()
            if not lines:
                raise JaegerError(f"{BUILD_SCRIPT} jaeger printed no bin directory")
            self._bin_dir = Path(lines[-1])
        if not os.access(self._bin_dir / BINARY, os.X_OK):
            raise JaegerError(f"{self._bin_dir / BINARY} is missing or not executable")
        return self._bin_dir

    # ---- lifecycle
    def start(self) -> JaegerInfo:
        """Start Jaeger and wait until it serves queries and accepts OTLP (idempotent)."""
        if self._info is not None and self.is_running():
            return self._info
        self._info = None
        bin_dir = self.bin_dir()
        self._lock()
        try:
            self._stop_stale()
            t0 = time.monotonic()
            last_error: JaegerError | None = None
            for attempt in range(3):  # ports are picked racily: retry on a clash
                ports: dict[str, int] = {}
                for name in ("otlp_grpc", "otlp_http", "query_http", "query_grpc"):
                    ports[name] = free_port(HOST, exclude=list(ports.values()))
                try:
                    info = self._start_once(bin_dir, ports)
                except JaegerError as e:
                    last_error = e
                    if "address already in use" not in str(e) or attempt == 2:
                        break
                    _log(f"port clash, retrying ({attempt + 1}/2)")
                _log(f"up in {time.monotonic() - t0:.2f}s: {info.query_url} (pid {info.pid})")
                self._info = info
                _RUNNING.add(self)
                return info
            assert last_error is not None
            raise last_error
        except BaseException:
            self._unlock()
            raise

    def _start_once(self, bin_dir: Path, ports: Mapping[str, int]) -> JaegerInfo:
        self.config_path.write_text(_config_yaml(ports, self.max_traces, self.log_level, self.tls))
        args = [str(bin_dir / BINARY), f"--config={self.config_path}"]
        with open(self.log_path, "ab") as log:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
            log.write(f"\n==== {stamp} {shlex.join(args)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.state_dir,
                start_new_session=True,  # no Ctrl-C from the terminal before teardown
                close_fds=True,
            )
        testenv._CHILDREN[proc.pid] = proc  # reaped by terminate_pid()
        self.pid_path.write_text(f"{proc.pid}\n")
        info = JaegerInfo(
            otlp_grpc_endpoint=f"{HOST}:{ports['otlp_grpc']}",
            otlp_http_endpoint=f"{'https' if self.tls else 'http'}://{HOST}:{ports['otlp_http']}",
            query_url=f"http://{HOST}:{ports['query_http']}",
            query_grpc_endpoint=f"{HOST}:{ports['query_grpc']}",
            pid=proc.pid,
            log_path=self.log_path,
            config_path=self.config_path,
            state_dir=self.state_dir,
        )
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self._ready(info, ports):
                return info
            if proc.poll() is not None:
                testenv._CHILDREN.pop(proc.pid, None)
                self.pid_path.unlink(missing_ok=True)
                raise JaegerError(
                    f"jaeger exited during startup (code {proc.returncode}); "
                    f"last lines of {self.log_path}:\n{_tail(self.log_path)}"
                )
            if time.monotonic() > deadline:
                self._terminate(proc.pid)
                raise JaegerError(
                    f"jaeger not ready after {self.startup_timeout:.0f}s; "
                    f"last lines of {self.log_path}:\n{_tail(self.log_path)}"
                )
            time.sleep(0.05)

    def _ready(self, info: JaegerInfo, ports: Mapping[str, int]) -> bool:
        try:
            code, _ = self._get(f"{info.query_url}/api/services", timeout=1.0)
        except (OSError, ValueError):
            return False
        return code == 200 and _accepts(ports["otlp_http"]) and _accepts(ports["otlp_grpc"])

    def is_running(self) -> bool:
        """True if this instance's process is alive (not a health check)."""
        return self._info is not None and pid_matches(self._info.pid, BINARY, str(self.state_dir))

    def stop(self) -> None:
        """Stop this instance's process (SIGTERM, SIGKILL after ``stop_timeout``)."""
        info, self._info = self._info, None
        _RUNNING.discard(self)
        try:
            if info is not None:
                self._terminate(info.pid)
        finally:
            self._unlock()
        if info is not None and self._own_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def _terminate(self, pid: int) -> None:
        try:
            terminate_pid(pid, BINARY, str(self.state_dir), self.stop_timeout)
        except testenv.TestEnvError as e:
            raise JaegerError(str(e)) from e
        finally:
            # Our own child that did not look like `jaeger` (e.g. a wrapper script
            # given as bin_dir): stop it through its Popen object.
            proc = testenv._CHILDREN.pop(pid, None)
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            self.pid_path.unlink(missing_ok=True)

    def _stop_stale(self) -> None:
        """Stop a ``jaeger`` recorded in the state dir by a session that died."""
        try:
            pid = int(self.pid_path.read_text().strip() or 0)
        except (OSError, ValueError):
            return
        if pid and pid_matches(pid, BINARY, str(self.state_dir)):
            _log(f"stopping a stale jaeger (pid {pid}) left in {self.state_dir}")
            self._terminate(pid)
        self.pid_path.unlink(missing_ok=True)

    def _lock(self) -> None:
        if self._lock_file is not None:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        f = open(self.state_dir / ".lock", "w")  # noqa: SIM115 - held while running
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise JaegerError(f"{self.state_dir} is in use by another TestJaeger") from None
        self._lock_file = f

    def _unlock(self) -> None:
        f, self._lock_file = self._lock_file, None
        if f is not None:
            fcntl.flock(f, fcntl.LOCK_UN)
            f.close()

    def __enter__(self) -> JaegerInfo:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- query API
    @staticmethod
    def _get(url: str, timeout: float = 5.0) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                return int(resp.status), resp.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            return int(e.code), e.read().decode(errors="replace")

    def _api(self, path: str, params: Mapping[str, str | int] | None = None) -> Any:
        url = f"{self.info.query_url}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        code, body = self._get(url)
        try:
            doc = json.loads(body)
        except ValueError:
            raise JaegerError(f"GET {url}: HTTP {code}, not JSON: {body[:500]}") from None
        if code != 200 or not isinstance(doc, dict) or doc.get("errors"):
            raise JaegerError(f"GET {url}: HTTP {code}: {body[:500]}")
        return doc.get("data")

    def services(self) -> list[str]:
        """Names of the services that reported spans."""
        return sorted(self._api("/api/services") or [])

    def traces(
        self,
        service: str,
        *,
        limit: int = 20,
        lookback: str | float = "1h",
        operation: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> list[Trace]:
        """Traces with a span of ``service`` started in the last ``lookback`` (newest first).

        ``lookback`` is ``"30s"``, ``"15m"``, ``"1h"``, ``"2d"``... or seconds;
        ``tags`` restricts to traces with a span carrying those tag values.
        """
        end_us = int(time.time() * 1e6)
        start_us = end_us - int(lookback_seconds(lookback) * 1e6)
        params: dict[str, str | int] = {
            "service": service,
            "limit": limit,
            "start": start_us,
            "end": end_us,
        }
        if operation:
            params["operation"] = operation
        if tags:
            params["tags"] = json.dumps(dict(tags))
        data: list[Trace] = self._api("/api/traces", params) or []
        data.sort(key=lambda t: min((s["startTime"] for s in t["spans"]), default=0), reverse=True)
        return data

    def trace(self, trace_id: str) -> Trace:
        """One trace by its hex id."""
        data = self._api(f"/api/traces/{urllib.parse.quote(trace_id)}")
        if not data:
            raise JaegerError(f"trace {trace_id} not found")
        return dict(data[0])

    def wait_for_trace(
        self,
        service: str,
        predicate: Callable[[Trace], bool] | None = None,
        timeout: float = 10.0,
        *,
        interval: float = 0.1,
        limit: int = 100,
        lookback: str | float = "1h",
    ) -> Trace:
        """Poll ``traces(service)`` until one satisfies ``predicate`` (any trace if None).

        Spans of one trace may arrive in several batches, so the predicate
        should check everything it needs (e.g. the number of spans).
        """
        deadline = time.monotonic() + timeout
        seen: list[Trace] = []
        while True:
            seen = self.traces(service, limit=limit, lookback=lookback)
            for t in seen:
                if predicate is None or predicate(t):
                    return t
            if time.monotonic() > deadline:
                break
            time.sleep(interval)
        summary = "\n".join(
            f"  {t['traceID']}: " + ", ".join(sorted(s["operationName"] for s in t["spans"]))
            for t in seen[:10]
        )
        raise JaegerError(
            f"no trace of service {service!r} matched within {timeout:.1f}s; "
            f"{len(seen)} trace(s) seen"
            + (f":\n{summary}" if summary else "")
            + f"\nservices: {self.services()}"
        )


# --------------------------------------------------------------------------
# command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.env.jaeger",
        description="Run a local Jaeger v2 (in-memory) on free 127.0.0.1 ports until Ctrl-C.",
    )
    parser.add_argument("--state-dir", default=None, help="default: a fresh temporary directory")
    parser.add_argument("--timeout", type=float, default=30.0, help="startup timeout (s)")
    args = parser.parse_args(argv)
    jaeger = TestJaeger(args.state_dir, startup_timeout=args.timeout)
    try:
        info = jaeger.start()
    except JaegerError as e:
        print(f"jaeger: {e}", file=sys.stderr)
        return 1
    print(f"OTLP gRPC:  {info.otlp_grpc_endpoint}")
    print(f"OTLP HTTP:  {info.otlp_http_endpoint}")
    print(f"query/UI:   {info.query_url}")
    print(f"log:        {info.log_path}", flush=True)

    def _interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while jaeger.is_running():
            time.sleep(0.5)
        print(f"jaeger exited; last lines of {info.log_path}:\n{_tail(info.log_path)}")
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        jaeger.stop()


if __name__ == "__main__":
    sys.exit(main())
