"""Hot reload, with a real file watcher on real files: a valid change is applied, an invalid
one is refused while the old rules keep serving, and a ConfigMap-style ``..data`` symlink
swap is seen."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.contract.actionners import ActionnerRegistry
from engine.contract.event import FalcoEvent
from engine.pipeline import Pipeline
from engine.reload import RulesWatcher
from engine.rules import RulesLoader

V1 = "- name: version one\n  action: {name: test:record}\n"
V2 = "- name: version two\n  action: {name: test:record}\n"
BROKEN = "- name: broken\n  action: {name: test:nope}\n"


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def start(paths: list[str], registry: ActionnerRegistry) -> tuple[Pipeline, RulesWatcher]:
    loader = RulesLoader(registry)
    ruleset = loader.load(paths)
    pipeline = Pipeline(ruleset, registry)
    watcher = RulesWatcher(paths, loader, ruleset, pipeline.set_rules, debounce_ms=50)
    watcher.start()
    await watcher.ready.wait()
    await asyncio.sleep(0.2)  # let the inotify watch settle before the first change
    return pipeline, watcher


def names(pipeline: Pipeline) -> list[str]:
    return [r.name for r in pipeline.compiled.ruleset.rules]


async def test_a_valid_change_is_applied(tmp_path: Path, registry: ActionnerRegistry) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(V1)
    pipeline, watcher = await start([str(path)], registry)
    try:
        path.write_text(V2)
        await wait_for(lambda: names(pipeline) == ["version two"])
        assert watcher.reloads == 1
    finally:
        await watcher.stop()


async def test_an_invalid_change_is_refused_and_the_old_rules_keep_serving(
    tmp_path: Path, registry: ActionnerRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(V1)
    pipeline, watcher = await start([str(path)], registry)
    try:
        with caplog.at_level(logging.ERROR, "falco_talon.reload"):
            path.write_text(BROKEN)
            await wait_for(lambda: watcher.rejected >= 1)
        assert names(pipeline) == ["version one"]
        assert f"{path}:2:18: 'test:nope' is not a known actionner" in caplog.text
        path.write_text(V2)  # fixing the file is picked up
        await wait_for(lambda: names(pipeline) == ["version two"])
    finally:
        await watcher.stop()


async def test_a_configmap_symlink_swap_is_seen(
    tmp_path: Path, registry: ActionnerRegistry
) -> None:
    # The kubelet's layout: rules.yaml -> ..data/rules.yaml, ..data -> ..2026_11_29_v1;
    # an update writes a new timestamped dir and atomically renames a new ..data over the old.
    mount = tmp_path / "mount"
    mount.mkdir()
    (mount / "..v1").mkdir()
    (mount / "..v1" / "rules.yaml").write_text(V1)
    os.symlink("..v1", mount / "..data")
    os.symlink("..data/rules.yaml", mount / "rules.yaml")
    pipeline, watcher = await start([str(mount / "rules.yaml")], registry)
    try:
        (mount / "..v2").mkdir()
        (mount / "..v2" / "rules.yaml").write_text(V2)
        os.symlink("..v2", mount / "..data_tmp")
        os.rename(mount / "..data_tmp", mount / "..data")
        await wait_for(lambda: names(pipeline) == ["version two"])
    finally:
        await watcher.stop()


async def test_a_rules_directory_picks_up_a_new_file(
    tmp_path: Path, registry: ActionnerRegistry
) -> None:
    (tmp_path / "a.yaml").write_text(V1)
    pipeline, watcher = await start([str(tmp_path)], registry)
    try:
        (tmp_path / "b.yaml").write_text(V2)
        await wait_for(lambda: names(pipeline) == ["version one", "version two"])
    finally:
        await watcher.stop()


async def test_events_in_flight_finish_with_the_rules_they_started_with(
    tmp_path: Path, registry: ActionnerRegistry, make_event: Callable[..., FalcoEvent]
) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(
        "- name: slow v1\n  action: {name: test:slow, parameters: {seconds: 0.5}}\n"
        "- name: after v1\n  action: {name: test:record}\n"
    )
    pipeline, watcher = await start([str(path)], registry)
    try:
        in_flight = asyncio.create_task(pipeline.process(make_event()))
        path.write_text(V2)
        await wait_for(lambda: names(pipeline) == ["version two"])
        run = await in_flight
        assert [s.rule.name for s in run.steps] == ["slow v1", "after v1"]
        assert [s.rule.name for s in (await pipeline.process(make_event())).steps] == [
            "version two"
        ]
    finally:
        await watcher.stop()
