#!/usr/bin/env bash
# Build falco-talon's OCI images without pulling from any registry (see image/README.md).
#
#   image/build.sh talon   -> docker.io/falcosecurity/falco-talon-py:<version in pyproject.toml>
#   image/build.sh demo    -> docker.io/falcosecurity/falco-talon-demo:bookworm
#   image/build.sh nats    -> docker.io/falcosecurity/falco-talon-nats:<nats-server version>
#
# The root filesystem comes from Debian packages (debootstrap, minbase), Python packages from
# uv.lock (exact versions, hashes checked), the project as a normal wheel. buildah assembles
# the image and writes an OCI archive. The LAST line printed is the archive's path.
# The nats image is the static nats-server binary of `tests/env/build.sh nats` (built from the
# Go module proxy) on an empty base: no Debian packages at all.
#
# Cache (${XDG_CACHE_HOME:-~/.cache}/falco-talon/images):
#   base/<suite>-<hash of variant+packages>/rootfs.tar  the debootstrap result, reused by both images
#   <name>-<tag>-<hash of inputs>.oci.tar               the archives; an unchanged tree is a no-op
#                                                        (nats: the binary's version and hash)
#   buildah/                                             buildah's storage (scratch, safe to delete)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
KIND=${1:-talon}
CACHE=${FALCO_TALON_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/falco-talon/images}
SUITE=bookworm
VARIANT=minbase
# What the base root filesystem holds beyond minbase: Python 3.11 (bookworm's python3), CA
# certificates for TLS to Slack/webhooks, netbase for /etc/services and /etc/protocols.
BASE_PACKAGES=python3,ca-certificates,netbase
RUN_UID=65532
PY=python3.11
VENV=/opt/falco-talon

log() { echo "image: $*" >&2; }

case "$KIND" in
talon | demo | nats) ;;
*)
    echo "usage: $0 talon|demo|nats" >&2
    exit 2
    ;;
esac

