"""Actionners: what falco-talon can do about an event.

Position in the flow: ... -> state machine -> **actionners** -> notifiers.

One module per category (``actionners.kubernetes``); each registers its actionners in
:data:`engine.contract.actionners.ACTIONNERS` with the :func:`engine.contract.actionners.actionner`
decorator. The engine finds the modules through the ``falco_talon.actionners`` entry point
group, so it never names a concrete actionner.
"""
