"""The per-event state machine driven by the pipeline, and notification dispatch.

Real: the shared ``transitions`` machine, the pipeline with its handler policies (timeouts,
retries of ``TemporaryError``), the dispatcher with its per-notifier queues and retries
against real local HTTP receivers. Actionners are the test-only ``test:*`` ones of
``tests/recording.py``: they record the order the machine runs them in, nothing is mocked.
"""
