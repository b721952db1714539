"""Several server processes on one port (``processes``): the supervisor and its children.

Position in the flow: around everything. One Python process runs the event loop, the HTTP
server and the pipeline on one core; ``processes: N`` (or ``auto``: one per CPU this
process may use) runs N of them, each the whole engine (HTTP, queue, workers, pipeline,
notifiers, rules watcher), behind one port:

* The process the user started becomes the **supervisor**. It checks the configuration
  and the rules once (an error is reported once, as with one process), prepares the state
  the children share (a directory in ``/dev/shm``: the metrics files and the storm-control
  file, ``engine.shared``), then forks the N **server processes**. It serves nothing.
* Each server process binds ``listenPort`` (and ``probesPort``) with ``SO_REUSEPORT``; the
  kernel spreads new connections over them. Deduplication and throttles are kept in the
  shared file, so they hold whichever process an event lands on; ``/metrics`` from any
  process shows the totals of all (``observability.multiprocess``); ``/healthz`` names the
  process that answered (``process``, ``processes``, ``pid``), and so do the logs (a
  ``process`` field: 1 to N, 0 for the supervisor; absent with one process).
* SIGTERM or SIGINT to the supervisor is passed to every server process, which drains as
  one process does (``shutdownTimeout``); the supervisor exits when they all have, 0 if
  they all stopped cleanly (any still running ``shutdownTimeout`` + 10 s later is killed).
* A server process that dies unexpectedly is started again, after a backoff that doubles
  from 0.5 s to 30 s while it keeps dying (reset once it has served a minute). One that
  dies :data:`STARTUP_ATTEMPTS` times in a row before listening (its port taken, its rules
  file broken since the supervisor checked it) makes the supervisor stop the others and
  exit 1, as one process failing at start-up exits 1.
* A server process whose supervisor died (kill -9) stops by itself, gracefully.

Forked, not spawned: the children inherit the checked settings, the plug-ins registered
(entry points or code) and the imported modules, and start in milliseconds. The supervisor
forks before it runs any thread or event loop.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config import Settings, with_overrides
from engine.contract.errors import ConfigError
from engine.shared import SharedCounters, SharedDedup, SharedState
from engine.storm import Throttler
from observability import multiprocess

log = logging.getLogger("falco_talon.processes")

STARTUP_ATTEMPTS = 5
"""Deaths in a row before listening after which the supervisor gives up."""
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 30.0
STABLE_AFTER = 60.0
"""Seconds of serving after which a server process's deaths are no longer counted."""
KILL_AFTER = 10.0
"""Seconds beyond ``shutdownTimeout`` the supervisor waits before killing a server process."""
_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}


# -- how many -----------------------------------------------------------------------------------


