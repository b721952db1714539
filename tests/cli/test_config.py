"""Configuration: precedence flags > env > file > defaults, clear errors, redacted secrets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine.config import (
    ConfigError,
    check_notifiers,
    load_settings,
    notifier_settings,
    redacted,
)
from engine.contract.notifiers import NotifierRegistry, notifier


@pytest.fixture
def notifiers() -> NotifierRegistry:
    registry = NotifierRegistry()

    @notifier(
        "chat",
        description="test notifier with a secret",
        registry=registry,
        secrets=("webhookurl",),
        settings={
            "type": "object",
            "additionalProperties": False,
            "required": ["webhookurl"],
            "properties": {
                "webhookurl": {"type": "string"},
                "username": {"type": "string", "default": "Falco Talon"},
                "retries": {"type": "integer"},
            },
        },
    )
    async def send(note: Any, settings: Any) -> None:
        return None

    @notifier("events", description="needs no settings", registry=registry, needs_settings=False)
    async def send2(note: Any, settings: Any) -> None:
        return None

    return registry


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_apply_when_the_default_file_is_missing(notifiers: NotifierRegistry) -> None:
    s = load_settings(None, notifiers, env={})
    assert (s.server.listen_address, s.server.listen_port) == ("0.0.0.0", 2803)
    assert s.rules.files == ["/etc/falco-talon/rules.yaml"] and s.rules.watch is True
    assert s.logging.format == "color" and s.actions.dry_run is False


def test_an_explicit_config_file_that_is_missing_is_an_error(
    tmp_path: Path, notifiers: NotifierRegistry
) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(str(tmp_path / "nope.yaml"), notifiers, env={})


def test_flags_beat_env_which_beats_the_file(tmp_path: Path, notifiers: NotifierRegistry) -> None:
    path = write(tmp_path, "listenPort: 1000\nlogFormat: text\ndryRun: false\nrulesFile: a.yaml\n")
    s = load_settings(
        path,
        notifiers,
        env={"LISTENPORT": "2000", "DRYRUN": "true", "RULESFILE": "b.yaml,c.yaml"},
        overrides={"listenPort": 3000},
    )
    assert s.server.listen_port == 3000
    assert s.actions.dry_run is True
    assert s.logging.format == "text"
    assert s.rules.files == ["b.yaml", "c.yaml"]


def test_notifier_settings_come_from_file_and_env(
    tmp_path: Path, notifiers: NotifierRegistry
) -> None:
    path = write(tmp_path, "notifiers:\n  chat:\n    webhookurl: https://hooks.example/T1\n")
    s = load_settings(
        path,
        notifiers,
        env={
            "NOTIFIERS_CHAT_USERNAME": "talon",
            "NOTIFIERS_CHAT_RETRIES": "3",
            "DEFAULTNOTIFIERS": "chat, events",
        },
    )
    assert s.notifications.default_notifiers == ["chat", "events"]
    assert notifier_settings(s, notifiers)["chat"] == {
        "webhookurl": "https://hooks.example/T1",
        "username": "talon",
        "retries": 3,
    }
    check_notifiers(s, notifiers, {"chat"})


def test_errors_name_the_place_the_key_and_the_expected_type(
    tmp_path: Path, notifiers: NotifierRegistry
) -> None:
    path = write(tmp_path, "listenPrt: 3\nlogFormat: fancy\nworkers: many\n")
    with pytest.raises(ConfigError) as err:
        load_settings(path, notifiers, env={"LISTENPORT": "http"})
    assert str(err.value).splitlines() == [
        "invalid configuration:",
        f"  {path}:1:12: unknown key 'listenPrt'; did you mean 'listenPort'? (at $.listenPrt)",
        "  environment LISTENPORT: must be integer, got str 'http' (at $.listenPort)",
        f"  {path}:3:10: must be integer, got str 'many' (at $.workers)",
        f"  {path}:2:12: 'fancy' is not one of ['color', 'text', 'json'] (at $.logFormat)",
    ]


def test_a_notifier_used_but_not_configured_is_a_startup_error(notifiers: NotifierRegistry) -> None:
    s = load_settings(None, notifiers, env={"DEFAULTNOTIFIERS": "events"})
    check_notifiers(s, notifiers, set())  # needs no settings: fine
    with pytest.raises(ConfigError, match="notifier 'chat' is used but not configured"):
        check_notifiers(s, notifiers, {"chat"})
    with pytest.raises(ConfigError, match="notifier 'pager' does not exist; known: chat, events"):
        check_notifiers(s, notifiers, {"pager"})


def test_secrets_never_appear_in_errors_or_printed_config(
    tmp_path: Path, notifiers: NotifierRegistry
) -> None:
    secret = "https://hooks.example/services/T000/B000/XXXXSECRET"
    path = write(tmp_path, f"notifiers:\n  chat:\n    webhookurl: {secret}\n    username: 5\n")
    with pytest.raises(ConfigError) as err:
        load_settings(path, notifiers, env={})
    assert "username" in str(err.value)
    path = write(tmp_path, f"notifiers:\n  chat:\n    webhookurl: {secret}\n")
    shown = redacted(load_settings(path, notifiers, env={}), notifiers)
    assert shown["notifiers"]["chat"]["webhookurl"] == "********"
    assert secret not in repr(shown)


def test_a_secret_of_the_wrong_type_is_reported_without_its_value(
    tmp_path: Path, notifiers: NotifierRegistry
) -> None:
    path = write(tmp_path, "notifiers:\n  chat:\n    webhookurl: [https://hooks.example/SECRET]\n")
    with pytest.raises(ConfigError) as err:
        load_settings(path, notifiers, env={})
    assert "SECRET" not in str(err.value)
    assert "webhookurl" in str(err.value)


def test_tracing_comes_from_the_otel_section_and_the_standard_variables(
    tmp_path: Path, notifiers: NotifierRegistry
) -> None:
    path = write(
        tmp_path,
        "otel:\n  enabled: true\n  endpoint: collector:4317\n"
        "  headers: {x-api-key: SECRETKEY}\n  samplingRatio: 0.5\n",
    )
    s = load_settings(
        path,
        notifiers,
        env={"OTEL_EXPORTER_OTLP_ENDPOINT": "override:4317", "OTEL_SERVICE_NAME": "talon-prod"},
    )
    t = s.tracing
    assert (t.enabled, t.endpoint, t.sampling_ratio, t.service_name) == (
        True,
        "override:4317",
        0.5,
        "talon-prod",
    )
    assert redacted(s, notifiers)["otel"]["headers"] == {"x-api-key": "********"}
    assert (
        load_settings(
            None, notifiers, env={"OTEL_SDK_DISABLED": "true", "OTEL_ENABLED": "true"}
        ).tracing.enabled
        is False
    )


def test_a_misspelt_otel_key_is_an_error(tmp_path: Path, notifiers: NotifierRegistry) -> None:
    path = write(tmp_path, "otel:\n  enable: true\n")
    with pytest.raises(ConfigError, match=r"unknown key 'enable'; did you mean 'enabled'\?"):
        load_settings(path, notifiers, env={})


def test_processes_is_a_number_or_auto_from_the_file_the_environment_or_the_flag(
    tmp_path: Path, notifiers: NotifierRegistry
) -> None:
    assert load_settings(None, notifiers, env={}).server.processes == 1
    path = write(tmp_path, "processes: 4\n")
    assert load_settings(path, notifiers, env={}).server.processes == 4
    assert load_settings(path, notifiers, env={"PROCESSES": "auto"}).server.processes == "auto"
    flag = load_settings(path, notifiers, env={"PROCESSES": "auto"}, overrides={"processes": 2})
    assert flag.server.processes == 2
    path = write(tmp_path, "processes: 0\n")
    with pytest.raises(ConfigError) as err:
        load_settings(path, notifiers, env={"PROCESSES": "many"})
    assert "environment PROCESSES: processes must be a number of processes (1 or more) or " in (
        str(err.value)
    )
    with pytest.raises(ConfigError, match=r"config.yaml:1:12: 0 is less than the minimum of 1"):
        load_settings(path, notifiers, env={})


def cgroups(root: Path, membership: str, mounts: str, files: dict[str, str]) -> Path:
    """A /proc/self and /sys/fs/cgroup as the kernel shows them, under ``root``."""
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text(membership)
    (root / "proc/self/mountinfo").write_text(mounts)
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_auto_counts_the_cpus_a_cgroup_v2_quota_allows_parents_included(tmp_path: Path) -> None:
    from engine.processes import cgroup_cpu_quota

    mounts = "35 25 0:30 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
    root = cgroups(
        tmp_path,
        "0::/kubepods/pod1/talon\n",
        mounts,
        {
            "sys/fs/cgroup/kubepods/pod1/talon/cpu.max": "max 100000\n",
            "sys/fs/cgroup/kubepods/pod1/cpu.max": "250000 100000\n",  # the pod's limit: 2.5
            "sys/fs/cgroup/kubepods/cpu.max": "max 100000\n",
        },
    )
    assert cgroup_cpu_quota(root) == 2.5


def test_auto_counts_the_cpus_a_cgroup_v1_quota_allows_in_a_container(tmp_path: Path) -> None:
    from engine.processes import cgroup_cpu_quota

    # Inside a container the cgroup's own directory is the mount's root.
    mounts = (
        "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
        "32 31 0:29 /kubepods/pod1/c1 /sys/fs/cgroup/cpu,cpuacct ro,relatime shared:9 - "
        "cgroup cgroup rw,cpu,cpuacct\n"
        "35 31 0:32 /kubepods/pod1/c1 /sys/fs/cgroup/memory ro - cgroup cgroup rw,memory\n"
    )
    root = cgroups(
        tmp_path,
        "4:memory:/kubepods/pod1/c1\n2:cpu,cpuacct:/kubepods/pod1/c1\n0::/\n",
        mounts,
        {
            "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "50000\n",
            "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
        },
    )
    assert cgroup_cpu_quota(root) == 0.5
    unlimited = cgroups(
        tmp_path / "unlimited",
        "2:cpu,cpuacct:/\n",
        mounts.replace("/kubepods/pod1/c1", "/"),
        {
            "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
            "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
        },
    )
    assert cgroup_cpu_quota(unlimited) is None


def test_auto_is_at_least_one_and_at_most_the_cpus_this_process_may_run_on() -> None:
    import os

    from engine.processes import available_cpus, count

    assert 1 <= count("auto") == available_cpus() <= len(os.sched_getaffinity(0))
    assert count(3) == 3
