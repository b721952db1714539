"""Traces, metrics and the OTLP encoding.

Real: a Jaeger v2 all-in-one built from the Go module proxy (``tests/env/jaeger.py``),
receiving our OTLP over gRPC and HTTP and queried through its API; the official
opentelemetry-proto classes decode what our encoder writes; Prometheus text parsed back.
"""
