"""Which events are traced: our samplers decide as the OpenTelemetry SDK's samplers of the
same names do (the SDK is the reference), for traces started here and for callers' traces
flagged sampled or not."""

from __future__ import annotations

import random

import pytest
from opentelemetry.context import Context
from opentelemetry.sdk.trace.sampling import (
    _KNOWN_SAMPLERS,  # the SDK's name -> sampler table, the one OTEL_TRACES_SAMPLER uses
    Decision,
)
from opentelemetry.sdk.trace.sampling import Sampler as SdkSampler
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, set_span_in_context

from observability.sampling import Sampler
from observability.settings import SAMPLERS
from observability.tracing import RowSink, Tracing, TracingSettings


def sdk_sampler(name: str, ratio: float) -> SdkSampler:
    known = _KNOWN_SAMPLERS[name]
    return known(ratio) if isinstance(known, type) else known  # type: ignore[no-any-return]


def sdk_decides(sampler: SdkSampler, trace_id: int, parent_sampled: bool | None) -> bool:
    context: Context | None = None
    if parent_sampled is not None:
        flags = TraceFlags(TraceFlags.SAMPLED if parent_sampled else TraceFlags.DEFAULT)
        parent = SpanContext(trace_id, 0xF067AA0BA902B7, is_remote=True, trace_flags=flags)
        context = set_span_in_context(NonRecordingSpan(parent))
    result = sampler.should_sample(context, trace_id, "POST /")
    return result.decision is Decision.RECORD_AND_SAMPLE


CASES = [
    (name, ratio)
    for name in SAMPLERS
    for ratio in ((0.0, 0.25, 1.0) if "traceidratio" in name else (1.0,))
]


@pytest.mark.parametrize(("name", "ratio"), CASES)
def test_each_sampler_decides_as_the_sdk_sampler_of_the_same_name(name: str, ratio: float) -> None:
    ours, theirs = Sampler(name, ratio), sdk_sampler(name, ratio)
    rng = random.Random(f"{name}-{ratio}")
    decided = []
    for _ in range(2000):
        trace_id = rng.getrandbits(128) or 1
        for parent in (None, True, False):
            decision = ours(trace_id, parent)
            assert decision == sdk_decides(theirs, trace_id, parent), (name, ratio, parent)
            decided.append(decision)
    if name == "traceidratio" and ratio == 0.25:
        assert 0.2 < sum(decided) / len(decided) < 0.3


def test_tracing_samples_its_own_traces_and_callers_traces_as_configured() -> None:
    caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-{}"
    sampled, unsampled = caller.format("01"), caller.format("00")

    def begin(sampler: str, ratio: float, traceparent: str | None) -> bool:
        settings = TracingSettings(sampler=sampler, sampling_ratio=ratio)
        return Tracing(settings, sink=RowSink()).begin(traceparent).sampled

    assert begin("parentbased_traceidratio", 0.0, sampled) is True
    assert begin("parentbased_traceidratio", 0.0, unsampled) is False
    assert begin("parentbased_traceidratio", 0.0, None) is False
    assert begin("parentbased_traceidratio", 1.0, None) is True
    assert begin("always_on", 1.0, unsampled) is True
    assert begin("always_off", 1.0, sampled) is False
    assert begin("parentbased_always_off", 1.0, sampled) is True
    assert begin("parentbased_always_off", 1.0, None) is False
    # Tracing off: nothing recorded, whatever the sampler says.
    assert Tracing(TracingSettings(sampler="always_on")).begin(sampled).sampled is False
