"""Hot reload of the rules files.

Position in the flow: beside the pipeline; swaps its rule set when a rules file changes.

The watcher watches the *directories* holding the rules files, not the files: a Kubernetes
ConfigMap mount replaces its files by swapping a ``..data`` symlink, which a watch on the
file itself never sees (the original project's reload never fired there). Only changes that
concern the rules count (:class:`RulesPaths`): a file named by ``-r``/``rulesFile``, a
``*.yaml``/``*.yml`` file in a directory so named, and the ``..data`` swap; a log file,
an editor's swap or backup files and anything else in those directories are ignored, so
the server writing its log beside its rules cannot feed the watcher. A burst of changes
(an editor's save, a ConfigMap swap) is one reload.

A reload reads every file and compares the :func:`~engine.rules.checksum` of their
content with the serving rules': the same content (a ``touch``) changes nothing and logs
nothing. New content is validated as at start-up (``falco-talon check -c``): the schema,
the actionners and their parameters, and every notifier a rule names installed and
configured (the ``check`` the server passes); valid, it replaces the
serving rules (``rules reloaded``); invalid, it is rejected with every error and the
previous rules keep serving. A rejection is logged once per distinct content: saving the
same broken file again says nothing more. ``falco_talon_rules_reloads_total{result}``
counts both outcomes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import watchfiles

from engine.contract.errors import ConfigError
from engine.rules import RuleSet, RulesInvalid, RulesLoader, checksum, read_sources
from observability.metrics import Metrics

log = logging.getLogger("falco_talon.reload")

RULES_SUFFIXES = (".yaml", ".yml")
CONFIGMAP_DATA = "..data"
"""The symlink a ConfigMap mount swaps atomically to publish new content."""


def watched_dirs(paths: Sequence[str]) -> list[Path]:
    """The directories to watch for ``paths`` (a directory stands for itself)."""
    dirs: list[Path] = []
    for p in map(Path, paths):
        d = p if p.is_dir() else p.parent
        d = d.absolute()
        if d not in dirs:
            dirs.append(d)
    return dirs


class RulesPaths:
    """Which changed paths concern the rules ``paths`` (files and directories) stand for."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.dirs = watched_dirs(paths)
        self.files = {p.absolute() for p in map(Path, paths) if not p.is_dir()}
        self.rule_dirs = {p.absolute() for p in map(Path, paths) if p.is_dir()}

    def concerns(self, path: str | Path) -> bool:
        """A named file, a rules file of a named directory, or a ConfigMap's ``..data``."""
        p = Path(path).absolute()
        if p in self.files:
            return True
        if p.name == CONFIGMAP_DATA:
            return p.parent in self.dirs
        return (
            p.parent in self.rule_dirs and p.suffix in RULES_SUFFIXES and not p.name.startswith(".")
        )

    def watch_filter(self, _change: watchfiles.Change, path: str) -> bool:
        """``concerns`` in the shape watchfiles wants."""
        return self.concerns(path)


class RulesWatcher:
    """Reloads rules on change and hands valid new rule sets to ``apply``."""

    def __init__(
        self,
        paths: Sequence[str],
        loader: RulesLoader,
        current: RuleSet,
        apply: Callable[[RuleSet], None],
        *,
        debounce_ms: int = 400,
        force_polling: bool | None = None,
        metrics: Metrics | None = None,
        check: Callable[[RuleSet], None] | None = None,
    ) -> None:
        self.paths = list(paths)
        self.rules_paths = RulesPaths(self.paths)
        self.loader = loader
        self.checksum = current.checksum
        """The serving rules' checksum."""
        self.apply = apply
        self.debounce_ms = debounce_ms
        """Longest a burst of changes is gathered into one reload."""
        self.force_polling = force_polling
        self.metrics = metrics
        """Where reloads are counted (the service sets its own when None)."""
        self.check = check
        """What new rules must also satisfy to serve, as at start-up (raises ConfigError:
        the server's, every notifier a rule names is configured)."""
        self.reloads = 0
        """Rule sets applied since start."""
        self.rejected = 0
        """Distinct invalid rule sets refused since start."""
        self._rejected_checksum: str | None = None
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
        dirs = [str(d) for d in self.rules_paths.dirs]
        log.info("watching rules", extra={"fields": {"dirs": ",".join(dirs)}})
        self.ready.set()
        try:
            async for changes in watchfiles.awatch(
                *dirs,
                watch_filter=self.rules_paths.watch_filter,
                debounce=self.debounce_ms,
                step=min(50, self.debounce_ms),
                stop_event=self._stop,
                recursive=False,
                force_polling=self.force_polling,
            ):
                self.reload(path for _, path in changes)
        except Exception:
            log.exception("the rules watcher stopped; rules will no longer reload")

    def reload(self, changed: Iterable[str] = ()) -> bool:
        """Reload now; True when a new rule set was applied. ``changed``: the paths whose
        change prompted it, for the log."""
        what = ",".join(sorted({Path(p).name for p in changed}))
        sources, read_errors = read_sources(self.paths)
        content = checksum(sources)
        if content == self.checksum and not read_errors:
            if self._rejected_checksum is not None:
                self._rejected_checksum = None
                log.info(
                    "rules valid again, the same as the serving rules",
                    extra={"fields": {"changed": what, "checksum": content}},
                )
            return False
        if content == self._rejected_checksum:
            return False  # the same broken content: rejected and said so already
        try:
            ruleset = self.loader.load_texts(sources, read_errors)
            if self.check is not None:
                self.check(ruleset)
        except (RulesInvalid, ConfigError) as exc:
            self._rejected_checksum = content
            self.rejected += 1
            self._count("rejected")
            log.error(
                "rules reload rejected, the previous rules keep serving:\n%s",
                exc,
                extra={"fields": {"changed": what, "checksum": content, "serving": self.checksum}},
            )
            return False
        self._rejected_checksum = None
        previous, self.checksum = self.checksum, ruleset.checksum
        self.apply(ruleset)
        self.reloads += 1
        self._count("succeeded")
        log.info(
            "rules reloaded",
            extra={
                "fields": {
                    "changed": what,
                    "rules": len(ruleset.rules),
                    "checksum": ruleset.checksum,
                    "previous": previous,
                }
            },
        )
        return True

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.rules_reload(result)
