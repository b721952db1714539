"""The schema files under ``schemas/``, rendered from the code that defines them.

``rules.schema.json`` comes from the actionner registry, ``config.schema.json`` from
``engine.config`` and the notifier registry, ``rules-test.schema.json`` (``falco-talon test``
files) from ``engine.testsuite``; ``event.schema.json`` is written by hand.
``falco-talon schemas`` writes them, ``falco-talon schemas --check`` (in ``make test``)
fails when a committed file has drifted from the code.
"""

from __future__ import annotations

import json

from engine.config import config_schema
from engine.plugins import load_plugins
from engine.resources import schema_dir
from engine.rules import rules_schema
from engine.testsuite import TEST_SCHEMA

SCHEMA_DIR = schema_dir()


def render_all() -> dict[str, str]:
    actionners, notifiers = load_plugins()
    return {
        "rules.schema.json": json.dumps(rules_schema(actionners), indent=2) + "\n",
        "config.schema.json": json.dumps(config_schema(notifiers), indent=2) + "\n",
        "rules-test.schema.json": json.dumps(TEST_SCHEMA, indent=2) + "\n",
    }