def available_cpus() -> int:
    """The CPUs this process may use: its CPU affinity, bounded by its cgroup's CPU quota
    rounded up; at least 1."""
    affinity = getattr(os, "sched_getaffinity", None)  # Linux
    cpus = len(affinity(0)) if affinity is not None else os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def cgroup_cpu_quota(root: Path = Path("/")) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (v2 ``cpu.max``, v1
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``; the tightest of the cgroup and its
    parents); None when unlimited or unknown. ``root``: where ``/proc`` and ``/sys`` are."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
        mounts = (root / "proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "" and line.startswith("0::"):
            for d in _cgroup_dirs(root, mounts, "cgroup2", "", path):
                limits += _quota(d / "cpu.max", None)
        elif "cpu" in controllers.split(","):
            for d in _cgroup_dirs(root, mounts, "cgroup", "cpu", path):
                limits += _quota(d / "cpu.cfs_quota_us", d / "cpu.cfs_period_us")
    return min(limits) if limits else None


def _cgroup_dirs(
    root: Path, mounts: list[str], fstype: str, controller: str, path: str
) -> list[Path]:
    """The cgroup's directory and its parents up to the mount, for the mount of ``fstype``
    (and, for v1, ``controller``). A container sees its own cgroup as the mount's root."""
    for line in mounts:
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 3 or rfields[0] != fstype:
            continue
        if controller and controller not in rfields[2].split(","):
            continue
        mount_root, mount_point = fields[3], fields[4]
        rel = os.path.relpath(path, mount_root) if path.startswith(mount_root) else "."
        base = root / mount_point.lstrip("/")
        here = Path(os.path.normpath(base / rel))
        if not here.is_dir():
            here = base
        out = [here]
        while here != base and base in here.parents:
            here = here.parent
            out.append(here)
        return out
    return []


def _quota(quota_file: Path, period_file: Path | None) -> list[float]:
    try:
        text = quota_file.read_text().split()
        if period_file is None:  # v2: "max 100000" or "200000 100000"
            quota, period = text[0], text[1]
        else:
            quota, period = text[0], period_file.read_text().split()[0]
        if quota in ("max", "-1"):
            return []
        return [int(quota) / int(period)]
    except (OSError, IndexError, ValueError, ZeroDivisionError):
        return []


def count(setting: int | str) -> int:
    """The number of server processes ``processes`` asks for."""
    return available_cpus() if setting == "auto" else int(setting)


# -- inside a server process --------------------------------------------------------------------


@dataclass
class Child:
    """What a server process knows of its place among the others."""

    index: int
    """1 to ``count``."""
    count: int
    state: SharedState
    ready_fd: int

    def identity(self) -> dict[str, Any]:
        return {"process": self.index, "processes": self.count, "pid": os.getpid()}

    def dedup(self, window: float) -> SharedDedup:
        return SharedDedup(self.state, window)

    def throttler(self) -> Throttler:
        return Throttler(SharedCounters(self.state))


_CURRENT: Child | None = None


def current() -> Child | None:
    """This server process's place, or None when it serves alone (``processes: 1``)."""
    return _CURRENT


def identity() -> dict[str, Any]:
    """For ``/healthz``: which process answered, of how many; nothing when alone."""
    return _CURRENT.identity() if _CURRENT is not None else {}


def ready() -> None:
    """Tell the supervisor this server process listens (a no-op when alone)."""
    child = _CURRENT
    if child is not None and child.ready_fd >= 0:
        os.write(child.ready_fd, b"R")
        os.close(child.ready_fd)
        child.ready_fd = -1


class _ProcessField(logging.Filter):
    """Adds ``process`` (0: the supervisor, 1 to N) to every record's fields."""

    def __init__(self) -> None:
        super().__init__()
        self.index = 0

    def filter(self, record: logging.LogRecord) -> bool:
        fields = getattr(record, "fields", None)
        extra = fields if isinstance(fields, dict) else {}
        record.fields = {"process": self.index, **extra}
        return True


# -- the supervisor -----------------------------------------------------------------------------


@dataclass
class _Slot:
    index: int
    pid: int = 0
    ready_fd: int = -1
    started: float = 0.0
    ready: bool = False
    failures: int = 0
    """Deaths in a row (reset after STABLE_AFTER of serving): the restart backoff."""
    start_failures: int = 0
    """Deaths in a row before listening."""
    restart_at: float | None = None
    exit_code: int | None = None


@dataclass
class Supervisor:
    settings: Settings
    serve_one: Callable[[Settings], None]
    count: int
    runtime: str = ""
    state_path: str = ""
    slots: list[_Slot] = field(default_factory=list)
    stopping: bool = False
    deadline: float = 0.0
    failed: bool = False
    announced: bool = False
    _lifeline: tuple[int, int] = (-1, -1)
    _mask: set[signal.Signals | int] | None = None
    """The signal mask before the supervisor blocked the signals it waits for."""
    _field: _ProcessField = field(default_factory=_ProcessField)

    def run(self) -> int:
        self._check_ports()  # a ConfigError here: nothing made yet
        try:
            self._prepare()
            self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
            self._lifeline = os.pipe()
            self.slots = [_Slot(i + 1) for i in range(self.count)]
            for slot in self.slots:
                self._start(slot)
            while not self._step():
                pass
        finally:
            self._cleanup()
        return 1 if self.failed or any(s.exit_code for s in self.slots) else 0

    def _check_ports(self) -> None:
        s = self.settings.server
        port = _check_port(s.listen_address, s.listen_port, "listenPort")
        if s.probes_port:
            _check_port(s.listen_address, s.probes_port, "probesPort")
        if port != s.listen_port:
            self.settings = with_overrides(self.settings, server={"listen_port": port})

    def _prepare(self) -> None:
        s = self.settings.server
        shm = Path("/dev/shm")
        where = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
        self.runtime = tempfile.mkdtemp(prefix="falco-talon-", dir=where)
        metrics = os.path.join(self.runtime, "metrics")
        os.mkdir(metrics)
        os.environ[multiprocess.ENV] = metrics
        self.state_path = os.path.join(self.runtime, "state")
        SharedState.create(self.state_path)
        for handler in logging.getLogger().handlers:
            handler.addFilter(self._field)
        log.info(
            "starting server processes",
            extra={
                "fields": {
                    "processes": self.count,
                    "address": f"{s.listen_address}:{s.listen_port}",
                    "shared_state": self.runtime,
                }
            },
        )

    def _start(self, slot: _Slot) -> None:
        ready_r, ready_w = os.pipe()
        os.set_blocking(ready_r, False)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the server process: never returns
            os.close(ready_r)
            self._child(slot.index, ready_w)
        os.close(ready_w)
        slot.pid, slot.ready_fd, slot.started, slot.ready = pid, ready_r, time.monotonic(), False
        slot.restart_at = None

    def _child(self, index: int, ready_fd: int) -> None:
        global _CURRENT  # noqa: PLW0603 - one place per process, set once after fork
        code = 1
        try:
            life_r, life_w = self._lifeline
            os.close(life_w)
            for other in self.slots:
                if other.ready_fd >= 0 and other.index != index:
                    os.close(other.ready_fd)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask or set())
            self._field.index = index
            _CURRENT = Child(index, self.count, SharedState(self.state_path), ready_fd)
            threading.Thread(
                target=_watch_supervisor, args=(life_r,), name="supervisor-watch", daemon=True
            ).start()
            self.serve_one(self.settings)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if isinstance(exc.code, str):
                print(exc.code, file=sys.stderr)
        except KeyboardInterrupt:  # Ctrl-C reaches the whole process group
            code = 130
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                multiprocess.flush()  # the last counts, not yet written behind
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)

    def _step(self) -> bool:
        """One turn of the supervisor's loop; True when it is over."""
        info = signal.sigtimedwait(_SIGNALS, 0.1)
        if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
            self._stop(signal.Signals(info.si_signo))
        self._reap()
        self._check_ready()
        now = time.monotonic()
        if self.stopping:
            running = [s for s in self.slots if s.pid]
            if not running:
                return True
            if now > self.deadline:
                for s in running:
                    log.error(
                        "server process still running after shutdownTimeout: killing it",
                        extra={"fields": {"server_process": s.index, "pid": s.pid}},
                    )
                    _kill(s.pid, signal.SIGKILL)
                self.deadline = now + 3600
            return False
        for slot in self.slots:
            if slot.restart_at is not None and now >= slot.restart_at:
                self._start(slot)
        return False

    def _stop(self, sig: signal.Signals) -> None:
        if not self.stopping:
            log.info(
                "signal received: stopping the server processes",
                extra={"fields": {"signal": sig.name}},
            )
            self.stopping = True
            self.deadline = time.monotonic() + self.settings.server.shutdown_timeout + KILL_AFTER
        for slot in self.slots:
            slot.restart_at = None
            if slot.pid:
                _kill(slot.pid, sig)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is not None:
                self._exited(slot, os.waitstatus_to_exitcode(status))

    def _exited(self, slot: _Slot, code: int) -> None:
        multiprocess.process_dead(slot.pid)
        self._check_ready()
        os.close(slot.ready_fd)
        pid, slot.pid, slot.ready_fd = slot.pid, 0, -1
        how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
        fields: dict[str, Any] = {"server_process": slot.index, "pid": pid, "how": how}
        if self.stopping:
            slot.exit_code = code
            if code:
                log.error("server process stopped badly", extra={"fields": fields})
            return
        now = time.monotonic()
        if slot.ready and now - slot.started > STABLE_AFTER:
            slot.failures = 0
        slot.failures += 1
        slot.start_failures = 0 if slot.ready else slot.start_failures + 1
        if slot.start_failures >= STARTUP_ATTEMPTS:
            log.error(
                "server process failed to start %d times in a row: stopping",
                slot.start_failures,
                extra={"fields": fields},
            )
            self.failed = True
            self._stop(signal.SIGTERM)
            return
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (slot.failures - 1))
        fields["restart_in_s"] = delay
        what = "server process died" if slot.ready else "server process failed to start"
        log.error(f"{what}: starting it again", extra={"fields": fields})
        slot.restart_at = now + delay

    def _check_ready(self) -> None:
        for slot in self.slots:
            if slot.ready or slot.ready_fd < 0:
                continue
            try:
                got = os.read(slot.ready_fd, 1)
            except BlockingIOError:
                continue
            if got:
                slot.ready = True
                if self.announced:
                    log.info(
                        "server process started again",
                        extra={"fields": {"server_process": slot.index, "pid": slot.pid}},
                    )
        if not self.announced and all(s.ready for s in self.slots):
            self.announced = True
            log.info(
                "server processes listening",
                extra={"fields": {"pids": ",".join(str(s.pid) for s in self.slots)}},
            )

    def _cleanup(self) -> None:
        for fd in self._lifeline:
            if fd >= 0:
                os.close(fd)
        for slot in self.slots:
            if slot.pid:  # only on an error of the supervisor itself
                _kill(slot.pid, signal.SIGKILL)
        if self.runtime:
            shutil.rmtree(self.runtime, ignore_errors=True)
            os.environ.pop(multiprocess.ENV, None)
        if self._mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
        log.info("stopped")
        for handler in logging.getLogger().handlers:
            handler.removeFilter(self._field)


