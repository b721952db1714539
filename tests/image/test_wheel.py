"""The wheel, installed outside the repository, works and carries its schemas as package data.

Builds the wheel with ``uv build``, installs it with the exact dependencies of ``uv.lock``
(``uv export``) into a fresh venv in a temporary folder (from uv's cache when it has them,
else from the index), then runs the installed ``falco-talon`` from a folder outside the repo.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.image

ROOT = Path(__file__).resolve().parents[2]
# uv as the Makefile runs it (`python3 -m uv`) when no `uv` is on PATH.
UV = [uv] if (uv := shutil.which("uv")) else [os.environ.get("PYTHON", "python3"), "-m", "uv"]


def _run(*args: str | Path, cwd: Path = ROOT, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    environ.update(env)
    proc = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=environ,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"{args}: {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    _run(*UV, "build", "--wheel", "--quiet", "--out-dir", out)
    (built,) = out.glob("falco_talon-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("installed")
    reqs = base / "requirements.txt"
    _run(*UV, "export", "--frozen", "--no-dev", "--no-emit-project", "--quiet", "-o", reqs)
    venv = base / "venv"
    _run(*UV, "venv", "--quiet", "--python", sys.executable, venv)
    install = [*UV, "pip", "install", "--quiet", "--python", venv / "bin" / "python"]
    install += ["--require-hashes", "-r", reqs]
    try:  # uv's cache normally holds every locked wheel (make install filled it)
        _run(*install, "--offline")
    except AssertionError:
        _run(*install)
    _run(*UV, "pip", "install", "--quiet", "--no-deps", "--python", venv / "bin" / "python", wheel)
    return venv


def test_the_wheel_carries_the_schemas_and_the_typing_markers(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for schema in sorted((ROOT / "schemas").glob("*.json")):
        assert f"engine/_schemas/{schema.name}" in names
    for package in ("engine", "actionners", "notifiers", "observability"):
        assert f"{package}/py.typed" in names
    assert not any(n.startswith(("tests/", "schemas/")) for n in names)


def test_the_installed_wheel_checks_rules_outside_the_repo(venv: Path, tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    shutil.copy(ROOT / "examples" / "rules.yaml", rules)
    out = _run(venv / "bin" / "falco-talon", "check", "-r", rules, cwd=tmp_path)
    assert out.strip().endswith("valid"), out
    # The packaged schemas match the code that renders them.
    out = _run(venv / "bin" / "falco-talon", "schemas", "--check", cwd=tmp_path)
    assert out.strip() == "schemas up to date"


def test_the_schemas_come_from_the_package(venv: Path, tmp_path: Path) -> None:
    site = next((venv / "lib").glob("python3.*")) / "site-packages"
    probe = (
        "import json, sys, engine, engine.contract.event, engine.schemas, engine.resources\n"
        "from engine.contract.event import event_from_dict\n"
        "event_from_dict(json.load(open(sys.argv[1])))\n"
        "print(engine.__file__, engine.resources.schema_dir(), engine.contract.event.SCHEMA_PATH,"
        " engine.schemas.SCHEMA_DIR, sep='\\n')\n"
    )
    out = _run(venv / "bin" / "python", "-c", probe, ROOT / "examples" / "event.json", cwd=tmp_path)
    module, schema_dir, event_schema, schemas_dir = out.split()
    assert Path(module) == site / "engine" / "__init__.py"
    assert Path(schema_dir) == site / "engine" / "_schemas"
    assert Path(event_schema) == site / "engine" / "_schemas" / "event.schema.json"
    assert Path(schemas_dir) == Path(schema_dir)
    assert str(ROOT) not in out
