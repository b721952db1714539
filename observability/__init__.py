"""Observability: logs, metrics and traces.

Cross-cutting: every stage of the flow logs through ``observability.logging``, counts
through ``observability.metrics`` and records spans through ``observability.tracing``.
Nothing here imports the engine or the plug-ins, save the shared retry policy
(``engine.contract.retry``), which the OTLP sender uses.
"""
