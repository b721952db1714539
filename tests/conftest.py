"""Shared fixtures: rules written to real files, events in Falco's and Falcosidekick's shapes,
registries holding the built-in actionners plus the test-only ``test:*`` ones.

Tests are grouped by subsystem, one folder each, and each folder's ``conftest.py`` says
what is real there: ``rules/``, ``pipeline/``, ``server/``, ``cli/``, ``notifiers/``,
``observability/``, ``kubernetes/`` (a real kube-apiserver + etcd and a test kubelet),
``chart/`` (helm against the same control plane), ``env/`` (the test servers themselves).
Nothing is mocked; where a thing cannot exist here, the test says so."""

from __future__ import annotations

import copy
import json
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine.contract.actionners import ActionnerRegistry
from engine.contract.event import FalcoEvent, event_from_dict
from engine.contract.notifiers import NotifierRegistry
from engine.rules import RuleSet, RulesLoader
from tests.recording import Recorder, make_registry

FALCO_EVENT: dict[str, Any] = {
    "time": "2026-11-29T14:02:56.119485478Z",
    "rule": "Terminal shell in container",
    "priority": "Warning",
    "source": "syscall",
    "hostname": "node-1",
    "output": "14:02:56.119: Warning A shell was spawned in a container (user=root k8s.ns=demo)",
    "output_fields": {
        "container.id": "4f3a1b9e8c7d",
        "container.image.repository": "docker.io/library/nginx",
        "evt.time": 1795960976119485478,
        "k8s.ns.name": "demo",
        "k8s.pod.name": "web-7d4b9c7f5d-x2x8k",
        "proc.aname[2]": "containerd-shim",
        "proc.name": "sh",
        "proc.tty": 34816,
        "user.loginuid": -1,
        "evt.is_open_write": True,
        "fd.name": None,
    },
    "tags": ["shell", "container", "mitre_execution"],
}


def poll(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    """Wait for ``predicate`` (of a server in another process) to hold; fail after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def sidekick_shape(event: dict[str, Any]) -> dict[str, Any]:
    """The same event as Falcosidekick forwards it: a uuid added, tags sorted."""
    out = copy.deepcopy(event)
    out["uuid"] = "0b5e3c5e-8d5c-4a53-a3c2-5b8f4e2f2a10"
    out["tags"] = sorted(out["tags"])
    return out


@pytest.fixture
def falco_event() -> dict[str, Any]:
    return copy.deepcopy(FALCO_EVENT)


@pytest.fixture
def make_event() -> Callable[..., FalcoEvent]:
    def make(**changes: Any) -> FalcoEvent:
        data = copy.deepcopy(FALCO_EVENT)
        fields = changes.pop("output_fields", None)
        if fields is not None:
            data["output_fields"] = fields
        data.update(changes)
        return event_from_dict(data)

    return make


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def registry(recorder: Recorder) -> ActionnerRegistry:
    return make_registry(recorder)


@pytest.fixture
def write_rules(tmp_path: Path) -> Callable[..., Path]:
    counter = iter(range(1000))

    def write(text: str, name: str | None = None) -> Path:
        path = tmp_path / (name or f"rules-{next(counter)}.yaml")
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
        return path

    return write


@pytest.fixture
def load_rules(
    registry: ActionnerRegistry, write_rules: Callable[..., Path]
) -> Callable[..., RuleSet]:
    def load(*texts: str, notifiers: NotifierRegistry | None = None) -> RuleSet:
        paths = [write_rules(t) for t in texts]
        return RulesLoader(registry, notifiers).load(paths)

    return load


def as_json(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode()
