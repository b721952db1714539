"""Notifiers: who hears about what falco-talon did.

Position in the flow: ... -> actionners -> **notifiers** (the last stage).

One module per notifier (``notifiers.slack``); each registers itself in
:data:`notifiers.registry.NOTIFIERS` with the :func:`notifiers.registry.notifier`
decorator. The engine finds the modules through the ``falco_talon.notifiers`` entry
point group.
"""
