"""falco-talon: a response engine for Falco.

Data flows one way through the package:

    HTTP (engine.server) -> event model (engine.contract.event) -> matcher (engine.matcher)
    -> per-event state machine (engine.machine, driven by engine.pipeline)
    -> actionners (actionners.*) -> notifiers (notifiers.*, via engine.notify)

Plug-ins (``actionners``, ``notifiers``) may import only the engine's contract, the
``engine.contract`` package: the event model, results, errors, the Kubernetes client, the
registries with their ``@actionner``/``@notifier`` decorators and the retry policy.
"""

__version__ = "0.1.0"
