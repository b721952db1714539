"""The OCI image from ``make image``: its configuration, its contents, and that it runs.

Builds the image through ``image/build.sh`` (a no-op when the cache already holds the archive
for this tree; cold, debootstrap makes it ~4 min), reads the archive as OCI layout (config and
layer tar), then runs it with podman + runc, read-only root filesystem, no capabilities.
Needs root (debootstrap, chroot); .ci/system-packages.sh installs the Debian tools when missing.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tarfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.image

ROOT = Path(__file__).resolve().parents[2]
REPOSITORY = "docker.io/falcosecurity/falco-talon-py"
VENV = "/opt/falco-talon"
SITE = f"{VENV}/lib/python3.11/site-packages"


def _version() -> str:
    for line in (ROOT / "pyproject.toml").read_text().splitlines():
        if line.startswith("version = "):
            return line.split('"')[1]
    raise AssertionError("no version in pyproject.toml")


def _cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("FALCO_TALON_IMAGE_CACHE", f"{base}/falco-talon/images"))


def build_image(kind: str) -> Path:
    """``image/build.sh KIND`` (talon, demo, nats): the archive it printed (skipped without
    root: buildah storage, debootstrap and chroot need it)."""
    if os.geteuid() != 0:
        pytest.skip("building the image needs root (buildah storage, debootstrap, chroot)")
    proc = subprocess.run(
        ["bash", str(ROOT / "image" / "build.sh"), kind],
        check=False,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return Path(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def archive() -> Path:
    path = build_image("talon")
    assert path.is_file() and path.parent == _cache()
    return path


class Layout:
    """An OCI archive read as the OCI image layout it contains."""

    def __init__(self, path: Path) -> None:
        self.tar = tarfile.open(path)  # noqa: SIM115 - open for the module's tests

    def close(self) -> None:
        self.tar.close()

    def json(self, name: str) -> Any:
        member = self.tar.extractfile(name)
        assert member is not None
        return json.load(member)

    def blob(self, digest: str) -> str:
        return "blobs/" + digest.replace(":", "/")

    def index(self) -> dict[str, Any]:
        index: dict[str, Any] = self.json("index.json")
        return index

    def manifest(self) -> dict[str, Any]:
        (entry,) = self.index()["manifests"]
        manifest: dict[str, Any] = self.json(self.blob(entry["digest"]))
        return manifest

    def config(self) -> dict[str, Any]:
        config: dict[str, Any] = self.json(self.blob(self.manifest()["config"]["digest"]))
        return config

    def files(self) -> set[str]:
        names: set[str] = set()
        for layer in self.manifest()["layers"]:
            blob = self.tar.extractfile(self.blob(layer["digest"]))
            assert blob is not None
            with tarfile.open(fileobj=blob, mode="r|*") as fs:
                names.update(m.name.removeprefix("./") for m in fs)
        return names


@pytest.fixture(scope="module")
def layout(archive: Path) -> Iterator[Layout]:
    opened = Layout(archive)
    yield opened
    opened.close()


def test_the_archive_names_the_image_by_its_full_reference(layout: Layout) -> None:
    (entry,) = layout.index()["manifests"]
    ref = entry["annotations"]["org.opencontainers.image.ref.name"]
    assert ref == f"{REPOSITORY}:{_version()}"


def test_the_config_runs_falco_talon_as_non_root_and_is_labelled(layout: Layout) -> None:
    config = layout.config()["config"]
    assert config["User"] == "65532:65532"
    assert config["Entrypoint"] == [f"{VENV}/bin/falco-talon"]
    assert "PYTHONDONTWRITEBYTECODE=1" in config["Env"]
    assert any(e.startswith(f"PATH={VENV}/bin:") for e in config["Env"])
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == _version()
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert labels["org.opencontainers.image.source"].startswith("https://")
    revision = labels["org.opencontainers.image.revision"]
    assert len(revision.removesuffix("-dirty")) == 40, revision


def test_no_package_manager_or_compiler_is_left(layout: Layout) -> None:
    files = layout.files()
    for tool in ("apt", "apt-get", "dpkg", "gcc", "cc", "pip", "pip3", "uv", "perl"):
        assert f"usr/bin/{tool}" not in files
        assert f"{VENV}/bin/{tool}".lstrip("/") not in files
    assert not any("/site-packages/pip/" in f or "/site-packages/uv/" in f for f in files)
    assert "var/lib/apt" not in files and "etc/apt" not in files
    # the project's code is there, precompiled
    assert f"{SITE}/engine/__pycache__/cli.cpython-311.pyc".lstrip("/") in files
    assert f"{SITE}/engine/_schemas/event.schema.json".lstrip("/") in files


# -- running it --------------------------------------------------------------------------------


def podman_command() -> list[str]:
    """podman with its own storage under the image cache, runc, host network, host-sized
    rlimits (crun and rlimits above the host's fail on these cgroup v1 hosts: see
    image/README.md)."""
    state = _cache() / "podman"
    state.mkdir(parents=True, exist_ok=True)
    conf = state / "containers.conf"
    conf.write_text(
        "[containers]\n"
        'netns = "host"\n'
        'default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n'
        "[engine]\n"
        'runtime = "runc"\n'
    )
    os.environ["CONTAINERS_CONF"] = str(conf)
    return ["podman", "--root", str(state / "root"), "--runroot", str(state / "runroot")]


@pytest.fixture(scope="module")
def podman(archive: Path) -> Iterator[list[str]]:
    cmd = podman_command()
    ref = f"{REPOSITORY}:{_version()}"
    load = subprocess.run(
        [*cmd, "load", "-q", "-i", str(archive)],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert load.returncode == 0, load.stderr
    yield [
        *cmd,
        "run",
        "--rm",
        "--read-only",
        "--read-only-tmpfs=false",
        "--cap-drop=ALL",
        "--security-opt",
        "no-new-privileges",
    ]
    subprocess.run([*cmd, "rmi", "-f", ref], check=False, capture_output=True, timeout=120)


def _run(podman: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*podman, *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def test_falco_talon_help_runs_read_only(podman: list[str]) -> None:
    proc = _run(podman, f"{REPOSITORY}:{_version()}", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "Usage: falco-talon" in proc.stdout


def test_falco_talon_check_runs_read_only_as_non_root(podman: list[str]) -> None:
    mount = f"{ROOT / 'examples'}:/rules:ro"
    proc = _run(
        podman, "-v", mount, f"{REPOSITORY}:{_version()}", "check", "-r", "/rules/rules.yaml"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("valid")
    probe = (
        "import os, engine.resources as r; "
        "print(os.getuid(), os.getgid(), r.schema_dir(), os.access('/', os.W_OK))"
    )
    proc = _run(
        podman, "--entrypoint", f"{VENV}/bin/python", f"{REPOSITORY}:{_version()}", "-c", probe
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["65532", "65532", f"{SITE}/engine/_schemas", "False"]


def test_bytecode_comes_from_the_image_not_compiled_at_run_time(podman: list[str]) -> None:
    imports = "import engine.cli, engine.server, actionners.kubernetes, kubernetes.client, grpc"
    image = f"{REPOSITORY}:{_version()}"
    proc = _run(podman, "--entrypoint", f"{VENV}/bin/python", image, "-v", "-c", imports)
    assert proc.returncode == 0, proc.stderr
    loaded = [line for line in proc.stderr.splitlines() if line.startswith("# code object from")]
    assert f"# code object from '{SITE}/engine/__pycache__/cli.cpython-311.pyc'" in loaded
    assert f"# code object from '{SITE}/kubernetes/client/api_client.pyc'" in loaded  # sourceless
    # Every module (stdlib, dependencies, the project) came from a .pyc built into the image;
    # a module compiled from source at run time logs "code object from <file>.py" instead.
    assert all(line.endswith(".pyc'") for line in loaded), [
        line for line in loaded if not line.endswith(".pyc'")
    ]
    assert len(loaded) > 500


def test_the_server_serves_an_event_read_only_without_capabilities(podman: list[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    name = f"falco-talon-smoke-{port}"
    base = podman[: podman.index("run")]
    server = subprocess.Popen(
        [*podman, "--name", name, "-v", f"{ROOT / 'examples'}:/rules:ro",
         f"{REPOSITORY}:{_version()}", "server", "--dry-run", "-r", "/rules/rules.yaml",
         "--listen-address", "127.0.0.1", "--listen-port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(60):
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=2) as resp:
                    health = json.load(resp)
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise AssertionError("the server did not answer /healthz")
        assert health["status"] == "ok" and health["dry_run"] is True
        body = (ROOT / "examples" / "event.json").read_bytes()
        request = urllib.request.Request(
            url, data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(request, timeout=5) as resp:
            assert json.load(resp)["status"] == "accepted"
    finally:
        subprocess.run([*base, "stop", "-t", "10", name], check=False, capture_output=True)
        out, _ = server.communicate(timeout=60)
    assert server.returncode == 0, out
    assert "dry run: nothing was touched" in out
    assert "stopped" in out


def test_the_chart_deploys_this_image_by_default() -> None:
    """values.yaml's repository + Chart.yaml's appVersion (the default tag) name this image."""
    chart = (ROOT / "charts" / "falco-talon" / "Chart.yaml").read_text()
    values = (ROOT / "charts" / "falco-talon" / "values.yaml").read_text()
    app_version = next(
        line.split(":", 1)[1].strip().strip('"')
        for line in chart.splitlines()
        if line.startswith("appVersion:")
    )
    assert app_version == _version()
    assert f"  repository: {REPOSITORY.removeprefix('docker.io/')}\n" in values
