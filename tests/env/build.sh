#!/usr/bin/env bash
# Build the binaries of the local test control plane from the Go module proxy.
#
#   tests/env/build.sh            kube-apiserver + etcd (default)
#   tests/env/build.sh k8s        same
#   tests/env/build.sh jaeger     Jaeger v2 all-in-one binary
#   tests/env/build.sh kubelet    talon-kubelet, the test kubelet of tests/env/kubelet/
#   tests/env/build.sh helm       helm v3 CLI (lint/template of charts/, tests/chart/)
#   tests/env/build.sh node       kubelet, kube-scheduler, kube-controller-manager, kube-proxy
#                                 (same k8s.io/kubernetes version and scratch module as k8s)
#   tests/env/build.sh containerd containerd, ctr, containerd-shim-runc-v2
#   tests/env/build.sh cni        CNI plugins bridge, host-local, loopback, portmap
#   tests/env/build.sh nats       nats-server (JetStream), for tests/nats/
#
# Binaries are cached outside the repository, in
#   ${XDG_CACHE_HOME:-$HOME/.cache}/falco-talon/testenv/k8s-<K8S_VERSION>-etcd-<ETCD_VERSION>/
#   ${XDG_CACHE_HOME:-$HOME/.cache}/falco-talon/testenv/jaeger-<JAEGER_VERSION>/
#   ${XDG_CACHE_HOME:-$HOME/.cache}/falco-talon/testenv/kubelet-<hash of its sources>/
#   ${XDG_CACHE_HOME:-$HOME/.cache}/falco-talon/testenv/helm-<HELM_VERSION>/
#   ${XDG_CACHE_HOME:-$HOME/.cache}/falco-talon/testenv/node-<K8S_VERSION>/
#   ${XDG_CACHE_HOME:-$HOME/.cache}/falco-talon/testenv/containerd-<CONTAINERD_VERSION>/
#   ${XDG_CACHE_HOME:-$HOME/.cache}/falco-talon/testenv/cni-<CNI_VERSION>/
#   ${XDG_CACHE_HOME:-$HOME/.cache}/falco-talon/testenv/nats-<NATS_VERSION>/
# A second run finds them there and returns at once. If KUBEBUILDER_ASSETS names
# a directory holding kube-apiserver and etcd (as setup-envtest provides), that
# directory is used and nothing is built.
#
# Progress goes to stderr; the last line on stdout is the bin directory.
#
# Overridable environment: K8S_VERSION, ETCD_VERSION, JAEGER_VERSION, HELM_VERSION,
# CONTAINERD_VERSION, CNI_VERSION, NATS_VERSION, GO (the go binary), GOPROXY, XDG_CACHE_HOME. (The kubelet's versions are pinned by
# tests/env/kubelet/go.mod and go.sum, not by K8S_VERSION.)
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.34.12}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"
JAEGER_VERSION="${JAEGER_VERSION:-v1.76.0}"
HELM_VERSION="${HELM_VERSION:-v3.22.0}"
CONTAINERD_VERSION="${CONTAINERD_VERSION:-v2.4.2}"
CNI_VERSION="${CNI_VERSION:-v1.10.0}"
NATS_VERSION="${NATS_VERSION:-v2.15.2}"
NODE_BINS=(kubelet kube-scheduler kube-controller-manager kube-proxy)
CONTAINERD_BINS=(containerd ctr containerd-shim-runc-v2)
CNI_BINS=(bridge host-local loopback portmap)
CACHE_ROOT="${XDG_CACHE_HOME:-$HOME/.cache}/falco-talon/testenv"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KUBELET_SRC="$HERE/kubelet"

log() { printf '[testenv/build] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

target="${1:-k8s}"

have_bins() { # dir bin...
    local dir="$1"; shift
    local b
    for b in "$@"; do [[ -x "$dir/$b" && -f "$dir/$b" ]] || return 1; done
}

# The kubelet's cache key: its Go sources, go.mod and go.sum (which pin every
# module version), so editing main.go or bumping a module rebuilds it.
kubelet_src_hash() {
    local sum
    if command -v sha256sum >/dev/null 2>&1; then sum=(sha256sum); else sum=(shasum -a 256); fi
    (
        cd "$KUBELET_SRC"
        for f in go.mod go.sum *.go; do printf '== %s\n' "$f"; cat "$f"; done
    ) | "${sum[@]}" | cut -c1-16
}

# ---------------------------------------------------------------- fast paths
case "$target" in
k8s)
    if [[ -n "${KUBEBUILDER_ASSETS:-}" ]]; then
        have_bins "$KUBEBUILDER_ASSETS" kube-apiserver etcd \
            || die "KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS lacks kube-apiserver and/or etcd"
        echo "$KUBEBUILDER_ASSETS"
        exit 0
    fi
    BIN_DIR="$CACHE_ROOT/k8s-$K8S_VERSION-etcd-$ETCD_VERSION"
    have_bins "$BIN_DIR" kube-apiserver etcd && { echo "$BIN_DIR"; exit 0; }
    ;;
