#!/usr/bin/env bash
# The one place falco-talon installs Debian packages (everything else comes from PyPI through
# uv.lock or is built from the Go module proxy by tests/env/build.sh).
#
#   .ci/system-packages.sh GROUP...      install what each group needs, if missing
#   .ci/system-packages.sh --list GROUP  print the packages of a group
#
# Groups:
#   bench    wrk, the HTTP load generator `make bench` prefers (it falls back to
#            bench/loadgen.py without it)
#   image    buildah, skopeo, debootstrap: `make image` builds OCI images without a registry;
#            podman + runc run them in the image tests
#   cluster  runc, iptables, conntrack, iproute2: the real node of `make cluster-up`
#
# `make test` (CI) calls it for the groups its tiers need; `make bench` never installs.
set -euo pipefail

packages() {
    case "$1" in
    bench) echo "wrk" ;;
    image) echo "buildah skopeo debootstrap podman runc uidmap fuse-overlayfs" ;;
    cluster) echo "runc iptables conntrack iproute2 ethtool socat" ;;
    *) echo "unknown group: $1 (bench, image, cluster)" >&2; return 2 ;;
    esac
}

if [[ "${1:-}" == "--list" ]]; then
    packages "${2:?group}"
    exit 0
fi

missing=()
for group in "$@"; do
    for pkg in $(packages "$group"); do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
done
((${#missing[@]})) || exit 0
echo "[system-packages] installing: ${missing[*]}" >&2
SUDO=""
[[ $(id -u) -eq 0 ]] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
apt_get() { $SUDO apt-get -o DPkg::Lock::Timeout=600 "$@"; }
apt_get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
    apt_get update -qq >/dev/null
    apt_get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
