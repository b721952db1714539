"""Hot reload, with a real file watcher on real files: a valid change is applied, an invalid
one is refused (once per content) while the old rules keep serving, a ConfigMap-style
``..data`` symlink swap is seen, and nothing else in the watched directory counts: not the
server's own log (a real server process), not an editor's scratch files, not a touch."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from engine.contract.actionners import ActionnerRegistry
from engine.contract.event import FalcoEvent
from engine.pipeline import Pipeline
from engine.reload import RulesWatcher
from engine.rules import RulesLoader, checksum
from observability.metrics import Metrics
from tests.conftest import poll

V1 = "- name: version one\n  action: {name: test:record}\n"
V2 = "- name: version two\n  action: {name: test:record}\n"
BROKEN = "- name: broken\n  action: {name: test:nope}\n"


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


class CountingWatcher(RulesWatcher):
    """A watcher that remembers each reload the file watcher asked for, and its changes."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.calls: list[list[str]] = []

    def reload(self, changed: Iterable[str] = ()) -> bool:
        paths = list(changed)
        self.calls.append(paths)
        return super().reload(paths)


async def start(
    paths: list[str], registry: ActionnerRegistry, debounce_ms: int = 50
) -> tuple[Pipeline, CountingWatcher]:
    loader = RulesLoader(registry)
    ruleset = loader.load(paths)
    pipeline = Pipeline(ruleset, registry)
    watcher = CountingWatcher(
        paths, loader, ruleset, pipeline.set_rules, debounce_ms=debounce_ms, metrics=Metrics()
    )
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


async def test_a_configmap_mounted_as_a_rules_directory_is_seen_once_per_swap(
    tmp_path: Path, registry: ActionnerRegistry
) -> None:
    # The chart's layout: -r names the mount; its files are links through ..data.
    mount = tmp_path / "rules"
    mount.mkdir()
    (mount / "..v1").mkdir()
    (mount / "..v1" / "00-rules.yaml").write_text(V1)
    os.symlink("..v1", mount / "..data")
    os.symlink("..data/00-rules.yaml", mount / "00-rules.yaml")
    pipeline, watcher = await start([str(mount)], registry, debounce_ms=400)
    try:
        (mount / "..v2").mkdir()
        (mount / "..v2" / "00-rules.yaml").write_text(V2)
        os.symlink("..v2", mount / "..data_tmp")
        os.rename(mount / "..data_tmp", mount / "..data")
        (mount / "..v1" / "00-rules.yaml").unlink()
        (mount / "..v1").rmdir()
        await wait_for(lambda: names(pipeline) == ["version two"])
        await asyncio.sleep(0.6)
        assert (len(watcher.calls), watcher.reloads) == (1, 1)
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


SCRATCH = ["srv.log", ".rules.yaml.swp", "rules.yaml~", ".#rules.yaml", "4913", "rules.yaml.tmp"]
"""What else lands beside a rules file: a log, vim's swap, backup and probe files, emacs's
lock, a generic temporary file."""


async def test_other_files_in_the_watched_directory_do_nothing(
    tmp_path: Path, registry: ActionnerRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(V1)
    (tmp_path / "rules.d").mkdir()
    (tmp_path / "rules.d" / "a.yaml").write_text(V2)
    pipeline, watcher = await start([str(path), str(tmp_path / "rules.d")], registry)
    try:
        with caplog.at_level(logging.INFO):  # watchfiles says "all changes filtered out" at DEBUG
            for round_ in range(5):
                for name in SCRATCH:
                    (tmp_path / name).write_text(f"scratch {round_}\n")
                    (tmp_path / "rules.d" / name).write_text(f"scratch {round_}\n")
                (tmp_path / "rules.d" / "notes.json").write_text("{}")
                (tmp_path / "other.yaml").write_text(V2)  # not named, not in a rules dir
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)
        assert watcher.calls == []
        assert not [r for r in caplog.records if r.name.startswith(("falco_talon", "watchfiles"))]
        assert names(pipeline) == ["version one", "version two"]
    finally:
        await watcher.stop()