# The Debian mirror apt already uses: first URIs:/deb line of the main archive.
debian_mirror() {
    local m
    m=$(grep -hsE '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
        /etc/apt/sources.list.d/*.sources 2>/dev/null |
        grep -oE 'https?://[^ ]+/debian/?( |$)' | grep -v security | head -n1 | tr -d ' ')
    echo "${m:-http://deb.debian.org/debian}"
}

sha() { sha256sum | cut -c1-16; }

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$ROOT/pyproject.toml" | head -n1)
if [[ $KIND == talon ]]; then
    NAME=falco-talon-py
    TAG=$version
elif [[ $KIND == nats ]]; then
    # The binary tests/nats runs (cached by version; built from the Go module proxy on first
    # use), and its own version: `nats-server: v2.15.2` -> tag 2.15.2.
    NATS_BIN=$(bash "$ROOT/tests/env/build.sh" nats | tail -n1)/nats-server
    nats_version=$("$NATS_BIN" --version | sed -n 's/^nats-server: v\{0,1\}\([0-9][^ ]*\)$/\1/p')
    [[ -n $nats_version ]] || {
        echo "image: cannot read the version of $NATS_BIN" >&2
        exit 1
    }
    NAME=falco-talon-nats
    TAG=$nats_version
else
    NAME=falco-talon-demo
    TAG=$SUITE
fi
REF=docker.io/falcosecurity/$NAME:$TAG

# Key of the result: every input that can change the image's content.
inputs_hash() {
    {
        echo "$KIND $SUITE $VARIANT $BASE_PACKAGES $RUN_UID"
        sha256sum "$ROOT/image/build.sh" "$ROOT/image/purge.py" "$ROOT/image/split_requirements.py"
        if [[ $KIND == nats ]]; then
            echo "$TAG"
            sha256sum <"$NATS_BIN"
        elif [[ $KIND == talon ]]; then
            cd "$ROOT"
            find pyproject.toml uv.lock README.md engine actionners notifiers observability schemas \
                -type f -not -path '*/__pycache__/*' -not -name '*.pyc' -print0 |
                LC_ALL=C sort -z | xargs -0 sha256sum
        fi
    } | sha
}

key=$(inputs_hash)
OUT=$CACHE/$NAME-$TAG-$key.oci.tar
if [[ -s $OUT ]]; then
    log "up to date: $REF (inputs $key)"
    echo "$OUT"
    exit 0
fi

[[ $(id -u) -eq 0 ]] || {
    echo "image: needs root (debootstrap, chroot, buildah storage)" >&2
    exit 1
}
bash "$ROOT/.ci/system-packages.sh" image
mkdir -p "$CACHE"
# One build at a time per cache (the base rootfs and buildah's storage are shared).
exec 9>"$CACHE/.build.lock"
flock 9
if [[ -s $OUT ]]; then # built meanwhile by the holder of the lock
    echo "$OUT"
    exit 0
fi
started=$(date +%s)

# --- 4. the image: buildah from the root filesystem tar $WORK/rootfs.tar, config by kind ----
assemble() {
    B=(buildah --root "$CACHE/buildah/root" --runroot "$CACHE/buildah/runroot" --storage-driver overlay)
    revision=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)
    if [[ $KIND == talon && -n $(git -C "$ROOT" status --porcelain -- pyproject.toml uv.lock \
        README.md engine actionners notifiers observability schemas image 2>/dev/null) ]]; then
        revision=$revision-dirty
    fi
    source_url=$(git -C "$ROOT" remote get-url origin 2>/dev/null | sed 's/\.git$//' || true)
    [[ $source_url == https://* ]] || source_url=https://github.com/falco-talon/falco-talon
    c=$("${B[@]}" from --quiet scratch)
    cleanup() {
        [[ -z $c ]] || "${B[@]}" rm "$c" >/dev/null 2>&1 || true
        rm -rf --one-file-system "$WORK"
    }
    trap cleanup EXIT
    "${B[@]}" add --quiet "$c" "$WORK/rootfs.tar" / >/dev/null
    labels=(
        --label org.opencontainers.image.source="$source_url"
        --label org.opencontainers.image.revision="$revision"
        --label org.opencontainers.image.licenses=Apache-2.0
    )
    if [[ $KIND == talon ]]; then
        "${B[@]}" config "${labels[@]}" \
            --label org.opencontainers.image.version="$version" \
            --label org.opencontainers.image.title=falco-talon \
            --label org.opencontainers.image.description="falco-talon, a response engine for Falco" \
            --env PATH=$VENV/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
            --env PYTHONDONTWRITEBYTECODE=1 --env PYTHONUNBUFFERED=1 --env LANG=C.UTF-8 \
            --env HOME=/home/nonroot \
            --user "$RUN_UID:$RUN_UID" --workingdir /home/nonroot \
            --entrypoint "[\"$VENV/bin/falco-talon\"]" --cmd '["--help"]' \
            --port 2803/tcp "$c"
    elif [[ $KIND == nats ]]; then
        "${B[@]}" config "${labels[@]}" \
            --label org.opencontainers.image.version="$TAG" \
            --label org.opencontainers.image.title=falco-talon-nats \
            --label org.opencontainers.image.description="NATS server with JetStream for falco-talon's shared queue: github.com/nats-io/nats-server/v2@v$TAG, static, on an empty base" \
            --env PATH=/usr/local/bin \
            --user "$RUN_UID:$RUN_UID" --workingdir /data \
            --entrypoint '["/usr/local/bin/nats-server"]' \
            --cmd '["--jetstream", "--store_dir", "/data", "--http_port", "8222"]' \
            --port 4222/tcp --port 8222/tcp "$c"
    else
        "${B[@]}" config "${labels[@]}" \
            --label org.opencontainers.image.version="$SUITE" \
            --label org.opencontainers.image.title=falco-talon-demo \
            --label org.opencontainers.image.description="Demo workload for falco-talon: Debian $SUITE minbase, bash + coreutils" \
            --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
            --cmd '["/bin/sleep", "infinity"]' "$c"
    fi
    "${B[@]}" commit --quiet --rm "$c" "$REF" >/dev/null
    c=
    rm -f "$OUT.part"
    "${B[@]}" push --quiet "$REF" "oci-archive:$OUT.part:$REF"
    "${B[@]}" rmi "$REF" >/dev/null 2>&1 || true
    mv "$OUT.part" "$OUT"
    # Older archives of the same image go (and leftovers of interrupted pushes): the newest stays.
    find "$CACHE" -maxdepth 1 -name "$NAME-*.oci.tar*" ! -path "$OUT" -delete
}

if [[ $KIND == nats ]]; then
    # --- the NATS server: its static binary (CGO_ENABLED=0), a passwd naming the run-time user,
    # /data for JetStream's store (a volume in a pod) and /tmp; no libc, no shell, nothing else.
    WORK=$(mktemp -d "$CACHE/work-XXXXXX")
    trap 'rm -rf --one-file-system "$WORK"' EXIT
    R=$WORK/rootfs
    install -D -m 0755 "$NATS_BIN" "$R/usr/local/bin/nats-server"
    if ldd "$R/usr/local/bin/nats-server" >/dev/null 2>&1; then
        echo "image: $NATS_BIN is dynamically linked: it would not run on an empty base" >&2
        exit 1
    fi
    mkdir -p "$R/etc" "$R/data" "$R/tmp"
    chmod 1777 "$R/tmp"
    printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:%s:%s:nonroot:/data:/sbin/nologin\n' \
        "$RUN_UID" "$RUN_UID" >"$R/etc/passwd"
    printf 'root:x:0:\nnonroot:x:%s:\n' "$RUN_UID" >"$R/etc/group"
    chown "$RUN_UID:$RUN_UID" "$R/data"
    tar -C "$R" --numeric-owner -cf "$WORK/rootfs.tar" .
    assemble
    log "built $REF in $(($(date +%s) - started)) s: $(du -k "$OUT" | cut -f1) KB archive"
    echo "$OUT"
    exit 0
fi

# --- 1. base root filesystem, cached by suite + package list ---------------------------------
base_key=$(echo "$SUITE $VARIANT $BASE_PACKAGES" | sha)
BASE=$CACHE/base/$SUITE-$base_key/rootfs.tar
if [[ ! -s $BASE ]]; then
    mirror=$(debian_mirror)
    log "debootstrap $SUITE ($VARIANT + $BASE_PACKAGES) from $mirror (a few minutes, once)"
    tmp=$(mktemp -d "$CACHE/base-XXXXXX")
    # A failed debootstrap can leave /proc, /sys (or a bind-mounted /dev) mounted in the target:
    # unmount what is under it first, and never let rm cross into another file system.
    trap 'grep -o " $tmp/[^ ]*" /proc/mounts | sort -r | xargs -r umount -l; rm -rf --one-file-system "$tmp"' EXIT
    debootstrap --variant="$VARIANT" --include="$BASE_PACKAGES" "$SUITE" "$tmp/rootfs" "$mirror" \
        >"$tmp/debootstrap.log" 2>&1 || {
        tail -n 30 "$tmp/debootstrap.log" >&2
        exit 1
    }
    rm -rf "$tmp/rootfs/var/cache/apt/archives/"*.deb "$tmp/rootfs/var/lib/apt/lists/"*
    mkdir -p "$(dirname "$BASE")"
    tar -C "$tmp/rootfs" --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' \
        --numeric-owner -cf "$BASE.part" .
    mv "$BASE.part" "$BASE"
    rm -rf --one-file-system "$tmp"
    trap - EXIT
fi

WORK=$(mktemp -d "$CACHE/work-XXXXXX")
trap 'rm -rf --one-file-system "$WORK"' EXIT
R=$WORK/rootfs
mkdir -p "$R"
tar -C "$R" --numeric-owner -xf "$BASE"

# Remove Debian packages the way `dpkg --purge` would, without running their scripts (dpkg
# itself is one of them): delete the files they list and their stanza in the status file.
# /var/lib/dpkg/status is kept, listing exactly what is left, so image scanners (Trivy, Grype)
# still see the Debian packages; dpkg's other bookkeeping goes.
#   purge remove PKG...                  remove these packages
#   purge keep ROOT... -- EXCLUDED...    keep the Depends/Pre-Depends closure of ROOT (not
#                                        following EXCLUDED), remove every other package
purge() {
    python3 "$ROOT/image/purge.py" "$R" "$@"
}

if [[ $KIND == talon ]]; then
    # --- 2. the project: a wheel + exact dependencies from uv.lock into a venv in the rootfs ---
    UV=(python3 -m uv)
    "${UV[@]}" --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
    (cd "$ROOT" && "${UV[@]}" export --frozen --no-dev --no-emit-project --quiet \
        -o "$WORK/requirements.txt")
    (cd "$ROOT" && "${UV[@]}" build --wheel --quiet --out-dir "$WORK/dist")
    chroot "$R" /usr/bin/$PY -m venv --without-pip $VENV
    SITE=$R$VENV/lib/$PY/site-packages
    common=(--target "$SITE" --python-version 3.11 --python-platform x86_64-manylinux_2_36
        --only-binary :all: --link-mode copy --no-config --quiet)
    # Every dependency from a wheel, but those published only as a source archive (pure
    # Python: SDIST_ONLY), built here, hash-checked like the rest.
    SDIST_ONLY=(nkeys)
    python3 "$ROOT/image/split_requirements.py" "$WORK/requirements.txt" "$WORK/sdist-only.txt" \
        "${SDIST_ONLY[@]}"
    "${UV[@]}" pip install "${common[@]}" --require-hashes -r "$WORK/requirements.txt"
    if [[ -s $WORK/sdist-only.txt ]]; then
        "${UV[@]}" pip install "${common[@]/:all:/:none:}" --require-hashes --no-deps \
            -r "$WORK/sdist-only.txt"
    fi
    "${UV[@]}" pip install "${common[@]}" --no-deps "$WORK"/dist/*.whl
    rm -rf "$SITE/bin" # uv's scripts carry the build host's interpreter path
    cat >"$R$VENV/bin/falco-talon" <<EOF
#!$VENV/bin/python
import sys

from engine.cli import main

if __name__ == "__main__":
    sys.exit(main())
EOF
    chmod 0755 "$R$VENV/bin/falco-talon"
    ln -s $VENV/bin/falco-talon "$R/usr/local/bin/falco-talon"
    # kubernetes.aio, the client's asyncio twin, is 68 MB and unused (engine/contract/kubeapi.py uses
    # the synchronous client in threads); nothing else imports it.
    if grep -rqE 'kubernetes\.aio|from kubernetes import .*\baio\b' "$ROOT"/{engine,actionners,notifiers,observability}; then
        echo "image: the code uses kubernetes.aio now: stop removing it in image/build.sh" >&2
        exit 1
    fi
    rm -rf "$SITE/kubernetes/aio"
    # Bytecode now, by the image's own interpreter: nothing is compiled or written at run time.
    # The project's packages keep their sources (tracebacks show lines) with unchecked-hash
    # .pyc in __pycache__ (valid whatever the files' mtimes become; the image is immutable).
    # Third-party packages ship bytecode only (.pyc in place of .py, sourceless import): 47 MB
    # of sources would push the image past 150 MB. Their tracebacks show file:line, not text.
    OWN='engine|actionners|notifiers|observability'
    chroot "$R" $VENV/bin/python -m compileall -q -b -x "/site-packages/($OWN)/" \
        $VENV/lib/$PY/site-packages >/dev/null
    find "$SITE" -regextype posix-extended -name '*.py' ! -regex ".*/site-packages/($OWN)/.*" \
        -delete
    for pkg in ${OWN//|/ }; do
        chroot "$R" $VENV/bin/python -m compileall -q --invalidation-mode unchecked-hash \
            $VENV/lib/$PY/site-packages/$pkg >/dev/null
    done
    chroot "$R" /usr/bin/$PY -m compileall -q /usr/lib/$PY >/dev/null || true

    # Only the Debian packages Python and TLS need, by dependency closure: no shell, no
    # coreutils, no awk, no package manager (apt, dpkg, debconf, perl), no openssl binary (libssl3 and
    # the CA bundle stay).
    # libstdc++6: manylinux wheels link the policy's system libraries (grpc's cygrpc needs it).
    purge keep base-files base-passwd netbase ca-certificates python3 libstdc++6 -- \
        openssl debconf perl-base dpkg apt mawk
    find "$R/usr/bin" "$R/usr/sbin" -lname '/etc/alternatives/*' -delete
    rm -rf "$R/etc/alternatives"
    # Every compiled extension module loads: no shared library went with the purge.
    chroot "$R" $VENV/bin/python - <<'EOF'
import importlib, pathlib, sys
site = pathlib.Path(sys.prefix, "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}", "site-packages")
bad = []
for so in sorted(site.rglob("*.so")):
    if ".libs" in so.parent.name or so.name.startswith("lib"):
        continue  # a vendored library, not a module
    name = ".".join(so.relative_to(site).with_suffix("").parts).split(".cpython")[0].split(".abi3")[0]
    try:
        importlib.import_module(name)
    except ImportError as exc:
        if "shared object" in str(exc):
            bad.append(f"{name}: {exc}")
if bad:
    sys.exit("image: extension modules miss libraries:\n" + "\n".join(bad))
EOF
    rm -rf "$R/var/lib/dpkg/info" "$R/var/lib/dpkg/"*-old "$R/var/lib/dpkg/triggers" \
        "$R/var/lib/dpkg/alternatives" "$R/var/lib/dpkg/updates" "$R/var/lib/dpkg/diversions" \
        "$R/var/lib/dpkg/statoverride" "$R/var/lib/dpkg/lock"* "$R/var/lib/dpkg/available" \
        "$R/usr/lib/$PY/ensurepip" "$R/usr/lib/$PY/idlelib" "$R/usr/lib/$PY/lib2to3" \
        "$R/usr/lib/$PY/pydoc_data" "$R/usr/lib/$PY/test" "$R/usr/lib/$PY/turtledemo" \
        "$R/usr/lib/$PY/tkinter" "$R/usr/lib/python3/dist-packages"
else
    # The demo workload keeps bash, coreutils and friends; only Python and apt/dpkg go.
    installed=$(sed -n 's/^Package: //p' "$R/var/lib/dpkg/status")
    gone=()
    for p in apt libapt-pkg6.0 gpgv debian-archive-keyring adduser debconf dpkg python3 \
        python3-minimal python3.11 python3.11-minimal libpython3.11-stdlib \
        libpython3.11-minimal libpython3-stdlib media-types; do
        grep -qx "$p" <<<"$installed" && gone+=("$p")
    done
    purge remove "${gone[@]}"
    rm -rf "$R/var/lib/dpkg/info" "$R/var/lib/dpkg/"*-old "$R/var/lib/dpkg/triggers" \
        "$R/var/lib/dpkg/updates" "$R/var/lib/dpkg/lock"* "$R/var/lib/dpkg/available"
fi

# --- 3. common trimming, the run-time user --------------------------------------------------
rm -rf "$R/var/lib/apt" "$R/var/cache/apt" "$R/etc/apt" "$R/var/cache/debconf" \
    "$R/var/log/"* "$R/var/cache/ldconfig/aux-cache" "$R/usr/share/doc/"* "$R/usr/share/man" \
    "$R/usr/share/info" "$R/usr/share/lintian" "$R/usr/share/locale/"* "$R/root/".* 2>/dev/null ||
    true
rm -f "$R/etc/hostname" "$R/etc/resolv.conf" "$R/etc/machine-id"
echo "nonroot:x:$RUN_UID:$RUN_UID:nonroot:/home/nonroot:/usr/sbin/nologin" >>"$R/etc/passwd"
echo "nonroot:x:$RUN_UID:" >>"$R/etc/group"
mkdir -p "$R/home/nonroot"
chown "$RUN_UID:$RUN_UID" "$R/home/nonroot"
if [[ $KIND == talon ]]; then
    for bad in usr/bin/apt usr/bin/apt-get usr/bin/dpkg usr/bin/gcc usr/bin/cc usr/bin/pip \
        usr/bin/pip3 usr/bin/uv usr/bin/perl usr/bin/sh usr/bin/bash; do
        [[ ! -e $R/$bad ]] || {
            echo "image: $bad left in the image" >&2
            exit 1
        }
    done
fi

tar -C "$R" --numeric-owner -cf "$WORK/rootfs.tar" .

assemble
log "built $REF in $(($(date +%s) - started)) s: $(du -m "$OUT" | cut -f1) MB archive"
echo "$OUT"
