"""Observability: logs now; traces and metrics plug in here.

Cross-cutting: every stage of the flow logs through ``observability.logging``.
"""
