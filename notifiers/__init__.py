"""Notifiers: who hears about what falco-talon did.

Position in the flow: ... -> actionners -> **notifiers** (the last stage).

One module per notifier (``notifiers.slack``); each registers itself in
:data:`engine.contract.notifiers.NOTIFIERS` with the :func:`engine.contract.notifiers.notifier`
decorator. The engine finds the modules through the ``falco_talon.notifiers`` entry
point group.
"""
