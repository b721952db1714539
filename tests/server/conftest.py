"""The HTTP server: ingest, validation errors, back-pressure, health, metrics, shutdown.

Real: the aiohttp application served on a real socket (pytest-aiohttp's test server or
``engine.server.serve`` on a free port), real HTTP clients, SIGTERM sent to the test
process itself for the drain tests. Actions are the test-only ``test:*`` actionners.
Several server processes (``test_processes.py``): the real CLI started as a subprocess,
forking its server processes, with the test-only ``test:mark`` actionner of
``tests/nats/replica.py``; signals are real (SIGTERM, SIGKILL).
"""
