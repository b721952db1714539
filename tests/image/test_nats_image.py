"""The NATS server image from ``make image-nats``: the static nats-server of ``tests/env/build.sh
nats`` on an empty base, non-root; it serves JetStream read-only with no capabilities, and it is
the image the chart's bundled NATS deploys by default.

Building it needs root (buildah's storage), as the other images; a few seconds once the binary
is cached (tests/nats builds it too).
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
import yaml

from tests.image.test_image import ROOT, Layout, build_image, podman_command

pytestmark = pytest.mark.image

REPOSITORY = "docker.io/falcosecurity/falco-talon-nats"


def nats_version() -> str:
    """The nats-server version tests/env/build.sh builds (v2.15.2 -> 2.15.2)."""
    text = (ROOT / "tests" / "env" / "build.sh").read_text()
    found = re.search(r'^NATS_VERSION="\$\{NATS_VERSION:-v([^}]+)\}"$', text, re.MULTILINE)
    assert found, "no NATS_VERSION in tests/env/build.sh"
    return found.group(1)


@pytest.fixture(scope="module")
def archive() -> Path:
    return build_image("nats")


@pytest.fixture(scope="module")
def layout(archive: Path) -> Iterator[Layout]:
    opened = Layout(archive)
    yield opened
    opened.close()


def test_the_archive_names_the_image_by_the_nats_server_version(
    archive: Path, layout: Layout
) -> None:
    (entry,) = layout.index()["manifests"]
    ref = entry["annotations"]["org.opencontainers.image.ref.name"]
    assert ref == f"{REPOSITORY}:{nats_version()}"
    assert archive.name.startswith(f"falco-talon-nats-{nats_version()}-")


def test_the_image_is_the_static_server_alone_run_as_non_root_and_labelled(
    layout: Layout,
) -> None:
    config = layout.config()["config"]
    assert config["User"] == "65532:65532"
    assert config["Entrypoint"] == ["/usr/local/bin/nats-server"]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == nats_version()
    assert labels["org.opencontainers.image.title"] == "falco-talon-nats"
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert labels["org.opencontainers.image.source"].startswith("https://")
    assert len(labels["org.opencontainers.image.revision"].removesuffix("-dirty")) == 40
    files = {f.rstrip("/") for f in layout.files()} - {".", ""}
    assert files == {
        "usr",
        "usr/local",
        "usr/local/bin",
        "usr/local/bin/nats-server",
        "etc",
        "etc/passwd",
        "etc/group",
        "data",
        "tmp",
    }
    size = sum(layer["size"] for layer in layout.manifest()["layers"])
    assert size < 12 << 20, size  # compressed: the binary and nothing else


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _store_and_read(url: str) -> int:
    nc = await nats.connect(url, connect_timeout=5)
    try:
        js = nc.jetstream()
        await js.add_stream(name="PROBE", subjects=["probe.events"])
        ack = await js.publish("probe.events", b"stored on /data")
        info = await js.stream_info("PROBE")
        assert ack.seq == 1
        return int(info.state.messages)
    finally:
        await nc.close()


def test_the_server_stores_jetstream_messages_read_only_without_capabilities(
    archive: Path, tmp_path: Path
) -> None:
    cmd = podman_command()
    ref = f"{REPOSITORY}:{nats_version()}"
    load = subprocess.run(
        [*cmd, "load", "-q", "-i", str(archive)], check=False, capture_output=True, text=True
    )
    assert load.returncode == 0, load.stderr
    store = tmp_path / "store"
    store.mkdir()
    os.chown(store, 65532, 65532)  # as a pod's fsGroup makes its volume writable
    client, monitor = _free_port(), _free_port()
    name = f"falco-talon-nats-smoke-{client}"
    server = subprocess.Popen(
        [*cmd, "run", "--rm", "--name", name, "--read-only", "--cap-drop=ALL",
         "--security-opt", "no-new-privileges", "-v", f"{store}:/data", ref,
         "--jetstream", "--store_dir", "/data", "--addr", "127.0.0.1",
         "--port", str(client), "--http_port", str(monitor)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        for _ in range(120):
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{monitor}/healthz?js-enabled-only=true", timeout=2
                ) as resp:
                    assert resp.status == 200
                break
            except OSError:
                assert server.poll() is None, server.stdout.read() if server.stdout else ""
                time.sleep(0.25)
        else:
            raise AssertionError("nats-server did not answer /healthz")
        assert asyncio.run(_store_and_read(f"nats://127.0.0.1:{client}")) == 1
        # JetStream's files are on the volume, written by the non-root user
        written = [p for p in store.rglob("*") if p.is_file()]
        assert written and all(p.stat().st_uid == 65532 for p in written)
    finally:
        subprocess.run([*cmd, "stop", "-t", "10", name], check=False, capture_output=True)
        out, _ = server.communicate(timeout=60)
        subprocess.run([*cmd, "rmi", "-f", ref], check=False, capture_output=True, timeout=120)
    assert "Server is ready" in out


def test_the_chart_s_bundled_nats_deploys_this_image_by_default() -> None:
    """values.yaml's nats.deploy.image names what `make image-nats` builds."""
    values = yaml.safe_load((ROOT / "charts" / "falco-talon" / "values.yaml").read_text())
    image = values["nats"]["deploy"]["image"]
    assert f"docker.io/{image['repository']}" == REPOSITORY
    assert image["tag"] == nats_version()