def _kill(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _watch_supervisor(fd: int) -> None:
    """In a server process: the supervisor holds the other end of ``fd``; when it is gone
    (end of file), stop gracefully as on SIGTERM."""
    while True:
        try:
            if not os.read(fd, 1):
                break
        except InterruptedError:
            continue
    log.error("the supervisor is gone: stopping")
    os.kill(os.getpid(), signal.SIGTERM)


def _check_port(host: str, port: int, key: str) -> int:
    """The port the server processes will share (a free one for 0); a port in use is a
    ConfigError here, once, rather than N failures to bind."""
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ConfigError(f"listenAddress {host!r}: {exc.strerror}") from None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(address)
            except OSError as exc:
                raise ConfigError(f"{key} {port} on {host}: {exc.strerror}") from None
            port = port or int(s.getsockname()[1])
    return port


def serve_processes(
    settings: Settings,
    serve_one: Callable[[Settings], None],
    check: Callable[[Settings], None],
) -> int:
    """Serve with ``settings.server.processes`` processes; the exit code.

    One: ``serve_one(settings)`` here, as always. More: ``check(settings)`` here (it raises
    what makes the start-up fail), then a :class:`Supervisor` runs ``serve_one`` in each
    server process."""
    n = count(settings.server.processes)
    if n == 1:
        serve_one(settings)
        return 0
    if not hasattr(signal, "sigtimedwait"):
        raise ConfigError(f"processes: {n} needs Linux (SO_REUSEPORT balancing, sigtimedwait)")
    check(settings)
    return Supervisor(settings, serve_one, n).run()
