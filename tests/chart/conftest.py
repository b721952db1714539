"""Fixtures for the Helm chart in ``charts/falco-talon``: the ``helm`` binary (built from the
Go module proxy by ``tests/env/build.sh helm`` on first use, then cached), rendering, and the
session's control plane (the same fixtures as ``tests/kubernetes``)."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from tests.chart.sync import CHART, ROOT
from tests.env.testenv import BUILD_SCRIPT, TestEnvInfo
from tests.kubernetes.conftest import control_plane, testenv

__all__ = ["control_plane", "testenv"]

VALUES_ALL = Path(__file__).resolve().parent / "values-all.yaml"
FALCO_TALON = ROOT / ".venv" / "bin" / "falco-talon"


@dataclass
class Rendered:
    """``helm template`` output, parsed."""

    docs: list[dict[str, Any]]
    text: str = field(repr=False)

    def kinds(self) -> list[str]:
        return [d["kind"] for d in self.docs]

    def one(self, kind: str) -> dict[str, Any]:
        found = [d for d in self.docs if d["kind"] == kind]
        assert len(found) == 1, f"{len(found)} {kind} rendered"
        return found[0]

    def find(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def named(self, kind: str, name: str) -> dict[str, Any]:
        found = [d for d in self.find(kind) if d["metadata"]["name"] == name]
        assert len(found) == 1, f"{len(found)} {kind} {name!r} rendered"
        return found[0]

    def config_yaml(self) -> str:
        import base64

        return base64.b64decode(self.one("Secret")["data"]["config.yaml"]).decode()

    def config(self) -> dict[str, Any]:
        """The rendered config.yaml, parsed."""
        config: dict[str, Any] = yaml.safe_load(self.config_yaml())
        return config

    def rules_files(self) -> dict[str, str]:
        (rules,) = [c for c in self.find("ConfigMap") if c["metadata"]["name"].endswith("-rules")]
        return dict(rules["data"])

    def write(self, directory: Path) -> tuple[Path, Path]:
        """The config file and the rules directory, as the pod sees them."""
        config = directory / "config.yaml"
        config.write_text(self.config_yaml())
        rules = directory / "rules"
        rules.mkdir()
        for name, text in self.rules_files().items():
            (rules / name).write_text(text)
        return config, rules


class Helm:
    def __init__(self, binary: Path, home: Path) -> None:
        self.binary = binary
        # Keep helm's own state (repositories, plugins, cache) out of the developer's home.
        self.env = {
            **os.environ,
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
        }

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            [str(self.binary), *args],
            capture_output=True,
            text=True,
            env=self.env,
            check=False,
            timeout=120,
        )
        if check and res.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}")
        return res

    def template_args(
        self,
        values: tuple[Path, ...] = (),
        sets: tuple[str, ...] = (),
        release: str = "falco-talon",
        namespace: str = "falco",
    ) -> list[str]:
        args = ["template", release, str(CHART), "--namespace", namespace]
        for v in values:
            args += ["-f", str(v)]
        for s in sets:
            args += ["--set", s]
        return args

    def template(self, *args: Any, **kwargs: Any) -> Rendered:
        out = self.run(*self.template_args(*args, **kwargs)).stdout
        docs = [d for d in yaml.safe_load_all(out) if d]
        return Rendered(docs, out)


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    res = subprocess.run(
        ["bash", str(BUILD_SCRIPT), "helm"], stdout=subprocess.PIPE, text=True, check=False
    )
    assert res.returncode == 0, f"{BUILD_SCRIPT} helm failed (exit {res.returncode})"
    binary = Path(res.stdout.strip().splitlines()[-1]) / "helm"
    assert os.access(binary, os.X_OK), binary
    return Helm(binary, tmp_path_factory.mktemp("helm-home"))


@pytest.fixture(scope="session")
def default_render(helm: Helm) -> Rendered:
    return helm.template()


@pytest.fixture(scope="session")
def all_render(helm: Helm) -> Rendered:
    return helm.template((VALUES_ALL,))


def values_file(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / f"values-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def admin(testenv: TestEnvInfo) -> Iterator[client.ApiClient]:
    from kubernetes import config

    configuration = client.Configuration()
    config.load_kube_config(str(testenv.kubeconfig), client_configuration=configuration)
    with client.ApiClient(configuration) as api_client:
        yield api_client
