"""Prometheus metrics, served at ``GET /metrics``.

Cross-cutting: the server, the pipeline and the notification dispatcher count into one
:class:`Metrics`. Labels stay low-cardinality: no pod names and no event text; a Falco
priority outside the known levels is counted as ``unknown``, and sources beyond the first
few dozen seen as ``other``. Every name starts with ``falco_talon_``. When several server
processes share the port, each counts in files the others read (``observability.multiprocess``)
and ``/metrics`` shows the totals of all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from observability import multiprocess

disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created only doubles the output

__all__ = ["CONTENT_TYPE", "Metrics"]

PRIORITIES = frozenset(
    {"debug", "informational", "notice", "warning", "error", "critical", "alert", "emergency"}
)
MAX_SOURCES = 32
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class _RulesInfo(Collector):
    """``falco_talon_rules_info{checksum="..."} 1``, read from the live rule set at scrape
    time, so it can never disagree with what is serving."""

    def __init__(self) -> None:
        self.checksum: Callable[[], str] | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "falco_talon_rules_info",
            "The rules serving now, by checksum (as in /healthz): always 1.",
            labels=["checksum"],
        )
        if self.checksum is not None:
            family.add_metric([self.checksum()], 1)
        yield family


class _Spans(Collector):
    """``falco_talon_spans_total{outcome}``, read from the tracing's counts at scrape time
    (the export process reports to this process; the SDK's exporters are counted here)."""

    OUTCOMES = ("exported", "failed", "dropped")

    def __init__(self) -> None:
        self.counts: Callable[[], Mapping[str, int]] | None = None

    HELP = (
        "Spans of traced events, by outcome: exported (the collector took them), failed "
        "(it could not be reached or refused them, after retries; logged), dropped (the "
        "export queue was full)."
    )

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("falco_talon_spans", self.HELP, labels=["outcome"])
        counts = self.counts() if self.counts is not None else {}
        for outcome in self.OUTCOMES:
            family.add_metric([outcome], counts.get(outcome, 0))
        yield family


class Metrics:
    """The process's metrics, in a registry of their own (one per service, one per test)."""

    def __init__(self) -> None:
        self.shared = bool(multiprocess.directory())
        """Several server processes: values go to the shared directory, scrapes sum them."""
        if self.shared:
            multiprocess.enable()
        else:
            multiprocess.enable_local()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events_received = Counter(
            "falco_talon_events_received",
            "Falco events accepted, by source and priority.",
            ["source", "priority"],
            registry=r,
        )
        self.events_rejected = Counter(
            "falco_talon_events_rejected",
            "Requests refused, by reason (invalid, too_large, queue_full, shutting_down, "
            "queue_unavailable, unauthorized, body_timeout).",
            ["reason"],
            registry=r,
        )
        self.rules_matched = Counter(
            "falco_talon_rules_matched",
            "Talon rules matched by events, by rule.",
            ["rule"],
            registry=r,
        )
        self.events_processed = Counter(
            "falco_talon_events_processed",
            "Events that finished their run, by final state (notified, unmatched, failed).",
            ["state"],
            registry=r,
        )
        self.actions = Counter(
            "falco_talon_actions",
            "Action steps, by actionner and outcome (succeeded, failed, skipped, planned).",
            ["actionner", "outcome"],
            registry=r,
        )
        self.notifications = Counter(
            "falco_talon_notifications",
            "Notification deliveries, by notifier and outcome "
            "(delivered, retried, failed, refused).",
            ["notifier", "outcome"],
            registry=r,
        )
        self.event_seconds = Histogram(
            "falco_talon_event_processing_seconds",
            "Time from dequeuing an event to the end of its run.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.action_seconds = Histogram(
            "falco_talon_action_duration_seconds",
            "Time one action took, by actionner.",
            ["actionner"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "falco_talon_queue_depth",
            "Events accepted and waiting for a worker.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.in_flight = Gauge(
            "falco_talon_events_in_flight",
            "Events being processed now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.events_deduplicated = Counter(
            "falco_talon_events_deduplicated",
            "Events answered duplicate: the same event was accepted within the window.",
            registry=r,
        )
        self.events_dead_lettered = Counter(
            "falco_talon_events_dead_lettered",
            "Events given up after nats.maxDeliver deliveries, moved to the dead letters.",
            registry=r,
        )
        self.rules_reloads = Counter(
            "falco_talon_rules_reloads",
            "Rules reloads after a change of the rules files, by result (succeeded, rejected).",
            ["result"],
            registry=r,
        )
        for result in ("succeeded", "rejected"):
            self.rules_reloads.labels(result)
        self._rules_info = _RulesInfo()
        r.register(self._rules_info)
        self._spans = _Spans()
        r.register(self._spans)
        self._scraped = r
        if self.shared:  # every process's files, and this process's rules (all serve the same)
            self._scraped = CollectorRegistry(auto_describe=True)
            MultiProcessCollector(self._scraped)  # type: ignore[no-untyped-call]
            self._scraped.register(self._rules_info)
            # (in no registry: the scrape reads it from the files, as every value here)
            self._spans_shared = Counter(
                "falco_talon_spans", _Spans.HELP, ["outcome"], registry=None
            )
            for outcome in _Spans.OUTCOMES:
                self._spans_shared.labels(outcome)
        self._sources: set[str] = set()
        self._received: dict[tuple[str, str], Counter] = {}
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def received(self, source: str, priority: str) -> None:
        key = (source, priority)
        child = self._received.get(key)
        if child is None:
            if source not in self._sources:
                if len(self._sources) >= MAX_SOURCES:
                    source = "other"
                else:
                    self._sources.add(source)
            level = priority.strip().lower()
            level = "informational" if level == "info" else level
            child = self.events_received.labels(source, level if level in PRIORITIES else "unknown")
            if len(self._received) < 4096:
                self._received[key] = child
        child.inc()

    # Recording, with the labelled children cached: ``labels()`` validates and locks on every
    # call, which cost ~20 µs an event before the cache.

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = metric.labels(*labels)
            if len(self._children) < 4096:
                self._children[key] = child
        return child

    def rejected(self, reason: str) -> None:
        self._child(self.events_rejected, reason).inc()

    def deduplicated(self) -> None:
        self.events_deduplicated.inc()

    def dead_lettered(self) -> None:
        self.events_dead_lettered.inc()

    def matched(self, rule: str) -> None:
        self._child(self.rules_matched, rule).inc()

    def processed(self, state: str, seconds: float) -> None:
        self._child(self.events_processed, state).inc()
        self.event_seconds.observe(seconds)

    def action(self, actionner: str, outcome: str, seconds: float | None = None) -> None:
        self._child(self.actions, actionner, outcome).inc()
        if seconds is not None:
            self._child(self.action_seconds, actionner).observe(seconds)

    def notification(self, notifier: str, outcome: str) -> None:
        self._child(self.notifications, notifier, outcome).inc()

    def watch(self, queue_depth: Callable[[], float], in_flight: Callable[[], float]) -> None:
        if not self.shared:
            self.queue_depth.set_function(queue_depth)
            self.in_flight.set_function(in_flight)
            return

        def sample() -> None:
            self.queue_depth.set(queue_depth())
            self.in_flight.set(in_flight())

        multiprocess.sample(sample)

    def rules_reload(self, result: str) -> None:
        self._child(self.rules_reloads, result).inc()

    def watch_rules(self, checksum: Callable[[], str]) -> None:
        """Show ``checksum()`` (the serving rules') as ``falco_talon_rules_info``."""
        self._rules_info.checksum = checksum

    def watch_spans(self, counts: Callable[[], Mapping[str, int]]) -> None:
        """Show ``counts()`` (the tracing's spans by outcome) as ``falco_talon_spans_total``."""
        self._spans.counts = counts
        if not self.shared:
            return
        added = dict.fromkeys(_Spans.OUTCOMES, 0)

        def sample() -> None:  # this process's new counts, into the summed counter
            now = counts()
            for outcome in _Spans.OUTCOMES:
                delta = now.get(outcome, 0) - added[outcome]
                if delta:
                    self._spans_shared.labels(outcome).inc(delta)
                    added[outcome] += delta

        multiprocess.sample(sample)

    def render(self) -> bytes:
        if self.shared:
            multiprocess.flush()
        return generate_latest(self._scraped)
