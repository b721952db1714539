"""Hot reload of the rules files.

Position in the flow: beside the pipeline; swaps its rule set when a file changes.

The watcher watches the *directories* holding the rules files, not the files: a Kubernetes
ConfigMap mount replaces its files by swapping a ``..data`` symlink, which a watch on the
file itself never sees (the original project's reload never fired there). Any change
reloads every file; a rule set with the same content digest changes nothing; an invalid
one is rejected with the same errors as ``falco-talon check`` and the old rules keep serving.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import watchfiles

from engine.rules import RuleSet, RulesInvalid, RulesLoader

log = logging.getLogger("falco_talon.reload")


def watched_dirs(paths: Sequence[str]) -> list[Path]:
    """The directories to watch for ``paths`` (a directory stands for itself)."""
    dirs: list[Path] = []
    for p in map(Path, paths):
        d = p if p.is_dir() else p.parent
        d = d.absolute()
        if d not in dirs:
            dirs.append(d)
    return dirs


class RulesWatcher:
    """Reloads rules on change and hands valid new rule sets to ``apply``."""

    def __init__(
        self,
        paths: Sequence[str],
        loader: RulesLoader,
        current: RuleSet,
        apply: Callable[[RuleSet], None],
        *,
        debounce_ms: int = 200,
        force_polling: bool | None = None,
    ) -> None:
        self.paths = list(paths)
        self.loader = loader
        self.digest = current.digest
        self.apply = apply
        self.debounce_ms = debounce_ms
        self.force_polling = force_polling
        self.reloads = 0
        """Rule sets applied since start."""
        self.rejected = 0
        """Invalid rule sets refused since start."""
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="rules-watcher")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, 5)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()

    async def _run(self) -> None:
        dirs = [str(d) for d in watched_dirs(self.paths)]
        log.info("watching rules", extra={"fields": {"dirs": ",".join(dirs)}})
        self.ready.set()
        try:
            async for _changes in watchfiles.awatch(
                *dirs,
                watch_filter=None,
                debounce=self.debounce_ms,
                step=20,
                stop_event=self._stop,
                recursive=False,
                force_polling=self.force_polling,
            ):
                self.reload()
        except Exception:
            log.exception("the rules watcher stopped; rules will no longer reload")

    def reload(self) -> bool:
        """Reload now; True when a new rule set was applied."""
        try:
            ruleset = self.loader.load(self.paths)
        except RulesInvalid as exc:
            self.rejected += 1
            log.error("rules reload rejected, the previous rules keep serving:\n%s", exc)
            return False
        if ruleset.digest == self.digest:
            return False
        self.digest = ruleset.digest
        self.apply(ruleset)
        self.reloads += 1
        log.info("rules reloaded", extra={"fields": {"rules": len(ruleset.rules)}})
        return True