jaeger)
    BIN_DIR="$CACHE_ROOT/jaeger-$JAEGER_VERSION"
    have_bins "$BIN_DIR" jaeger && { echo "$BIN_DIR"; exit 0; }
    ;;
kubelet)
    BIN_DIR="$CACHE_ROOT/kubelet-$(kubelet_src_hash)"
    have_bins "$BIN_DIR" talon-kubelet && { echo "$BIN_DIR"; exit 0; }
    ;;
helm)
    BIN_DIR="$CACHE_ROOT/helm-$HELM_VERSION"
    have_bins "$BIN_DIR" helm && { echo "$BIN_DIR"; exit 0; }
    ;;
node)
    BIN_DIR="$CACHE_ROOT/node-$K8S_VERSION"
    have_bins "$BIN_DIR" "${NODE_BINS[@]}" && { echo "$BIN_DIR"; exit 0; }
    ;;
containerd)
    BIN_DIR="$CACHE_ROOT/containerd-$CONTAINERD_VERSION"
    have_bins "$BIN_DIR" "${CONTAINERD_BINS[@]}" && { echo "$BIN_DIR"; exit 0; }
    ;;
cni)
    BIN_DIR="$CACHE_ROOT/cni-$CNI_VERSION"
    have_bins "$BIN_DIR" "${CNI_BINS[@]}" && { echo "$BIN_DIR"; exit 0; }
    ;;
nats)
    BIN_DIR="$CACHE_ROOT/nats-$NATS_VERSION"
    have_bins "$BIN_DIR" nats-server && { echo "$BIN_DIR"; exit 0; }
    ;;
-h|--help|help)
    sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
*)
    die "unknown target '$target' (expected: k8s, jaeger, kubelet, helm, node, containerd, cni, nats)"
    ;;
esac

# ---------------------------------------------------------------- slow path
GO="${GO:-$(command -v go || true)}"
[[ -n "$GO" ]] || GO=/usr/local/go/bin/go
[[ -x "$GO" ]] || die "no Go toolchain found (set GO=/path/to/go)"

# Never switch toolchains behind our back, resolve missing deps, static binaries.
export GOTOOLCHAIN=local
export GOFLAGS="${GOFLAGS:+$GOFLAGS }-mod=mod"
export CGO_ENABLED=0
export GOPROXY="${GOPROXY:-https://proxy.golang.org,direct}"

mkdir -p "$BIN_DIR"
# Serialise concurrent builds (e.g. several pytest-xdist workers).
exec 9>"$BIN_DIR.lock"
if command -v flock >/dev/null 2>&1; then
    log "waiting for build lock $BIN_DIR.lock"
    flock 9
fi

SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/falco-talon-testenv-build.XXXXXX")"
trap 'rm -rf "$SCRATCH"' EXIT

START=$SECONDS
log "$("$GO" version); scratch module in $SCRATCH"

# go build into a temporary name, then rename: a half-written binary never
# looks like a cached one.
gobuild() { # out-path ldflags package [extra go build flags...]
    local out="$1" ldflags="$2" pkg="$3"
    shift 3
    log "go build $* $pkg -> $out"
    "$GO" build -trimpath -ldflags="-s -w $ldflags" "$@" -o "$out.tmp.$$" "$pkg"
    mv -f "$out.tmp.$$" "$out"
}

build_etcd() {
    [[ -x "$BIN_DIR/etcd" ]] && return 0
    local dir="$SCRATCH/etcd"
    mkdir -p "$dir"
    # go.etcd.io/etcd/server/v3 is itself package main (server/main.go calls
    # etcdmain.Main), so it can be built straight from the module.
    (
        cd "$dir"
        "$GO" mod init falco-talon.local/testenv/etcd >/dev/null 2>&1
        log "go get -tool go.etcd.io/etcd/server/v3@$ETCD_VERSION"
        "$GO" get -tool "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
        gobuild "$BIN_DIR/etcd" "" go.etcd.io/etcd/server/v3
    )
    "$BIN_DIR/etcd" --version >&2
}

