"""The demo workload image from ``make image-demo``: named for ``ctr images import``, runs bash.

Shares the debootstrap base with the falco-talon image (a no-op or ~25 s when that is cached).
"""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.image.test_image import build_image, podman_command

pytestmark = pytest.mark.image

REF = "docker.io/falcosecurity/falco-talon-demo:bookworm"


@pytest.fixture(scope="module")
def archive() -> Path:
    return build_image("demo")


def test_the_demo_archive_is_named_by_its_full_reference(archive: Path) -> None:
    with tarfile.open(archive) as tar:
        member = tar.extractfile("index.json")
        assert member is not None
        (entry,) = json.load(member)["manifests"]
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == REF


def test_the_demo_image_runs_bash_and_coreutils_without_apt_or_python(archive: Path) -> None:
    cmd = podman_command()
    load = subprocess.run(
        [*cmd, "load", "-q", "-i", str(archive)], check=False, capture_output=True, text=True
    )
    assert load.returncode == 0, load.stderr
    script = "echo $BASH_VERSION; sleep 0; ls /usr/bin/apt /usr/bin/dpkg /usr/bin/python3 2>&1"
    proc = subprocess.run(
        [*cmd, "run", "--rm", "--read-only", REF, "bash", "-c", script],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    subprocess.run([*cmd, "rmi", "-f", REF], check=False, capture_output=True, timeout=120)
    assert proc.returncode == 2, proc.stderr  # ls: none of the three exists
    first, *missing = proc.stdout.splitlines()
    assert first.startswith("5.")
    assert len(missing) == 3 and all("No such file" in line for line in missing)