async def test_touching_a_rules_file_reloads_nothing_and_logs_nothing(
    tmp_path: Path, registry: ActionnerRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(V1)
    _, watcher = await start([str(path)], registry)
    try:
        with caplog.at_level(logging.DEBUG, "falco_talon.reload"):
            path.touch()
            path.write_text(V1)
            await wait_for(lambda: len(watcher.calls) >= 1)
            await asyncio.sleep(0.3)
        assert (watcher.reloads, watcher.rejected) == (0, 0)
        assert not [r for r in caplog.records if r.name == "falco_talon.reload"]
    finally:
        await watcher.stop()


async def test_a_burst_of_writes_is_one_reload(tmp_path: Path, registry: ActionnerRegistry) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(V1)
    pipeline, watcher = await start([str(path)], registry, debounce_ms=400)
    try:
        # An editor's save: probe file, backup by rename, write in pieces, chmod.
        (tmp_path / "4913").write_text("")
        (tmp_path / "4913").unlink()
        os.rename(path, tmp_path / "rules.yaml~")
        with path.open("w") as f:
            for line in V2.splitlines(keepends=True):
                f.write(line)
                f.flush()
        path.chmod(0o644)
        (tmp_path / "rules.yaml~").unlink()
        await wait_for(lambda: names(pipeline) == ["version two"])
        await asyncio.sleep(0.6)
        assert len(watcher.calls) == 1
        assert watcher.reloads == 1
    finally:
        await watcher.stop()


def reload_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "falco_talon.reload"]