# Writes into $1 a scratch go.mod requiring k8s.io/kubernetes $K8S_VERSION, and
# sets K8S_LDFLAGS (version stamps).
k8s_scratch_module() { # dir
    local dir="$1" gomod minor patch staging p
    mkdir -p "$dir"
    [[ "$K8S_VERSION" =~ ^v1\.([0-9]+)\.([0-9]+)$ ]] \
        || die "K8S_VERSION must look like v1.N.M, got $K8S_VERSION"
    minor="${BASH_REMATCH[1]}"; patch="${BASH_REMATCH[2]}"
    staging="v0.$minor.$patch"

    # kubernetes' own go.mod requires every staging module at v0.0.0 and
    # replaces it with ./staging/src/k8s.io/<name>, which only works inside
    # the kubernetes source tree. Read it from the module cache and turn each
    # such replace into the published tag of that staging module.
    log "go mod download k8s.io/kubernetes@$K8S_VERSION (large, first time only)"
    gomod="$(cd "$SCRATCH" && "$GO" mod download -json "k8s.io/kubernetes@$K8S_VERSION" \
        | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')"
    [[ -f "$gomod" ]] || die "could not download k8s.io/kubernetes@$K8S_VERSION"

    {
        echo "// Generated by tests/env/build.sh from k8s.io/kubernetes@$K8S_VERSION/go.mod"
        echo "module falco-talon.local/testenv/k8s"
        echo
        # same language version and GODEBUG defaults as an upstream build
        grep -E '^(go|godebug) ' "$gomod"
        echo
        echo "require k8s.io/kubernetes $K8S_VERSION"
        echo
        echo "replace ("
        awk -v ver="$staging" '
            /^require[[:space:]]*\(/ { inreq = 1; next }
            /^replace[[:space:]]*\(/ { inrep = 1; next }
            /^\)/ { inreq = 0; inrep = 0; next }
            inreq && $1 ~ /^k8s\.io\// && $2 == "v0.0.0" { req[$1] = 1 }
            inrep && $2 == "=>" && $3 ~ /^\.\/staging\// { rep[$1] = 1 }
            END { for (m in rep) if (m in req) printf "\t%s => %s %s\n", m, m, ver }
        ' "$gomod" | sort
        echo ")"
    } >"$dir/go.mod"
    log "scratch go.mod: $(grep -c '=>' "$dir/go.mod") staging replaces at $staging"

    K8S_LDFLAGS=""
    for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        K8S_LDFLAGS+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
        K8S_LDFLAGS+=" -X $p.gitTreeState=clean -X $p.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    done
}

# Builds k8s.io/kubernetes/cmd/<name> for each name into $BIN_DIR.
build_k8s_cmds() { # name...
    local dir="$SCRATCH/k8s" c
    local todo=()
    for c in "$@"; do [[ -x "$BIN_DIR/$c" ]] || todo+=("$c"); done
    ((${#todo[@]})) || return 0
    k8s_scratch_module "$dir"
    (
        cd "$dir"
        for c in "${todo[@]}"; do
            log "go get -tool k8s.io/kubernetes/cmd/$c@$K8S_VERSION"
            "$GO" get -tool "k8s.io/kubernetes/cmd/$c@$K8S_VERSION"
        done
        for c in "${todo[@]}"; do
            gobuild "$BIN_DIR/$c" "$K8S_LDFLAGS" "k8s.io/kubernetes/cmd/$c"
        done
    )
    for c in "${todo[@]}"; do "$BIN_DIR/$c" --version >&2; done
}

build_kube_apiserver() {
    build_k8s_cmds kube-apiserver
}

build_node() {
    build_k8s_cmds "${NODE_BINS[@]}"
}

# go install <module>/<pkg>@<version> for each package, into a temporary GOBIN
# renamed into $BIN_DIR binary by binary.
goinstall() { # ldflags module version pkg...
    local ldflags="$1" mod="$2" ver="$3" p
    shift 3
    local tmp="$BIN_DIR/.gobin.$$"
    mkdir -p "$tmp"
    for p in "$@"; do
        [[ -x "$BIN_DIR/$(basename "$p")" ]] && continue
        log "go install $mod/$p@$ver"
        GOBIN="$tmp" GOFLAGS="" "$GO" install -trimpath -ldflags="-s -w $ldflags" "$mod/$p@$ver"
        mv -f "$tmp/$(basename "$p")" "$BIN_DIR/$(basename "$p")"
    done
    rm -rf "$tmp"
}

build_containerd() {
    local m=github.com/containerd/containerd/v2
    goinstall "-X $m/version.Version=$CONTAINERD_VERSION -X $m/version.Package=github.com/containerd/containerd/v2" \
        "$m" "$CONTAINERD_VERSION" "${CONTAINERD_BINS[@]/#/cmd/}"
    "$BIN_DIR/containerd" --version >&2
}

build_cni() {
    local m=github.com/containernetworking/plugins
    goinstall "-X github.com/containernetworking/plugins/pkg/utils/buildversion.BuildVersion=$CNI_VERSION" \
        "$m" "$CNI_VERSION" plugins/main/bridge plugins/ipam/host-local plugins/main/loopback plugins/meta/portmap
}

build_nats() {
    [[ -x "$BIN_DIR/nats-server" ]] && return 0
    # github.com/nats-io/nats-server/v2 is itself package main (main.go at the
    # module root); go install names the binary nats-server (the /v2 suffix is dropped).
    local tmp="$BIN_DIR/.gobin.$$"
    mkdir -p "$tmp"
    log "go install github.com/nats-io/nats-server/v2@$NATS_VERSION"
    GOBIN="$tmp" GOFLAGS="" "$GO" install -trimpath \
        -ldflags="-s -w -X github.com/nats-io/nats-server/v2/server.gitCommit=$NATS_VERSION" \
        "github.com/nats-io/nats-server/v2@$NATS_VERSION"
    mv -f "$tmp/nats-server" "$BIN_DIR/nats-server"
    rm -rf "$tmp"
    "$BIN_DIR/nats-server" --version >&2
}

build_jaeger() {
    [[ -x "$BIN_DIR/jaeger" ]] && return 0
    local dir="$SCRATCH/jaeger"
    mkdir -p "$dir"
    (
        cd "$dir"
        "$GO" mod init falco-talon.local/testenv/jaeger >/dev/null 2>&1
        log "go get -tool github.com/jaegertracing/jaeger/cmd/jaeger@$JAEGER_VERSION"
        "$GO" get -tool "github.com/jaegertracing/jaeger/cmd/jaeger@$JAEGER_VERSION"
        gobuild "$BIN_DIR/jaeger" \
            "-X github.com/jaegertracing/jaeger/internal/version.latestVersion=$JAEGER_VERSION" \
            github.com/jaegertracing/jaeger/cmd/jaeger
    )
}

build_kubelet() {
    [[ -x "$BIN_DIR/talon-kubelet" ]] && return 0
    # Built in place from the committed module: -mod=readonly (overrides the
    # -mod=mod above) fails rather than touch go.mod/go.sum; GOWORK=off so a
    # go.work further up cannot change the module graph. Copy the sources
    # first so a concurrent edit cannot end up in a binary cached under the
    # hash of the previous sources.
    local dir="$SCRATCH/kubelet"
    mkdir -p "$dir"
    cp "$KUBELET_SRC"/go.mod "$KUBELET_SRC"/go.sum "$KUBELET_SRC"/*.go "$dir/"
    (
        cd "$dir"
        export GOWORK=off
        log "modules pinned by $KUBELET_SRC/go.sum (k8s.io/* $(
            sed -n 's/^[[:space:]]*k8s.io\/kubelet \(v[^ ]*\).*/\1/p' go.mod))"
        gobuild "$BIN_DIR/talon-kubelet" "" . -mod=readonly
    )
    "$BIN_DIR/talon-kubelet" --version >&2
}

build_helm() {
    [[ -x "$BIN_DIR/helm" ]] && return 0
    local dir="$SCRATCH/helm" k8s ld
    mkdir -p "$dir"
    (
        cd "$dir"
        "$GO" mod init falco-talon.local/testenv/helm >/dev/null 2>&1
        log "go get -tool helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
        "$GO" get -tool "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
        # What helm's Makefile stamps: its version, and the Kubernetes version that
        # `helm template`/`lint` assume (client-go v0.N.M -> 1.N).
        k8s="$("$GO" list -m -f '{{.Version}}' k8s.io/client-go)"
        [[ "$k8s" =~ ^v0\.([0-9]+)\. ]] || die "unexpected k8s.io/client-go version $k8s"
        ld="-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
        ld+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
        for p in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
            ld+=" -X $p.k8sVersionMajor=1 -X $p.k8sVersionMinor=${BASH_REMATCH[1]}"
        done
        gobuild "$BIN_DIR/helm" "$ld" helm.sh/helm/v3/cmd/helm
    )
    "$BIN_DIR/helm" version --short >&2
}

case "$target" in
k8s)
    build_etcd
    build_kube_apiserver
    ;;
jaeger)
    build_jaeger
    ;;
kubelet)
    build_kubelet
    ;;
helm)
    build_helm
    ;;
node)
    build_node
    ;;
containerd)
    build_containerd
    ;;
cni)
    build_cni
    ;;
nats)
    build_nats
    ;;
esac

log "done in $((SECONDS - START))s; $(du -sh "$BIN_DIR" | cut -f1) in $BIN_DIR"
echo "$BIN_DIR"
