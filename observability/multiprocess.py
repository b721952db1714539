"""Metrics of several server processes, served whole by any of them (``processes`` > 1).

Cross-cutting, beside ``observability.metrics``. Prometheus scrapes whichever process the
kernel hands its connection to, so every process must answer with the totals of all.
This is prometheus-client's multiprocess mode: the supervisor sets
``PROMETHEUS_MULTIPROC_DIR`` to a directory of its own before it starts the server
processes; each process keeps its values in files of its own there
(``counter_<pid>.db``, ``histogram_<pid>.db``, ``gauge_livesum_<pid>.db``), and a scrape
sums every file (``MultiProcessCollector``). The files of a process that died stay, so
counters never go back; its live gauges are removed (``mark_process_dead``, by the
supervisor).

One change from the stock mode: the stock value writes its file on every increment (a
lock, a ``getpid`` and an mmap write: ~2.5 µs more than in one process, and an event makes
about 14 increments). :class:`BufferedValue` keeps the value in memory as the one-process
value does and a thread writes the changed values every :data:`FLUSH_INTERVAL` seconds,
and the scraped process writes its own first: a scrape sees the other processes' values
as they were at most :data:`FLUSH_INTERVAL` ago. A process killed with SIGKILL loses its
last unwritten increments (at most that long); one that exits normally writes them first
(:func:`flush`). Gauges computed when read (queue depth, events in flight) are sampled
at the same times (:func:`sample`).
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import values
from prometheus_client.mmap_dict import MmapedDict, mmap_key

ENV = "PROMETHEUS_MULTIPROC_DIR"
FLUSH_INTERVAL = 0.5


def directory() -> str:
    """The shared metrics directory; empty when this process serves alone."""
    return os.environ.get(ENV, "")


class _Writer:
    """This process's metric files, their values, and the thread writing them behind."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        """Held around every use of the files (``MmapedDict`` is not thread-safe)."""
        self.files: dict[str, MmapedDict] = {}
        self.values: list[BufferedValue] = []
        self.samplers: list[Callable[[], None]] = []
        self.thread: threading.Thread | None = None

    def file(self, prefix: str) -> MmapedDict:
        f = self.files.get(prefix)
        if f is None:
            path = os.path.join(directory(), f"{prefix}_{os.getpid()}.db")
            f = self.files[prefix] = MmapedDict(path)  # type: ignore[no-untyped-call]
        return f

    def add(self, value: BufferedValue) -> None:
        self.values.append(value)
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="metrics-writer", daemon=True)
            self.thread.start()
            atexit.register(self.flush)

    def _run(self) -> None:
        while True:
            time.sleep(FLUSH_INTERVAL)
            self.flush()

    def flush(self) -> None:
        for sampler in list(self.samplers):
            sampler()
        with self.lock:
            for v in self.values:
                current = v.value
                if current != v.written:
                    v.file.write_value(v.key, current, 0.0)  # type: ignore[no-untyped-call]
                    v.written = current


_WRITER = _Writer()


class LocalValue:
    """prometheus-client's value for one sample, in this process's memory, without the lock
    prometheus-client's own takes on every increment (~40% of the cost of counting an
    event): every count is made on the event loop's thread, and a scrape only reads. The
    one-process value (``observability.metrics``), and the base of :class:`BufferedValue`.
    The signature is ``prometheus_client.values``' own."""

    _multiprocess = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.value: float = 0.0

    def inc(self, amount: float) -> None:
        self.value += amount

    def set(self, value: float, timestamp: float | None = None) -> None:
        self.value = value

    def set_exemplar(self, exemplar: Any) -> None:
        return None

    def get(self) -> float:
        return self.value

    def get_exemplar(self) -> Any:
        return None


class BufferedValue(LocalValue):
    """prometheus-client's value for one sample in multiprocess mode, written behind (see
    the module's docstring)."""

    _multiprocess = True

    def __init__(
        self,
        typ: str,
        metric_name: str,
        name: str,
        labelnames: list[str],
        labelvalues: list[str],
        help_text: str,
        multiprocess_mode: str = "",
        **kwargs: Any,
    ) -> None:
        prefix = f"gauge_{multiprocess_mode}" if typ == "gauge" else typ
        self.key = mmap_key(metric_name, name, labelnames, labelvalues, help_text)
        with _WRITER.lock:
            self.file = _WRITER.file(prefix)
            stored = self.file.read_value(self.key)  # type: ignore[no-untyped-call]
        self.value = stored[0]
        self.written = self.value
        _WRITER.add(self)


def enable() -> None:
    """Make the metrics created from now on multiprocess ones (``directory()`` is set)."""
    values.ValueClass = BufferedValue


def enable_local() -> None:
    """Make the metrics created from now on :class:`LocalValue` ones (this process alone)."""
    values.ValueClass = LocalValue


def sample(sampler: Callable[[], None]) -> None:
    """Run ``sampler`` (which sets gauges from the live state) before each write."""
    _WRITER.samplers.append(sampler)


def flush() -> None:
    """Write this process's values now (before a scrape, and at exit)."""
    _WRITER.flush()


def process_dead(pid: int) -> None:
    """Forget the live gauges of a server process that exited (its counters stay)."""
    from prometheus_client.multiprocess import mark_process_dead

    mark_process_dead(pid, directory())  # type: ignore[no-untyped-call]