async def test_a_broken_save_is_reported_once_per_content_and_the_fix_reloads(
    tmp_path: Path, registry: ActionnerRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(V1)
    pipeline, watcher = await start([str(path)], registry)
    metrics = watcher.metrics
    assert metrics is not None
    try:
        with caplog.at_level(logging.INFO, "falco_talon.reload"):
            path.write_text("- name: broken\n  action: {name: test:record\n")  # YAML error
            await wait_for(lambda: len(watcher.calls) == 1)
            path.write_text("- name: broken\n  action: {name: test:record\n")  # the same again
            await wait_for(lambda: len(watcher.calls) == 2)
            path.write_text(BROKEN)  # another error: said too
            await wait_for(lambda: len(watcher.calls) == 3)
            path.write_text(BROKEN)
            await wait_for(lambda: len(watcher.calls) == 4)
            assert names(pipeline) == ["version one"]
            path.write_text(V2)
            await wait_for(lambda: names(pipeline) == ["version two"])
        lines = reload_lines(caplog)
        assert len(lines) == 3, lines
        assert lines[0].startswith("rules reload rejected, the previous rules keep serving:")
        assert f"{path}:3:1: YAML syntax error" in lines[0]
        assert f"{path}:2:18: 'test:nope' is not a known actionner" in lines[1]
        assert lines[2] == "rules reloaded"
        assert caplog.records[-1].fields["rules"] == 1  # type: ignore[attr-defined]
        assert caplog.records[-1].fields["changed"] == "rules.yaml"  # type: ignore[attr-defined]
        assert (watcher.rejected, watcher.reloads) == (2, 1)
        body = metrics.render().decode()
        assert 'falco_talon_rules_reloads_total{result="rejected"} 2.0' in body
        assert 'falco_talon_rules_reloads_total{result="succeeded"} 1.0' in body
    finally:
        await watcher.stop()


# -- the server process, its log written beside its rules ---------------------------------------

SERVER_RULES = "- name: Terminate\n  action: {name: kubernetes:terminate}\n"
SERVER_RULES_V2 = SERVER_RULES + "- name: Labelize\n  action: {name: kubernetes:labelize}\n"
SERVER_BROKEN = "- name: Terminate\n  action: {name: kubernetes:terminate\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
        return str(resp.read().decode())


def server_files(tmp_path: Path, extra_config: str = "") -> tuple[Path, Path, Path, int]:
    """(rules, config, log, port) of a dry-run server watching its rules, text logs; the
    rules hold SERVER_RULES."""
    rules, config, log = tmp_path / "rules.yaml", tmp_path / "cfg.yaml", tmp_path / "srv.log"
    rules.write_text(SERVER_RULES)
    port = free_port()
    config.write_text(
        f"listenAddress: 127.0.0.1\nlistenPort: {port}\nwatchRules: true\ndryRun: true\n"
        f"logFormat: text\n{extra_config}"
    )
    return rules, config, log, port


def test_a_server_logging_into_its_rules_directory_reloads_only_on_rules_changes(
    tmp_path: Path,
) -> None:
    rules, config, log, port = server_files(tmp_path)
    exe = Path(sys.executable).with_name("falco-talon")
    # Exactly what a new user types: the shell sends stdout and stderr to a file beside the rules.
    cmd = f"exec {shlex.quote(str(exe))} server -c {config} -r {rules} > {log} 2>&1"
    server = subprocess.Popen(cmd, shell=True, cwd=tmp_path)
    try:
        poll(lambda: log.exists() and "listening" in log.read_text())

        def health() -> dict[str, object]:
            return dict(json.loads(get(port, "/healthz")))

        first = health()["rules_checksum"]
        assert first == checksum([(str(rules), SERVER_RULES)])
        assert f'falco_talon_rules_info{{checksum="{first}"}} 1.0' in get(port, "/metrics")
        settled = log.read_text()
        time.sleep(5)
        assert log.read_text() == settled  # no feedback loop: not one line in 5 s

        def said(text: str) -> int:
            return log.read_text().count(text)

        rules.write_text(SERVER_BROKEN)
        poll(lambda: said("rules reload rejected") == 1)
        assert f"{rules}:3:1: YAML syntax error" in log.read_text()
        assert health()["rules_checksum"] == first
        body = get(port, "/metrics")
        assert f'falco_talon_rules_info{{checksum="{first}"}} 1.0' in body
        assert 'falco_talon_rules_reloads_total{result="rejected"} 1.0' in body
        rules.write_text(SERVER_BROKEN)  # saved again, unchanged: nothing more is said
        time.sleep(2)
        assert said("rules reload rejected") == 1
        rules.write_text(SERVER_RULES_V2)
        poll(lambda: said("rules reloaded") == 1)
        second = health()["rules_checksum"]
        assert second == checksum([(str(rules), SERVER_RULES_V2)]) != first
        assert health()["rules"] == 2
        body = get(port, "/metrics")
        assert f'falco_talon_rules_info{{checksum="{second}"}} 1.0' in body
        assert first not in body
        assert 'falco_talon_rules_reloads_total{result="succeeded"} 1.0' in body
        assert 'falco_talon_rules_reloads_total{result="rejected"} 1.0' in body
        lines = log.read_text().splitlines()
        assert not [ln for ln in lines if "change detected" in ln or "changes detected" in ln]
    finally:
        server.terminate()
        server.wait(30)


def test_a_reload_naming_a_notifier_that_is_not_configured_is_refused_as_at_start_up(
    tmp_path: Path,
) -> None:
    """Start-up refuses rules naming a notifier the config does not set up (slack without
    its webhook); a reload to such rules is refused the same way, naming what to add, and
    the serving rules stay (before, the reload was applied and the notifications failed)."""
    rules, config, log, port = server_files(tmp_path, "defaultNotifiers: []\n")
    exe = Path(sys.executable).with_name("falco-talon")
    with log.open("wb") as out:
        server = subprocess.Popen(
            [str(exe), "server", "-c", str(config), "-r", str(rules)], stdout=out, stderr=out
        )
    try:
        poll(lambda: "listening" in log.read_text())
        first = json.loads(get(port, "/healthz"))["rules_checksum"]
        rules.write_text(SERVER_RULES + "  notifiers: [slack]\n")
        poll(lambda: "rules reload rejected" in log.read_text())
        text = log.read_text()
        assert "notifier 'slack' is used but not configured: add notifiers.slack" in text
        assert "rules reloaded" not in text
        assert json.loads(get(port, "/healthz"))["rules_checksum"] == first
        assert 'falco_talon_rules_reloads_total{result="rejected"} 1.0' in get(port, "/metrics")
    finally:
        server.terminate()
        server.wait(30)
