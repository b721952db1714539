#!/usr/bin/env bash
# The one place that installs the system tools the image build and its tests need.
# Debian packages only, no recommends. Idempotent: does nothing when all tools are present.
#   debootstrap : the root filesystem from Debian packages (no registry)
#   buildah     : assembles the OCI image from that root filesystem, writes the OCI archive
#   skopeo      : inspects / publishes the archive
#   podman+runc : runs the image in the tests (crun does not work on cgroup v1 hybrid hosts)
#   fuse-overlayfs, uidmap : storage helpers buildah/podman use
set -euo pipefail

tools=(debootstrap buildah skopeo podman runc)
missing=()
for t in "${tools[@]}"; do command -v "$t" >/dev/null 2>&1 || missing+=("$t"); done
[[ ${#missing[@]} -eq 0 ]] && exit 0

echo "image/deps.sh: installing ${missing[*]} (Debian packages)" >&2
if [[ $(id -u) -ne 0 ]]; then
    echo "image/deps.sh: need root to apt-get install: ${missing[*]}" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt_get() { apt-get -o DPkg::Lock::Timeout=600 "$@"; }
pkgs=(debootstrap buildah skopeo podman runc fuse-overlayfs uidmap)
if ! apt_get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null; then
    apt_get update -qq
    apt_get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
fi
