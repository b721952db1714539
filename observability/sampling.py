"""Which events are traced: the OpenTelemetry specification's built-in samplers.

``OTEL_TRACES_SAMPLER`` (``otel.sampler``) names one of ``always_on``, ``always_off``,
``traceidratio``, their ``parentbased_`` forms; ``OTEL_TRACES_SAMPLER_ARG``
(``otel.samplingRatio``) is the ratio of the ``traceidratio`` ones. A ``parentbased_``
sampler follows the caller: an incoming ``traceparent`` flagged sampled is traced, one
flagged not sampled is not, and only a trace started here is left to the root sampler.
The ratio test is the SDK's ``TraceIdRatioBased`` one (the trace id's low 64 bits below
``round(ratio * 2**64)``), so every service sampling at the same ratio keeps the same
traces. Decided once per event, when its trace begins.
"""

from __future__ import annotations

from observability.settings import SAMPLERS

_LOW_64 = (1 << 64) - 1


class Sampler:
    """One of :data:`~observability.settings.SAMPLERS`, deciding from a trace id and the
    caller's sampled flag (None: no caller)."""

    __slots__ = ("_bound", "name", "parent_based")

    def __init__(self, name: str, ratio: float = 1.0) -> None:
        if name not in SAMPLERS:
            raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}")
        self.name = name
        self.parent_based = name.startswith("parentbased_")
        root = name.removeprefix("parentbased_")
        if root == "always_on":
            self._bound = 1 << 64
        elif root == "always_off":
            self._bound = 0
        else:
            self._bound = round(min(max(ratio, 0.0), 1.0) * (1 << 64))

    def __call__(self, trace_id: int, parent_sampled: bool | None = None) -> bool:
        if parent_sampled is not None and self.parent_based:
            return parent_sampled
        return (trace_id & _LOW_64) < self._bound
