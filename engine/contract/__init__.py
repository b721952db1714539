"""The engine's contract with plug-ins: everything an actionner or a notifier sees.

Both the engine and the plug-in packages (``actionners``, ``notifiers``, third-party ones
found by entry point) import these modules, and nothing else of the engine:

========================== ==================================================================
``engine.contract.actionners`` ``@actionner``, ``ActionnerSpec`` (with its ``HandlerPolicy``),
                               ``ActionContext``, the ``ACTIONNERS`` registry
``engine.contract.notifiers``  ``@notifier``, ``NotifierSpec``, ``Notification``, ``NOTIFIERS``
``engine.contract.event``      the event model: ``FalcoEvent`` and its decoding
``engine.contract.results``    ``ActionResult``, ``Outcome``, ``Target``
``engine.contract.errors``     ``TemporaryError`` (retried), ``PermanentError`` (not)
``engine.contract.kubeapi``    the shared Kubernetes client (``current()``), typed API errors,
                               ``RbacRule``
``engine.contract.retry``      ``RetryPolicy`` and the one retry loop
``engine.contract.registry``   the generic registry both registries build on
========================== ==================================================================

This package's ``__init__`` imports nothing, on purpose: importing the retry policy or the
errors must not drag in the Kubernetes client.
"""
