"""Finding the installed actionner and notifier modules.

Modules are listed under the ``falco_talon.actionners`` and ``falco_talon.notifiers`` entry
point groups (see ``pyproject.toml``); importing one registers its declarations. The engine
therefore depends on the registries only, never on a concrete plug-in module.
"""

from __future__ import annotations

import importlib
import logging
from importlib.metadata import entry_points

from engine.contract.actionners import ACTIONNERS, ActionnerRegistry
from engine.contract.notifiers import NOTIFIERS, NotifierRegistry

log = logging.getLogger("falco_talon.plugins")

_loaded = False


def load_plugins() -> tuple[ActionnerRegistry, NotifierRegistry]:
    """Import every installed plug-in module (once) and return the process-wide registries."""
    global _loaded  # noqa: PLW0603 - importing modules is process-wide by nature
    if not _loaded:
        for group in ("falco_talon.actionners", "falco_talon.notifiers"):
            for ep in entry_points(group=group):
                importlib.import_module(ep.value)
                log.debug("loaded plug-in module %s from %s", ep.value, group)
        _loaded = True
    return ACTIONNERS, NOTIFIERS
