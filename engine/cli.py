"""The ``falco-talon`` command line: the composition root.

Position in the flow: builds everything (settings, registries, rules, pipeline, server)
and starts it; ``check``, ``explain`` and ``test`` reuse the same loaders without a cluster.
Exit codes: 0 success, 1 invalid input (rules, config, event) or a failing rule test, 2 usage
errors or an invalid rule test file.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from engine import __version__
from engine.config import (
    DEFAULT_CONFIG,
    DEFAULT_RULES,
    Settings,
    check_notifiers,
    load_settings,
    notifier_settings,
    redacted,
)
from engine.contract.actionners import ActionnerRegistry
from engine.contract.errors import ConfigError
from engine.contract.event import EventError, load_event
from engine.contract.kubeapi import NotConfigured
from engine.contract.notifiers import NotifierRegistry
from engine.plugins import load_plugins
from engine.rules import RuleSet, RulesInvalid, RulesLoader

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("falco_talon")


def _common(func: F) -> F:
    """``-c/--config`` and ``-r/--rules`` on the commands that read them (server, check,
    rules print, explain, test, rbac; also accepted before the command)."""
    func = click.option(
        "-r",
        "--rules",
        "rules",
        multiple=True,
        type=click.Path(),
        help=f"Rules file or directory; repeat for several, in order. "
        f"[default: rulesFile from the config, else {DEFAULT_RULES}]",
    )(func)
    func = click.option(
        "-c",
        "--config",
        "config",
        type=click.Path(),
        help=f"Config file. [default: {DEFAULT_CONFIG}, if it exists]",
    )(func)
    return func


def _merged(
    ctx: click.Context, config: str | None, rules: tuple[str, ...]
) -> tuple[str | None, tuple[str, ...]]:
    parent = ctx.find_root().params
    return config or parent.get("config"), rules or tuple(parent.get("rules") or ())


def _fail(message: str, code: int = 1) -> None:
    click.echo(message, err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@_common
@click.version_option(__version__, "--version", prog_name="falco-talon")
def cli(config: str | None, rules: tuple[str, ...]) -> None:
    """falco-talon: a response engine for Falco.

    Receives Falco events over HTTP, matches them against YAML rules and reacts
    (terminate, label, isolate, exec), then notifies.
    """


# -- server -------------------------------------------------------------------------------------


@cli.command()
@_common
@click.option("--dry-run", is_flag=True, default=None, help="Plan every action, run none (dryRun).")
@click.option("--listen-address", default=None, help="Overrides listenAddress.")
@click.option("--listen-port", type=int, default=None, help="Overrides listenPort.")
@click.option(
    "--processes",
    "process_count",
    default=None,
    help="Overrides processes: server processes sharing the port, a number or auto "
    "(one per CPU this process may use).",
)
@click.pass_context
def server(
    ctx: click.Context,
    config: str | None,
    rules: tuple[str, ...],
    dry_run: bool | None,
    listen_address: str | None,
    listen_port: int | None,
    process_count: str | None,
) -> None:
    """Run the HTTP server that receives Falco events."""
    config, rules = _merged(ctx, config, rules)
    overrides: dict[str, Any] = {}
    if rules:
        overrides["rulesFile"] = list(rules)
    if dry_run:
        overrides["dryRun"] = True
    if listen_address is not None:
        overrides["listenAddress"] = listen_address
    if listen_port is not None:
        overrides["listenPort"] = listen_port
    if process_count is not None:
        overrides["processes"] = int(process_count) if process_count.isdigit() else process_count
    _, notifiers = load_plugins()
    try:
        settings = load_settings(config, notifiers, overrides=overrides)
    except ConfigError as exc:
        _fail(str(exc))
    from engine.processes import serve_processes
    from observability.logging import setup_logging

    setup_logging(settings.logging.format, settings.logging.level.upper())
    try:
        code = serve_processes(settings, _serve_here, _check)
    except (ConfigError, RulesInvalid, NotConfigured) as exc:
        _fail(str(exc))
    sys.exit(code)


def _serve_here(settings: Settings) -> None:
    """Serve in this process (the only one, or one of ``processes``) until SIGTERM."""
    try:
        asyncio.run(_serve(settings))
    except (ConfigError, RulesInvalid, NotConfigured) as exc:
        _fail(str(exc))


def _prepared(
    settings: Settings,
) -> tuple[ActionnerRegistry, NotifierRegistry, RulesLoader, RuleSet]:
    """The plug-ins and the rules, checked with the notifiers they use; the effective
    configuration logged (once: by the supervisor when there are several processes)."""
    from engine import processes

    actionners, notifiers = load_plugins()
    loader = RulesLoader(actionners, notifiers)
    ruleset = loader.load(settings.rules.files)
    check_notifiers(settings, notifiers, _notifiers_of(ruleset))
    if processes.current() is None:
        log.info(
            "effective configuration",
            extra={"fields": {"config": json.dumps(redacted(settings, notifiers), default=str)}},
        )
    return actionners, notifiers, loader, ruleset


def _notifiers_of(ruleset: RuleSet) -> set[str]:
    """The notifiers the rules name (``check_notifiers`` adds ``defaultNotifiers``)."""
    return {n for r in ruleset.rules for n in r.notifiers}


def _check(settings: Settings) -> None:
    """What would stop the server at start-up, checked once before several processes start:
    the rules, the notifiers, the Kubernetes credentials."""
    from engine.contract import kubeapi

    _prepared(settings)
    if not settings.actions.dry_run:
        kubeapi.connect(settings.actions.kube_config).close()
    # Imported before the server processes are forked: they share them and start at once.
    for module in ("engine.server", "observability.metrics", "observability.tracing"):
        importlib.import_module(module)


async def _serve(settings: Settings) -> None:
    from engine import processes
    from engine.contract import kubeapi
    from engine.contract.retry import RetryPolicy
    from engine.listener import ListenerConfig
    from engine.notify import DeliveryPolicy, Dispatcher
    from engine.pipeline import Pipeline
    from engine.reload import RulesWatcher
    from engine.server import Service, serve
    from observability.metrics import Metrics
    from observability.tracing import Tracing

    actionners, notifiers, loader, ruleset = _prepared(settings)
    kubeconfig = settings.actions.kube_config
    if settings.actions.dry_run:
        kubeapi.use(None, kubeconfig)  # connect only if something (k8sevents) needs it
    else:
        kubeapi.use(kubeapi.connect(kubeconfig))
    n = settings.notifications
    try:
        tracing = Tracing(settings.tracing)
    except ValueError as exc:
        raise ConfigError(f"invalid configuration:\n  {exc}") from None
    metrics = Metrics()
    s = settings.server
    queue, throttler = _nats_queue(settings, tracing, metrics)
    child = processes.current()  # None: this process serves alone
    if child is not None and throttler is None:
        throttler = child.throttler()
    dispatcher = Dispatcher(
        notifiers,
        notifier_settings(settings, notifiers),
        DeliveryPolicy(timeout=n.timeout, retry=RetryPolicy(attempts=n.attempts, backoff=1.0)),
        tracing=tracing,
        metrics=metrics,
        trace_url=n.trace_url,
    )
    pipeline = Pipeline(
        ruleset,
        actionners,
        dispatcher=dispatcher,
        default_notifiers=tuple(n.default_notifiers),
        dry_run=settings.actions.dry_run,
        action_timeout=settings.actions.timeout,
        tracing=tracing,
        metrics=metrics,
        print_all_events=settings.logging.print_all_events,
        throttler=throttler,
    )
    watcher = None
    if settings.rules.watch:
        watcher = RulesWatcher(
            settings.rules.files,
            loader,
            ruleset,
            pipeline.set_rules,
            check=lambda new: check_notifiers(settings, notifiers, _notifiers_of(new)),
        )
    service = Service(
        pipeline,
        queue_size=s.queue_size,
        workers=s.workers,
        max_body_size=s.max_body_size,
        shutdown_timeout=s.shutdown_timeout,
        watcher=watcher,
        dedup_window=settings.deduplication.time_window_seconds,
        nats=queue,
        dedup=child.dedup(settings.deduplication.time_window_seconds) if child else None,
    )
    listener = ListenerConfig(
        cert_file=settings.tls.cert_file,
        key_file=settings.tls.key_file,
        client_ca_file=settings.tls.client_ca_file,
        token=settings.auth.token,
        token_file=settings.auth.token_file,
        header_timeout=s.header_timeout,
        body_timeout=s.body_timeout,
        probes_port=s.probes_port,
        reuse_port=child is not None,
    )
    try:
        await serve(service, s.listen_address, s.listen_port, listener)
    finally:
        kubeapi.close()


def _nats_queue(settings: Settings, tracing: Any, metrics: Any) -> tuple[Any, Any]:
    """The durable shared queue and the throttle sharing its counts, when ``nats.url`` is
    set; else (None, None): the in-memory queue and counts of one process."""
    n = settings.nats
    if not n.url:
        return None, None
    from engine.natsqueue import KvCounters, NatsConfig, NatsQueue
    from engine.storm import Throttler

    queue = NatsQueue(
        NatsConfig(
            url=n.url,
            stream=n.stream,
            subject=n.subject,
            token=n.token,
            token_file=n.token_file,
            nkey_seed_file=n.nkey_seed_file,
            tls=dict(n.tls),
            ack_wait=n.ack_wait,
            max_deliver=n.max_deliver,
            dedup_window=float(settings.deduplication.time_window_seconds),
        ),
        workers=settings.server.workers,
        metrics=metrics,
        tracing=tracing,
        shutdown_timeout=settings.server.shutdown_timeout,
    )
    return queue, Throttler(KvCounters(queue))


# -- check ---------------------------------------------------------------------------------------


def _inputs(config: str | None, rules: tuple[str, ...]) -> tuple[Settings | None, RuleSet]:
    """The config (when -c is given) and the rules (-r, else the config's, else the
    default), validated; any problem ends the command with exit 1."""
    actionners, notifiers = load_plugins()
    settings = None
    if config is not None:
        try:
            settings = load_settings(config, notifiers)
        except ConfigError as exc:
            _fail(str(exc))
    paths = list(rules) or (settings.rules.files if settings else [DEFAULT_RULES])
    try:
        ruleset = RulesLoader(actionners, notifiers).load(paths)
    except RulesInvalid as exc:
        _fail(str(exc))
    return settings, ruleset


def _defaults(settings: Settings | None) -> tuple[str, ...]:
    return tuple(settings.notifications.default_notifiers) if settings else ()


@cli.command()
@_common
@click.pass_context
def check(ctx: click.Context, config: str | None, rules: tuple[str, ...]) -> None:
    """Validate rules files (and the config, when -c is given); no cluster needed.

    Prints every problem as FILE:LINE:COLUMN: message (at JSON path) and exits 1,
    or exits 0 when everything is valid.
    """
    settings, ruleset = _inputs(*_merged(ctx, config, rules))
    _, notifiers = load_plugins()
    if settings is not None:
        try:
            check_notifiers(settings, notifiers, _notifiers_of(ruleset))
        except ConfigError as exc:
            _fail(str(exc))
    click.echo(f"{len(ruleset.rules)} rule(s) in {len(ruleset.files)} file(s): valid")


@cli.group()
def rules() -> None:
    """Rules files: check them, print them merged (Falco Talon v0.3 commands)."""


rules.add_command(check, "check")


@rules.command("print")
@_common
@click.pass_context
def rules_print(ctx: click.Context, config: str | None, rules: tuple[str, ...]) -> None:
    """Print the rules as loaded: every file merged, v0.3 actions resolved, as YAML."""
    import yaml

    from engine.rules import rule_data

    class _Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:
            return True

    _, ruleset = _inputs(*_merged(ctx, config, rules))
    data = [rule_data(r) for r in ruleset.rules]
    click.echo("---")
    click.echo(yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True).rstrip())


# -- explain -------------------------------------------------------------------------------------


@cli.command()
@_common
@click.option(
    "--event",
    "event_file",
    required=True,
    type=click.File("rb"),
    help="File holding a Falco event as JSON, or - for standard input.",
)
@click.option(
    "-o", "--output", type=click.Choice(["text", "json"]), default="text", show_default=True
)
@click.pass_context
def explain(
    ctx: click.Context, config: str | None, rules: tuple[str, ...], event_file: Any, output: str
) -> None:
    """Show what would happen to an event, touching nothing."""
    from engine.explain import explain as run_explain
    from engine.explain import explain_json, explain_text

    settings, ruleset = _inputs(*_merged(ctx, config, rules))
    actionners, _ = load_plugins()
    try:
        event = load_event(event_file.read())
    except EventError as exc:
        _fail(f"invalid event: {exc.message}")
    run = asyncio.run(run_explain(event, ruleset, actionners, _defaults(settings)))
    if output == "json":
        click.echo(json.dumps(explain_json(run), indent=2))
    else:
        click.echo(explain_text(run))


# -- test ----------------------------------------------------------------------------------------


@cli.command("test")
@_common
@click.argument("paths", nargs=-1, type=click.Path())
@click.option(
    "--record",
    is_flag=True,
    help="PATHS are event files: write a test file expecting what happens to them today.",
)
@click.option(
    "-o",
    "--output",
    default=None,
    metavar="text|json|FILE",
    help="The report's format: text (default) or json. With --record: the test file to "
    "write (default: standard output).",
)
@click.option(
    "--junit",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write the report as JUnit XML to this file.",
)
@click.option("--inline", is_flag=True, help="With --record: write the events inline.")
@click.option("-v", "--verbose", is_flag=True, help="List passing cases too.")
@click.pass_context
def test_rules(
    ctx: click.Context,
    config: str | None,
    rules: tuple[str, ...],
    paths: tuple[str, ...],
    record: bool,
    output: str | None,
    junit: str | None,
    inline: bool,
    verbose: bool,
) -> None:
    """Run rule test files (PATHS: files or directories of *.yaml) against the rules.

    Each case's event goes through the same machine as `explain` (nothing touched); its
    expectations (matched rules, steps in order, acting/not_acting, notifiers) must hold.
    Exit 0 when every case passes, 1 when one fails, 2 for an invalid test file or event
    (FILE:LINE:COLUMN: message) or a usage error.
    """
    from engine import ruletest
    from engine.testsuite import load_suite, suite_files

    if not paths:
        _fail("no test files given (falco-talon test -r RULES... TESTS...)", 2)
    if record:
        _record(ctx, config, rules, paths, output, inline)
        return
    if output not in (None, "text", "json"):
        _fail(f"-o/--output must be text or json (a FILE only with --record), got {output!r}", 2)
    settings, ruleset = _inputs(*_merged(ctx, config, rules))
    actionners, _ = load_plugins()
    suites = [load_suite(p) for p in suite_files(paths)]
    report = asyncio.run(ruletest.run_suites(suites, ruleset, actionners, _defaults(settings)))
    if junit:
        Path(junit).parent.mkdir(parents=True, exist_ok=True)
        Path(junit).write_text(ruletest.junit_xml(report), encoding="utf-8")
    if output == "json":
        click.echo(json.dumps(ruletest.report_json(report), indent=2))
    else:
        click.echo(ruletest.report_text(report, verbose=verbose))
    sys.exit(report.exit_code)


def _record(
    ctx: click.Context,
    config: str | None,
    rules: tuple[str, ...],
    paths: tuple[str, ...],
    output: str | None,
    inline: bool,
) -> None:
    from engine import ruletest

    settings, ruleset = _inputs(*_merged(ctx, config, rules))
    actionners, _ = load_plugins()
    events = []
    for p in map(Path, paths):
        try:
            events.append((p, load_event(p.read_bytes())))
        except OSError as exc:
            _fail(f"{p}: cannot read event file: {exc.strerror or exc}", 2)
        except EventError as exc:
            _fail(f"{p}: invalid event: {exc.message}", 2)
    target = Path(output) if output else None
    text = asyncio.run(
        ruletest.record(
            events,
            ruleset,
            actionners,
            _defaults(settings),
            base=target.parent if target else None,
            inline=inline,
        )
    )
    if target is None:
        click.echo(text, nl=False)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        click.echo(f"{len(events)} case(s) written to {target}: review them, then commit", err=True)


# -- introspection -------------------------------------------------------------------------------


@cli.command()
def version() -> None:
    """Print the version."""
    click.echo(f"falco-talon {__version__}")


@cli.group()
def actionners() -> None:
    """Inspect the installed actionners."""


@actionners.command("list")
@click.option(
    "-o", "--output", type=click.Choice(["text", "json"]), default="text", show_default=True
)
def actionners_list(output: str) -> None:
    """Each actionner: defaults, parameters, the output fields it needs and its RBAC rules."""
    registry, _ = load_plugins()
    data: list[dict[str, Any]] = [
        {
            "name": s.name,
            "description": s.description,
            "continue": s.continue_,
            "before": s.before,
            "parameters": s.parameters,
            "requires": list(s.requires),
            "alias_of": s.alias_of,
            "rbac": [r.as_dict() for r in s.rbac],
        }
        for s in registry
    ]
    if output == "json":
        click.echo(json.dumps(data, indent=2))
        return
    for item in data:
        click.echo(f"{item['name']}: {item['description']}")
        if item["alias_of"]:
            click.echo(f"  alias of: {item['alias_of']}")
        if item["requires"]:
            click.echo(f"  requires: {', '.join(item['requires'])}")
        click.echo(
            f"  defaults: continue: {str(item['continue']).lower()}, "
            f"before: {str(item['before']).lower()}"
        )
        props = item["parameters"].get("properties", {})
        required = set(item["parameters"].get("required", []))
        if props:
            click.echo("  parameters:")
            for name, schema in props.items():
                if schema.get("deprecated"):
                    continue  # the seed's camelCase spelling of a parameter listed beside it
                extra = (
                    " (required)"
                    if name in required
                    else (
                        f" (default: {json.dumps(schema['default'])})"
                        if "default" in schema
                        else ""
                    )
                )
                click.echo(f"    {name}: {_type(schema)}{extra} - {schema.get('description', '')}")
        else:
            click.echo("  parameters: none")
        click.echo("  rbac:")
        for rule in item["rbac"]:
            groups = ",".join(g or '""' for g in rule["apiGroups"])
            click.echo(
                f"    - apiGroups: [{groups}] resources: [{','.join(rule['resources'])}] "
                f"verbs: [{','.join(rule['verbs'])}]"
            )


def _type(schema: dict[str, Any]) -> str:
    t = schema.get("type", "any")
    return "|".join(t) if isinstance(t, list) else str(t)


@cli.group()
def notifiers() -> None:
    """Inspect the installed notifiers."""


@notifiers.command("list")
@click.option(
    "-o", "--output", type=click.Choice(["text", "json"]), default="text", show_default=True
)
def notifiers_list(output: str) -> None:
    """Each notifier: its settings, their defaults, and which are secret."""
    _, registry = load_plugins()
    data: list[dict[str, Any]] = [
        {
            "name": s.name,
            "description": s.description,
            "settings": s.settings,
            "secrets": list(s.secrets),
            "needs_settings": s.needs_settings,
        }
        for s in registry
    ]
    if output == "json":
        click.echo(json.dumps(data, indent=2))
        return
    if not data:
        click.echo("no notifiers installed")
    for item in data:
        click.echo(f"{item['name']}: {item['description']}")
        for name, schema in item["settings"].get("properties", {}).items():
            default = f" (default: {json.dumps(schema['default'])})" if "default" in schema else ""
            secret = " [secret]" if name in item["secrets"] else ""
            env = f"NOTIFIERS_{item['name'].upper()}_{name.upper()}"
            click.echo(
                f"    {name}: {_type(schema)}{default}{secret} - "
                f"{schema.get('description', '')} (env {env})"
            )


@cli.group()
def outputs() -> None:
    """Inspect the installed outputs (where actionners' artifacts go)."""


@outputs.command("list")
@click.option(
    "-o", "--output", type=click.Choice(["text", "json"]), default="text", show_default=True
)
def outputs_list(output: str) -> None:
    """Each output. None exist in this version: a v0.3 rule's ``output`` is an error."""
    if output == "json":
        click.echo("[]")
    else:
        click.echo("no outputs installed (outputs are not available in this version)")


@cli.command()
@_common
@click.option(
    "--all",
    "everything",
    is_flag=True,
    help="Every installed actionner and notifier, not only those the rules use.",
)
@click.option(
    "--declarations",
    is_flag=True,
    help="Print each actionner's and notifier's own rules (for the Helm chart).",
)
@click.option("--name", default="falco-talon", show_default=True, help="ClusterRole name.")
@click.option(
    "-o", "--output", type=click.Choice(["yaml", "json"]), default="yaml", show_default=True
)
@click.pass_context
def rbac(
    ctx: click.Context,
    config: str | None,
    rules: tuple[str, ...],
    everything: bool,
    declarations: bool,
    name: str,
    output: str,
) -> None:
    """Print the ClusterRole falco-talon needs: the union of what the actionners and
    notifiers in use declare (the rules' actionners and notifiers, plus defaultNotifiers)."""
    import yaml

    from engine.rbac import cluster_role, declared_rules, required_rules

    config, rules = _merged(ctx, config, rules)
    actionners, notifiers = load_plugins()
    if declarations:
        data = declared_rules(actionners, notifiers)
        text = (
            json.dumps(data, indent=2) + "\n"
            if output == "json"
            else yaml.safe_dump(data, sort_keys=False)
        )
        click.echo(text, nl=False)
        return
    if everything:
        merged = required_rules(actionners, notifiers)
    else:
        settings, ruleset = _inputs(config, rules)
        merged = required_rules(
            actionners,
            notifiers,
            only_actionners={
                a for r in ruleset.rules for a in ([c.actionner for c in r.chain] or [r.action])
            },
            only_notifiers={n for r in ruleset.rules for n in r.notifiers}
            | set(_defaults(settings)),
        )
    role = cluster_role(name, merged)
    if output == "json":
        click.echo(json.dumps(role, indent=2))
    else:
        click.echo(yaml.safe_dump(role, sort_keys=False), nl=False)


@cli.command()
@click.option(
    "-o", "--output", type=click.Choice(["mermaid", "dot"]), default="mermaid", show_default=True
)
def diagram(output: str) -> None:
    """Print the per-event state machine, derived from its definition."""
    from engine import diagram as d

    click.echo(d.mermaid() if output == "mermaid" else d.dot(), nl=False)


@cli.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script: eval "$(falco-talon completion bash)"."""
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    assert cls is not None
    comp = cls(cli, {}, "falco-talon", "_FALCO_TALON_COMPLETE")
    click.echo(comp.source())


@cli.command()
@click.option(
    "--check",
    "check_only",
    is_flag=True,
    help="Exit 1 if the files in schemas/ differ from the code instead of writing them.",
)
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False),
    default=None,
    help="Where the schema files live. [default: the project's schemas/]",
)
def schemas(check_only: bool, directory: str | None) -> None:
    """Write (or check) the generated schemas/*.schema.json (rules, config, rules-test)."""
    from engine.schemas import SCHEMA_DIR, render_all

    target = Path(directory) if directory else SCHEMA_DIR
    stale = []
    for name, text in render_all().items():
        path = target / name
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current != text:
            stale.append(name)
            if not check_only:
                path.write_text(text, encoding="utf-8")
    if check_only and stale:
        _fail(f"out of date: {', '.join(stale)}; run `make schemas`")
    click.echo("schemas " + ("up to date" if not stale else f"written: {', '.join(stale)}"))


def main() -> None:
    cli(prog_name="falco-talon")
