"""The pre-commit hooks of ``.pre-commit-hooks.yaml``, run by ``pre-commit`` in a temporary
git repository laid out as the hooks' defaults expect: ``rules/*.yaml``, ``rules/tests/``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.rulect.conftest import FALCO_TALON, ROOT

PRE_COMMIT = str(Path(sys.executable).parent / "pre-commit")
HOOKS: list[dict[str, Any]] = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())

SUITE = """\
tests:
  - name: a critical shell is contained, then the pod terminated
    event: event.json
    expect:
      order: [Rule NetworkPolicy, Rule Exec forensics, Rule Terminate]
      not_acting: [Rule Labelize]
"""


def git(
    repo: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=600, check=False
    )


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir()
    return {
        **os.environ,
        "HOME": str(home),
        "PRE_COMMIT_HOME": str(tmp_path / "pre-commit-home"),
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com",
        "GIT_CONFIG_NOSYSTEM": "1",
    }  # fmt: skip


@pytest.fixture
def repo(tmp_path: Path, env: dict[str, str]) -> Path:
    """A git repository with the example rules in rules/ and a passing suite in rules/tests/."""
    repo = tmp_path / "repo"
    (repo / "rules" / "tests").mkdir(parents=True)
    shutil.copy(ROOT / "examples" / "rules.yaml", repo / "rules" / "rules.yaml")
    shutil.copy(ROOT / "examples" / "event.json", repo / "rules" / "tests" / "event.json")
    (repo / "rules" / "tests" / "shell.yaml").write_text(SUITE)
    (repo / "README.md").write_text("rules\n")
    assert git(repo, "init", "-q", env=env).returncode == 0
    return repo


def system_config(repo: Path) -> None:
    """The hooks exactly as .pre-commit-hooks.yaml defines them (id, entry's arguments, args,
    files, pass_filenames), as ``language: system`` hooks running this checkout's
    falco-talon: what they do, without pre-commit building their virtualenv."""
    hooks = []
    for hook in HOOKS:
        assert hook["language"] == "python"
        assert hook["entry"].startswith("falco-talon ")
        hooks.append(
            {
                **hook,
                "language": "system",
                "entry": FALCO_TALON + hook["entry"][len("falco-talon") :],
            }
        )
    config = {"repos": [{"repo": "local", "hooks": hooks}]}
    (repo / ".pre-commit-config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def pre_commit(repo: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PRE_COMMIT, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=900,
        check=False,
    )  # fmt: skip


def test_the_hooks_are_declared_for_rules_and_tests() -> None:
    by_id = {h["id"]: h for h in HOOKS}
    assert set(by_id) == {"falco-talon-check", "falco-talon-test"}
    assert by_id["falco-talon-check"]["entry"] == "falco-talon check"
    assert by_id["falco-talon-test"]["entry"] == "falco-talon test"
    assert all(h["pass_filenames"] is False for h in HOOKS)
    validate = subprocess.run(
        [PRE_COMMIT, "validate-manifest", str(ROOT / ".pre-commit-hooks.yaml")], check=False
    )
    assert validate.returncode == 0


def test_hooks_pass_then_block_a_commit_that_breaks_a_test(repo: Path, env: dict[str, str]) -> None:
    system_config(repo)
    git(repo, "add", "-A", env=env)
    passing = pre_commit(repo, env, "run", "--all-files")
    assert passing.returncode == 0, passing.stdout + passing.stderr
    assert "falco-talon check" in passing.stdout and "Passed" in passing.stdout
    assert passing.stdout.count("Passed") == 2

    assert pre_commit(repo, env, "install").returncode == 0
    assert git(repo, "commit", "-qm", "rules", env=env).returncode == 0

    # Labelize gets continue: false: it now supersedes Terminate. The rules are still valid,
    # so check passes, but the test catches it and the commit is refused.
    rules = repo / "rules" / "rules.yaml"
    rules.write_text(rules.read_text().replace("  continue: true\n", "  continue: false\n"))
    git(repo, "add", "-A", env=env)
    refused = git(repo, "commit", "-qm", "labelize stops the rest", env=env)
    assert refused.returncode != 0
    out = refused.stdout + refused.stderr
    assert "falco-talon test" in out and "Failed" in out
    assert "FAIL  rules/tests/shell.yaml:2: a critical shell is contained" in out
    assert "superseded by rule 'Rule Labelize', continue: false" in out

    # An invalid rules file is refused by both hooks, with FILE:LINE:COLUMN.
    rules.write_text(rules.read_text().replace("kubernetes:terminate", "kubernetes:terminat"))
    git(repo, "add", "-A", env=env)
    invalid = git(repo, "commit", "-qm", "typo", env=env)
    assert invalid.returncode != 0
    out = invalid.stdout + invalid.stderr
    assert "rules/rules.yaml:" in out and "'kubernetes:terminat'" in out


def test_hooks_skip_commits_that_touch_no_yaml(repo: Path, env: dict[str, str]) -> None:
    system_config(repo)
    git(repo, "add", "-A", env=env)
    assert git(repo, "commit", "-qm", "init", "--no-verify", env=env).returncode == 0
    (repo / "README.md").write_text("more\n")
    git(repo, "add", "README.md", env=env)
    run = pre_commit(repo, env, "run")
    assert run.returncode == 0
    assert run.stdout.count("(no files to check)Skipped") == 2


def test_the_python_hooks_install_from_this_repository(repo: Path, env: dict[str, str]) -> None:
    """The hooks as users get them: ``language: python``, pre-commit builds a virtualenv and
    pip-installs this repository (at HEAD: commit first) from PyPI's packages. Slow the first
    time for a commit (a few minutes); the environment is cached under .pytest_cache/."""
    head = git(ROOT, "rev-parse", "HEAD").stdout.strip()
    env = {**env, "PRE_COMMIT_HOME": str(ROOT / ".pytest_cache" / "pre-commit")}
    config = {
        "repos": [{"repo": str(ROOT), "rev": head, "hooks": [{"id": h["id"]} for h in HOOKS]}]
    }
    (repo / ".pre-commit-config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    git(repo, "add", "-A", env=env)
    run = pre_commit(repo, env, "run", "--all-files")
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("Passed") == 2
