"""A real single-node Kubernetes cluster on this machine, for end-to-end tests.

Everything is the real thing, built from the Go module proxy by ``tests/env/build.sh``
(targets ``k8s``, ``node``, ``containerd``, ``cni``, ``helm``) plus Debian's ``runc``:

- etcd + kube-apiserver (:class:`tests.env.testenv.TestEnv`, in ``<state>/control-plane``),
  here with the ServiceAccount and NodeRestriction admission plugins, ``Node,RBAC``
  authorization, the ``kubernetes`` Service endpoints (lease reconciler) advertised on the
  bridge address so that pods reach the API, and a client certificate to talk to the kubelet;
- containerd (config version 3, CRI plugin, runc, overlayfs) in ``<state>/containerd``;
- CNI: a ``bridge`` (:data:`BRIDGE`, :data:`NODE_IP`) with ``host-local`` IPAM on
  :data:`POD_CIDR`, ``portmap``, and ``loopback``;
- kubelet (cgroupfs driver, cgroup v1 accepted, node credentials from a client certificate),
  kube-scheduler, kube-controller-manager (service-account tokens, workload controllers,
  garbage collection...) and kube-proxy (iptables mode, so ClusterIPs answer from the host).

Services live in :data:`SERVICE_CIDR`; a route sends that range to the bridge, so nothing
leaves the machine. The images come from ``make image`` / ``make image-demo`` /
``make image-nats`` (OCI archives, imported with ``ctr``); the sandbox ("pause") image is the
demo image with ``sleep infinity`` as its entrypoint (same layers). ``up`` then installs
``charts/falco-talon`` with ``examples/cluster-values.yaml`` (two replicas sharing the chart's
NATS StatefulSet, whose claim binds a hostPath PersistentVolume under the state directory)
and the demo workloads of namespace ``demo``. There is no cluster DNS: the values pin the NATS
Service's ClusterIP, which the chart then hands falco-talon.

Command line (from the repository root, as root)::

    python -m tests.env.cluster up        # prints the env file: KUBECONFIG, TALON_URL, ...
    python -m tests.env.cluster status
    python -m tests.env.cluster down      # stops every process by pid, removes the bridge,
                                          # the iptables chains, mounts, cgroups and state

The state directory is ``--state-dir``, else ``$FALCO_TALON_CLUSTER_DIR``, else
``${XDG_RUNTIME_DIR:-/tmp}/falco-talon-cluster``; logs are kept in ``<state>/logs``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from tests.env.testenv import (
    _CHILDREN,
    BUILD_SCRIPT,
    HOST,
    SERVICE_CIDR,
    TestEnv,
    TestEnvError,
    _openssl,
    _pid_alive,
    _reap,
    _tail,
    _write_private,
    free_port,
    pid_matches,
    terminate_pid,
)

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "falco-talon"
VALUES = ROOT / "examples" / "cluster-values.yaml"
# falco-talon's pods (not the bundled NATS server's, which share the release's instance label)
TALON_SELECTOR = "app.kubernetes.io/name=falco-talon,app.kubernetes.io/instance=falco-talon"

NODE_NAME = "talon-node"
BRIDGE = "talon0"
POD_CIDR = "10.244.0.0/24"
NODE_IP = "10.244.0.1"
CGROUP_ROOT = "/falco-talon-cluster"
SANDBOX_IMAGE = "registry.k8s.io/pause:3.10.1"
TALON_IMAGE = "docker.io/falcosecurity/falco-talon-py:0.1.0"
DEMO_IMAGE = "docker.io/falcosecurity/falco-talon-demo:bookworm"


def _chart_nats_image() -> str:
    """The image the chart's bundled NATS runs by default (what ``make image-nats`` builds)."""
    image = yaml.safe_load((CHART / "values.yaml").read_text())["nats"]["deploy"]["image"]
    return f"docker.io/{image['repository']}:{image['tag']}"


NATS_IMAGE = _chart_nats_image()
TALON_NAMESPACE = "falco-talon"
RELEASE = "falco-talon"
# The PersistentVolume the bundled NATS server's claim binds (a directory of the state dir;
# its class and size are those of examples/cluster-values.yaml), owned by the server's user.
NATS_VOLUME = "talon-nats-data"
NATS_UID = 65532
DEMO_NAMESPACE = "demo"
CTR_NAMESPACE = "k8s.io"
RUN_CONTAINERD = Path("/run/containerd")
# the kernel settings the kubelet changes at startup (setupKernelTunables)
KUBELET_SYSCTLS = (
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
)
IPTABLES = ("iptables", "ip6tables")
IPT_TABLES = ("filter", "nat", "mangle", "raw")
OWNED_CHAIN = re.compile(r"^(KUBE-|CNI-)")

# the components started after the control plane, in start order (stopped in reverse)
CONTAINERD = "containerd"
KUBELET = "kubelet"
SCHEDULER = "kube-scheduler"
CONTROLLER_MANAGER = "kube-controller-manager"
PROXY = "kube-proxy"
COMPONENTS = (CONTAINERD, KUBELET, SCHEDULER, CONTROLLER_MANAGER, PROXY)


class ClusterError(TestEnvError):
    """The cluster could not be built, started or stopped."""


def default_state_dir() -> Path:
    explicit = os.environ.get("FALCO_TALON_CLUSTER_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_RUNTIME_DIR") or "/tmp") / "falco-talon-cluster"


def _log(msg: str) -> None:
    print(f"[cluster] {msg}", file=sys.stderr, flush=True)


def _run(
    args: Sequence[str], *, check: bool = True, timeout: float = 600, **kw: Any
) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        list(args), capture_output=True, text=True, check=False, timeout=timeout, **kw
    )
    if check and res.returncode != 0:
        raise ClusterError(
            f"{shlex.join(args)} failed (exit {res.returncode}):\n{res.stderr[-3000:]}"
        )
    return res


def build(target: str) -> Path:
    """``tests/env/build.sh <target>``'s bin directory (builds on first use)."""
    res = subprocess.run(
        ["bash", str(BUILD_SCRIPT), target], stdout=subprocess.PIPE, text=True, check=False
    )
    lines = res.stdout.strip().splitlines()
    if res.returncode != 0 or not lines:
        raise ClusterError(f"{BUILD_SCRIPT} {target} failed (exit {res.returncode})")
    return Path(lines[-1])


def image_archive(target: str, env_var: str) -> Path:
    """The OCI archive of ``make <target>`` (last line of its output), or ``$env_var``."""
    explicit = os.environ.get(env_var)
    if explicit:
        return Path(explicit)
    res = subprocess.run(
        ["make", "-s", "--no-print-directory", target],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        check=False,
    )
    lines = res.stdout.strip().splitlines()
    if res.returncode != 0 or not lines or not Path(lines[-1]).is_file():
        raise ClusterError(
            f"`make {target}` failed (exit {res.returncode}) or printed no archive path "
            f"(set {env_var}=<oci archive> to use another one)"
        )
    return Path(lines[-1])


def derive_pause_archive(src: Path, dst: Path, ref: str) -> None:
    """Write to ``dst`` an OCI archive of the image in ``src`` with ``sleep infinity`` as its
    entrypoint, named ``ref``: the pod sandbox image (same layers, a new config)."""

    def blob_name(digest: str) -> str:
        algo, _, hexa = digest.partition(":")
        return f"blobs/{algo}/{hexa}"

    with tarfile.open(src) as t:
        members = {m.name.removeprefix("./"): m for m in t.getmembers()}

        def read(name: str) -> bytes:
            f = t.extractfile(members[name])
            if f is None:
                raise ClusterError(f"{src}: {name} is not a file")
            return f.read()

        if "index.json" not in members:
            raise ClusterError(f"{src} is not an OCI archive (no index.json)")
        desc = json.loads(read("index.json"))["manifests"][0]
        manifest = json.loads(read(blob_name(desc["digest"])))
        if "manifests" in manifest:  # an image index: take the linux/amd64 one (or the first)
            chosen = manifest["manifests"][0]
            for m in manifest["manifests"]:
                if m.get("platform", {}).get("architecture") in ("amd64", None):
                    chosen = m
                    break
            desc = chosen
            manifest = json.loads(read(blob_name(desc["digest"])))
        config = json.loads(read(blob_name(manifest["config"]["digest"])))
        cfg = config.setdefault("config", {})
        cfg["Entrypoint"] = ["sleep", "infinity"]
        cfg["Cmd"] = None
        cfg.pop("User", None)
        cfg.pop("Healthcheck", None)
        new_blobs: dict[str, bytes] = {}

        def add(data: bytes) -> dict[str, Any]:
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            new_blobs[blob_name(digest)] = data
            return {"digest": digest, "size": len(data)}

        manifest["config"] = {**manifest["config"], **add(json.dumps(config).encode())}
        manifest.pop("annotations", None)
        mdesc = add(json.dumps(manifest).encode())
        index = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {
                    "mediaType": manifest.get(
                        "mediaType", "application/vnd.oci.image.manifest.v1+json"
                    ),
                    **mdesc,
                    "annotations": {
                        "io.containerd.image.name": ref,
                        "org.opencontainers.image.ref.name": ref,
                    },
                }
            ],
        }
        with tarfile.open(dst, "w") as out:

            def put(name: str, data: bytes) -> None:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mtime = 0
                out.addfile(info, io.BytesIO(data))

            put("oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
            put("index.json", json.dumps(index).encode())
            for layer in manifest["layers"]:
                name = blob_name(layer["digest"])
                f = t.extractfile(members[name])
                out.addfile(members[name], f)
            for name, data in new_blobs.items():
                put(name, data)


# --------------------------------------------------------------------------
# the control plane: TestEnv, made fit for a cluster with a node


class ClusterControlPlane(TestEnv):
    """etcd + kube-apiserver from :class:`TestEnv`, with what a real node needs."""

    def __init__(self, state_dir: Path, pki: Path, **kw: Any) -> None:
        super().__init__(state_dir, **kw)
        self.extra_pki = pki

    def _apiserver_args(self, state: dict[str, Any]) -> list[str]:
        dropped = (
            "--disable-admission-plugins=",
            "--endpoint-reconciler-type=",
            "--authorization-mode=",
            "--bind-address=",
            "--advertise-address=",
        )
        args = [a for a in super()._apiserver_args(state) if not a.startswith(dropped)]
        pki = self.extra_pki
        return [
            *args,
            # all interfaces (_guard_port drops what does not come through lo or the bridge):
            # 127.0.0.1 for the host, NODE_IP (the bridge) for the pods, which
            # reach it through the `kubernetes` Service; its endpoints are NODE_IP:port
            "--bind-address=0.0.0.0",
            f"--advertise-address={NODE_IP}",
            "--endpoint-reconciler-type=lease",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
            f"--kubelet-certificate-authority={self.certs_dir / 'ca.crt'}",
            "--kubelet-preferred-address-types=InternalIP",
        ]

    def _start_apiserver(self, state: dict[str, Any]) -> None:
        # The CA is made fresh by start(): sign the component certificates with it now.
        if not (self.extra_pki / "apiserver-kubelet-client.crt").exists() or (
            (self.extra_pki / "ca.crt").read_bytes() != (self.certs_dir / "ca.crt").read_bytes()
            if (self.extra_pki / "ca.crt").exists()
            else True
        ):
            make_component_certs(self.certs_dir, self.extra_pki)
        _guard_port(int(state["apiserver_port"]))
        super()._start_apiserver(state)


# (file stem, CN, O, SANs or None for a client certificate)
COMPONENT_CERTS: tuple[tuple[str, str, str, tuple[str, ...] | None], ...] = (
    ("apiserver-kubelet-client", "kube-apiserver-kubelet-client", "system:masters", None),
    ("kubelet-client", f"system:node:{NODE_NAME}", "system:nodes", None),
    ("kubelet-serving", f"system:node:{NODE_NAME}", "system:nodes",
     (f"IP:{NODE_IP}", f"DNS:{NODE_NAME}")),
    ("kube-scheduler", "system:kube-scheduler", "", None),
    ("kube-controller-manager", "system:kube-controller-manager", "", None),
    ("kube-proxy", "system:kube-proxy", "", None),
)  # fmt: skip


def make_component_certs(ca_dir: Path, out: Path) -> None:
    """Client (and kubelet serving) certificates signed by the control plane's CA."""
    out.mkdir(parents=True, exist_ok=True)
    for stem, cn, org, sans in COMPONENT_CERTS:
        subj = f"/CN={cn}" + (f"/O={org}" if org else "")
        _openssl(
            "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{stem}.key", "-out", f"{stem}.csr", "-subj", subj,
            cwd=out,
        )  # fmt: skip
        usage = "serverAuth" if sans else "clientAuth"
        ext = (
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            f"extendedKeyUsage={usage}\n"
        )
        if sans:
            ext += f"subjectAltName={','.join(sans)}\n"
        (out / f"{stem}.ext").write_text(ext)
        _openssl(
            "x509", "-req", "-in", f"{stem}.csr", "-CA", str(ca_dir / "ca.crt"),
            "-CAkey", str(ca_dir / "ca.key"), "-CAcreateserial", "-CAserial", "ca.srl",
            "-out", f"{stem}.crt", "-days", "3650", "-extfile", f"{stem}.ext",
            cwd=out,
        )  # fmt: skip
        os.chmod(out / f"{stem}.key", 0o600)
        (out / f"{stem}.csr").unlink()
        (out / f"{stem}.ext").unlink()
    shutil.copyfile(ca_dir / "ca.crt", out / "ca.crt")


# --------------------------------------------------------------------------
# the cluster


class Cluster:
    """Bring up, check and tear down the single-node cluster recorded in one state dir."""

    def __init__(
        self, state_dir: str | os.PathLike[str] | None = None, *, timeout: float = 300.0
    ) -> None:
        self.state_dir = Path(state_dir or default_state_dir()).absolute()
        self.timeout = timeout
        self.control_plane = ClusterControlPlane(
            self.state_dir / "control-plane", self.state_dir / "pki", startup_timeout=120
        )

    # ---- paths
    @property
    def state_file(self) -> Path:
        return self.state_dir / "cluster.json"

    @property
    def env_file(self) -> Path:
        return self.state_dir / "env"

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    @property
    def pki(self) -> Path:
        return self.state_dir / "pki"

    @property
    def containerd_dir(self) -> Path:
        return self.state_dir / "containerd"

    @property
    def containerd_sock(self) -> Path:
        return self.containerd_dir / "containerd.sock"

    @property
    def kubelet_dir(self) -> Path:
        return self.state_dir / "kubelet"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.control_plane.kubeconfig_path

    # ---- locking and state
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.state_dir / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def load_state(self) -> dict[str, Any]:
        try:
            data = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _save_state(self, state: dict[str, Any]) -> None:
        _write_private(self.state_file, json.dumps(state, indent=2) + "\n")
        for name in COMPONENTS:
            pid = int(state.get("pids", {}).get(name) or 0)
            path = self.state_dir / f"{name}.pid"
            if pid:
                path.write_text(f"{pid}\n")
            else:
                path.unlink(missing_ok=True)

    # ---- processes
    def _spawn(self, state: dict[str, Any], name: str, binary: Path, args: list[str]) -> int:
        self.logs.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["PATH"] = (
            f"{binary.parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        )
        env.pop("KUBECONFIG", None)
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        with log:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
            log.write(f"\n==== {stamp} {binary} {shlex.join(args)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                [str(binary), *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.state_dir,
                env=env,
                start_new_session=True,
                close_fds=True,
            )
        _CHILDREN[proc.pid] = proc
        state.setdefault("pids", {})[name] = proc.pid
        self._save_state(state)
        return proc.pid

    def _wait(self, what: str, name: str, pid: int, check: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            with contextlib.suppress(Exception):
                if check():
                    return
            if pid:
                _reap(pid)
                if not _pid_alive(pid):
                    raise ClusterError(
                        f"{what} exited during startup; last lines of its log:\n"
                        + _tail(self.logs / f"{name}.log")
                    )
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"{what} not ready after {self.timeout:.0f}s; last lines of its log:\n"
                    + _tail(self.logs / f"{name}.log")
                )
            time.sleep(0.3)

    def _alive(self, state: dict[str, Any], name: str) -> bool:
        pid = int(state.get("pids", {}).get(name) or 0)
        return pid_matches(pid, name, str(self.state_dir))

    def _stop(self, state: dict[str, Any], name: str, timeout: float = 20.0) -> None:
        pid = int(state.get("pids", {}).get(name) or 0)
        if pid and terminate_pid(pid, name, str(self.state_dir), timeout):
            _log(f"stopped {name} (pid {pid})")
        if pid:
            _reap(pid)
        state.setdefault("pids", {})[name] = 0
        if self.state_file.exists():
            self._save_state(state)

    # ---- health
    @staticmethod
    def _http_ok(url: str, timeout: float = 2.0) -> bool:
        ctx = None
        if url.startswith("https:"):
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        try:
            with urllib.request.urlopen(url, timeout=timeout, context=ctx) as resp:
                return int(resp.status) == 200
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def _health_urls(self, state: dict[str, Any]) -> dict[str, str]:
        ports = state.get("ports", {})
        return {
            KUBELET: f"http://{HOST}:{ports.get('kubelet_healthz')}/healthz",
            SCHEDULER: f"https://{HOST}:{ports.get('scheduler')}/healthz",
            CONTROLLER_MANAGER: f"https://{HOST}:{ports.get('controller_manager')}/healthz",
            PROXY: f"http://{HOST}:{ports.get('proxy_healthz')}/livez",
        }

    def _containerd_ok(self, state: dict[str, Any]) -> bool:
        res = _run([*self.ctr(state), "version"], check=False, timeout=10)
        return res.returncode == 0

    def is_healthy(self) -> bool:
        state = self.load_state()
        if not state.get("ready") or not self.control_plane.is_healthy():
            return False
        if not all(self._alive(state, n) for n in COMPONENTS):
            return False
        if not self._containerd_ok(state):
            return False
        return all(self._http_ok(u) for u in self._health_urls(state).values())

    def ctr(self, state: dict[str, Any] | None = None) -> list[str]:
        """The ``ctr`` command line for this cluster's containerd, namespace ``k8s.io``."""
        state = state if state is not None else self.load_state()
        binary = Path(state.get("bins", {}).get(CONTAINERD, "")) / "ctr"
        return [str(binary), "--address", str(self.containerd_sock), "-n", CTR_NAMESPACE]

    # ---- up
    def up(self, *, install: bool = True) -> Path:
        """Start everything (or reuse a healthy cluster); return the env file."""
        with self._locked():
            if self.is_healthy():
                _log("already up")
                current = self.load_state()
                url = current.get("talon_url")
                if install and not (
                    current.get("installed") and url and self._http_ok(f"{url}/healthz")
                ):
                    self._install(current)
                return self.env_file
            if self.load_state() or self.control_plane._load_state():
                _log(f"cleaning up a stale cluster in {self.state_dir}")
                self._down()
            t0 = time.monotonic()
            state: dict[str, Any] = {"bins": {}, "pids": {}, "ports": {}}
            self._save_state(state)
            try:
                self._up(state, install)
            except BaseException:
                _log("bring-up failed; logs in " + str(self.logs))
                raise
            _log(f"up in {time.monotonic() - t0:.1f}s")
            return self.env_file

    def _up(self, state: dict[str, Any], install: bool) -> None:
        bins = state["bins"]
        for target, name in (
            ("k8s", "control-plane"),
            ("node", "node"),
            ("containerd", CONTAINERD),
            ("cni", "cni"),
            ("helm", "helm"),
        ):
            bins[name] = str(build(target))
        # runc, iptables, conntrack...: Debian packages, from the project's one place for them.
        _run(["bash", str(ROOT / ".ci" / "system-packages.sh"), "cluster"])
        runc = shutil.which("runc") or "/usr/sbin/runc"
        state["runc"] = runc
        self._save_state(state)
        t = time.monotonic()
        archives = {
            "talon": image_archive("image", "FALCO_TALON_IMAGE_ARCHIVE"),
            "demo": image_archive("image-demo", "FALCO_TALON_DEMO_IMAGE_ARCHIVE"),
            "nats": image_archive("image-nats", "FALCO_TALON_NATS_IMAGE_ARCHIVE"),
        }
        # keep them: a concurrent `make image` may delete the archives it replaces
        kept = self.state_dir / "images"
        kept.mkdir(exist_ok=True)
        for key, src in list(archives.items()):
            dst = kept / f"{key}.oci.tar"
            dst.unlink(missing_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
            archives[key] = dst
        _log(f"images ready in {time.monotonic() - t:.1f}s")

        # network first: the apiserver advertises NODE_IP, the bridge's address
        state["iptables_before"] = _owned_chains()
        # containerd's shims put their sockets in /run/containerd/s whatever the config says
        state["run_containerd_existed"] = RUN_CONTAINERD.exists()
        self._save_state(state)
        _setup_bridge()
        state["bridge"] = BRIDGE
        self._save_state(state)

        t = time.monotonic()
        self.control_plane._bin_dir = Path(bins["control-plane"])
        info = self.control_plane.start()
        state["apiserver_url"] = info.server_url
        self._save_state(state)
        _log(f"control plane up in {time.monotonic() - t:.1f}s: {info.server_url}")

        self._write_kubeconfigs(info.server_url)
        self._start_containerd(state)
        t = time.monotonic()
        pause = kept / "pause.tar"
        derive_pause_archive(archives["demo"], pause, SANDBOX_IMAGE)
        for archive in (pause, archives["demo"], archives["talon"], archives["nats"]):
            _run([*self.ctr(state), "images", "import", str(archive)])
        _log(f"images imported in {time.monotonic() - t:.1f}s")
        self._start_kubelet(state)
        self._start_scheduler(state)
        self._start_controller_manager(state)
        self._start_proxy(state)
        self._wait_node_ready(state)
        state["ready"] = True
        self._save_state(state)
        self._write_env(state)
        if install:
            self._install(state)

    def _write_kubeconfigs(self, server: str) -> None:
        ca = base64.b64encode((self.pki / "ca.crt").read_bytes()).decode()
        for stem, user in (
            ("kubelet-client", f"system:node:{NODE_NAME}"),
            (SCHEDULER, SCHEDULER),
            (CONTROLLER_MANAGER, CONTROLLER_MANAGER),
            (PROXY, PROXY),
        ):
            crt = base64.b64encode((self.pki / f"{stem}.crt").read_bytes()).decode()
            key = base64.b64encode((self.pki / f"{stem}.key").read_bytes()).decode()
            _write_private(
                self.pki / f"{stem}.kubeconfig",
                f"""apiVersion: v1
kind: Config
clusters:
- name: local
  cluster: {{server: "{server}", certificate-authority-data: {ca}}}
users:
- name: {user}
  user: {{client-certificate-data: {crt}, client-key-data: {key}}}
contexts:
- name: local
  context: {{cluster: local, user: {user}}}
current-context: local
""",
            )

    def _start_containerd(self, state: dict[str, Any]) -> None:
        d = self.containerd_dir
        cni = Path(state["bins"]["cni"])
        netd = self.state_dir / "cni" / "net.d"
        netd.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "cni" / "ipam").mkdir(parents=True, exist_ok=True)
        (netd / "10-talon.conflist").write_text(
            json.dumps(
                {
                    "cniVersion": "1.0.0",
                    "name": "talon",
                    "plugins": [
                        {
                            "type": "bridge",
                            "bridge": BRIDGE,
                            "isGateway": True,
                            "ipMasq": False,
                            "hairpinMode": True,
                            "ipam": {
                                "type": "host-local",
                                "dataDir": str(self.state_dir / "cni" / "ipam"),
                                "ranges": [[{"subnet": POD_CIDR, "gateway": NODE_IP}]],
                                "routes": [{"dst": "0.0.0.0/0"}],
                            },
                        },
                        {"type": "portmap", "capabilities": {"portMappings": True}},
                    ],
                },
                indent=2,
            )
        )
        d.mkdir(parents=True, exist_ok=True)
        config = d / "config.toml"
        config.write_text(
            f"""# generated by tests/env/cluster.py
version = 3
root = "{d / "root"}"
state = "{d / "state"}"
temp = "{d / "tmp"}"
disabled_plugins = [
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.blockfile",
  "io.containerd.snapshotter.v1.erofs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
  "io.containerd.nri.v1.nri",
]

[grpc]
  address = "{self.containerd_sock}"

[ttrpc]
  address = "{self.containerd_sock}.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[plugins.'io.containerd.grpc.v1.cri']
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[plugins.'io.containerd.cri.v1.runtime']
  enable_selinux = false
  netns_mounts_under_state_dir = true
  # root without CAP_SYS_RESOURCE: a sandbox's oom_score_adj of -998 makes runc init fail
  # ("can't get final child's PID from pipe: EOF"); keep scores >= containerd's own
  restrict_oom_score_adj = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = "{state["runc"]}"
        Root = "{d / "runc"}"
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["{cni}"]
    conf_dir = "{netd}"
    max_conf_num = 1

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "{SANDBOX_IMAGE}"
"""
        )
        binary = Path(state["bins"][CONTAINERD]) / "containerd"
        pid = self._spawn(state, CONTAINERD, binary, ["--config", str(config)])
        self._wait("containerd", CONTAINERD, pid, lambda: self._containerd_ok(state))

    def _start_kubelet(self, state: dict[str, Any]) -> None:
        d = self.kubelet_dir
        d.mkdir(parents=True, exist_ok=True)
        ports = state["ports"]
        ports["kubelet"] = free_port()
        ports["kubelet_healthz"] = free_port(exclude=[ports["kubelet"]])
        _make_cgroup_root()
        state["cgroup_root"] = CGROUP_ROOT
        # the kubelet sets these (it cannot be told not to): put them back on `down`
        state["sysctls_before"] = {
            k: Path(f"/proc/sys/{k}").read_text().strip() for k in KUBELET_SYSCTLS
        }
        self._save_state(state)
        pki = self.pki
        config = d / "config.yaml"
        config.write_text(
            json.dumps(
                {
                    "apiVersion": "kubelet.config.k8s.io/v1beta1",
                    "kind": "KubeletConfiguration",
                    "address": NODE_IP,
                    "port": ports["kubelet"],
                    "readOnlyPort": 0,
                    "healthzBindAddress": HOST,
                    "healthzPort": ports["kubelet_healthz"],
                    "tlsCertFile": str(pki / "kubelet-serving.crt"),
                    "tlsPrivateKeyFile": str(pki / "kubelet-serving.key"),
                    "authentication": {
                        "anonymous": {"enabled": False},
                        "webhook": {"enabled": True},
                        "x509": {"clientCAFile": str(pki / "ca.crt")},
                    },
                    "authorization": {"mode": "Webhook"},
                    "cgroupDriver": "cgroupfs",
                    "cgroupRoot": CGROUP_ROOT,
                    "cgroupsPerQOS": True,
                    "failCgroupV1": False,
                    "failSwapOn": False,
                    "containerRuntimeEndpoint": f"unix://{self.containerd_sock}",
                    "imageGCHighThresholdPercent": 100,
                    "imageGCLowThresholdPercent": 99,
                    "evictionHard": {
                        "memory.available": "100Mi",
                        "nodefs.available": "1%",
                        "nodefs.inodesFree": "1%",
                        "imagefs.available": "1%",
                    },
                    "podLogsDir": str(d / "pod-logs"),
                    "volumePluginDir": str(d / "volume-plugins"),
                    "resolvConf": "/etc/resolv.conf",
                    "serializeImagePulls": False,
                    "rotateCertificates": False,
                    "serverTLSBootstrap": False,
                    "shutdownGracePeriod": "0s",
                    "maxPods": 50,
                    "clusterDomain": "cluster.local",
                    "nodeStatusReportFrequency": "10s",
                    "fileCheckFrequency": "5s",
                    "syncFrequency": "10s",
                },
                indent=2,
            )
        )
        binary = Path(state["bins"]["node"]) / KUBELET
        pid = self._spawn(
            state,
            KUBELET,
            binary,
            [
                f"--config={config}",
                f"--kubeconfig={pki / 'kubelet-client.kubeconfig'}",
                f"--root-dir={d / 'root'}",
                f"--cert-dir={d / 'pki'}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={NODE_IP}",
                "--v=1",
            ],
        )
        self._wait(
            "kubelet", KUBELET, pid, lambda: self._http_ok(self._health_urls(state)[KUBELET])
        )

    def _start_scheduler(self, state: dict[str, Any]) -> None:
        state["ports"]["scheduler"] = port = free_port()
        kubeconfig = self.pki / f"{SCHEDULER}.kubeconfig"
        pid = self._spawn(
            state,
            SCHEDULER,
            Path(state["bins"]["node"]) / SCHEDULER,
            [
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--leader-elect=false",
                f"--bind-address={HOST}",
                f"--secure-port={port}",
                f"--cert-dir={self.state_dir / 'scheduler-certs'}",
            ],
        )
        self._wait(
            "kube-scheduler",
            SCHEDULER,
            pid,
            lambda: self._http_ok(self._health_urls(state)[SCHEDULER]),
        )

    def _start_controller_manager(self, state: dict[str, Any]) -> None:
        state["ports"]["controller_manager"] = port = free_port()
        kubeconfig = self.pki / f"{CONTROLLER_MANAGER}.kubeconfig"
        cp = self.control_plane.certs_dir
        pid = self._spawn(
            state,
            CONTROLLER_MANAGER,
            Path(state["bins"]["node"]) / CONTROLLER_MANAGER,
            [
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--leader-elect=false",
                f"--bind-address={HOST}",
                f"--secure-port={port}",
                f"--cert-dir={self.state_dir / 'controller-manager-certs'}",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={cp / 'sa.key'}",
                f"--root-ca-file={cp / 'ca.crt'}",
                f"--cluster-signing-cert-file={cp / 'ca.crt'}",
                f"--cluster-signing-key-file={cp / 'ca.key'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                f"--cluster-cidr={POD_CIDR}",
                "--allocate-node-cidrs=false",
                "--controllers=*",
                "--node-monitor-grace-period=40s",
            ],
        )
        self._wait(
            "kube-controller-manager",
            CONTROLLER_MANAGER,
            pid,
            lambda: self._http_ok(self._health_urls(state)[CONTROLLER_MANAGER]),
        )

    def _start_proxy(self, state: dict[str, Any]) -> None:
        ports = state["ports"]
        ports["proxy_healthz"] = free_port()
        ports["proxy_metrics"] = free_port(exclude=[ports["proxy_healthz"]])
        pid = self._spawn(
            state,
            PROXY,
            Path(state["bins"]["node"]) / PROXY,
            [
                f"--kubeconfig={self.pki / f'{PROXY}.kubeconfig'}",
                "--proxy-mode=iptables",
                f"--cluster-cidr={POD_CIDR}",
                f"--hostname-override={NODE_NAME}",
                f"--bind-address={HOST}",
                f"--healthz-bind-address={HOST}:{ports['proxy_healthz']}",
                f"--metrics-bind-address={HOST}:{ports['proxy_metrics']}",
                f"--nodeport-addresses={NODE_IP}/32",
                "--conntrack-max-per-core=0",
                "--conntrack-tcp-timeout-established=0s",
                "--conntrack-tcp-timeout-close-wait=0s",
                "--v=1",
            ],
        )
        self._wait("kube-proxy", PROXY, pid, lambda: self._http_ok(self._health_urls(state)[PROXY]))

    # ---- Kubernetes API helpers
    def api(self) -> Any:
        from kubernetes import client, config

        configuration = client.Configuration()
        config.load_kube_config(  # type: ignore[no-untyped-call]
            str(self.admin_kubeconfig), client_configuration=configuration
        )
        return client.ApiClient(configuration)

    def _poll(self, what: str, check: Callable[[], Any], timeout: float | None = None) -> Any:
        deadline = time.monotonic() + (timeout or self.timeout)
        last: BaseException | None = None
        while time.monotonic() < deadline:
            try:
                result = check()
            except Exception as e:
                last = e
                result = None
            if result:
                return result
            time.sleep(0.5)
        raise ClusterError(
            f"timed out waiting for {what}" + (f" (last error: {last})" if last else "")
        )

    def _wait_node_ready(self, state: dict[str, Any]) -> None:
        from kubernetes import client

        with self.api() as api:
            core: Any = client.CoreV1Api(api)

            def ready() -> bool:
                node = core.read_node(NODE_NAME)
                conds = {c.type: c.status for c in node.status.conditions or []}
                taints = [t.key for t in node.spec.taints or []]
                return conds.get("Ready") == "True" and not any(
                    "not-ready" in t or "uninitialized" in t for t in taints
                )

            t = time.monotonic()
            self._poll(f"node {NODE_NAME} Ready (see {self.logs}/kubelet.log)", ready)
            self._poll(
                "the default ServiceAccount (controller-manager)",
                lambda: core.read_namespaced_service_account("default", "default"),
            )
            _log(f"node {NODE_NAME} Ready in {time.monotonic() - t:.1f}s")

    # ---- chart and demo workloads
    def helm(self, state: dict[str, Any] | None = None) -> list[str]:
        state = state if state is not None else self.load_state()
        return [
            str(Path(state["bins"]["helm"]) / "helm"),
            "--kubeconfig",
            str(self.admin_kubeconfig),
        ]

    def helm_install(
        self, values: Sequence[Path] = (VALUES,), *, wait: bool = True, timeout: str = "5m"
    ) -> None:
        """``helm upgrade --install`` the chart into :data:`TALON_NAMESPACE`; with ``wait``,
        until the release is ready and every falco-talon replica has connected to NATS."""
        self._unstick_release()
        args = [
            *self.helm(),
            "upgrade",
            "--install",
            RELEASE,
            str(CHART),
            "--namespace",
            TALON_NAMESPACE,
            "--create-namespace",
        ]
        for v in values:
            args += ["-f", str(v)]
        if wait:
            args += ["--wait", "--timeout", timeout]
        _run(args, timeout=600)
        if wait:
            self.wait_talon_ready(self.talon_url())
        # a reinstalled Service gets another ClusterIP: keep TALON_URL in the env file current
        state = self.load_state()
        if state.get("installed"):
            url = self.talon_url()
            if url != state.get("talon_url"):
                state["talon_url"] = url
                self._save_state(state)
                self._write_env(state)

    def _unstick_release(self) -> None:
        """A helm killed mid-operation leaves the release ``pending-*`` and every later
        upgrade fails ("another operation ... is in progress"): undo that operation."""
        res = _run(
            [*self.helm(), "status", RELEASE, "-n", TALON_NAMESPACE, "-o", "json"], check=False
        )
        if res.returncode != 0:
            return
        status = json.loads(res.stdout).get("info", {}).get("status", "")
        if status == "pending-install":
            _log(f"release {RELEASE} stuck in {status}: uninstalling it")
            _run([*self.helm(), "uninstall", RELEASE, "-n", TALON_NAMESPACE, "--wait"])
        elif status.startswith("pending-"):
            _log(f"release {RELEASE} stuck in {status}: rolling back")
            _run([*self.helm(), "rollback", RELEASE, "-n", TALON_NAMESPACE, "--wait"])

    def _install(self, state: dict[str, Any]) -> None:
        t = time.monotonic()
        apply_demo(self)
        self.ensure_nats_volume()
        self.helm_install()  # waits for every replica to answer and to have connected to NATS
        state["talon_url"] = self.talon_url()
        wait_demo_ready(self)
        state["installed"] = True
        self._save_state(state)
        self._write_env(state)
        _log(f"chart and demo workloads ready in {time.monotonic() - t:.1f}s: {state['talon_url']}")

    def wait_talon_ready(self, url: str, timeout: float = 120) -> None:
        """falco-talon answers /healthz through its Service and every replica has connected
        to NATS (until then a replica answers events 503)."""
        from kubernetes import client

        self._poll(
            f"falco-talon answering at {url}/healthz",
            lambda: self._http_ok(f"{url}/healthz"),
            timeout=timeout,
        )
        with self.api() as api:
            core: Any = client.CoreV1Api(api)

            def connected() -> bool:
                pods = [
                    p
                    for p in core.list_namespaced_pod(
                        TALON_NAMESPACE, label_selector=TALON_SELECTOR
                    ).items
                    if p.metadata.deletion_timestamp is None
                ]
                return bool(pods) and all(
                    "NATS connected"
                    in core.read_namespaced_pod_log(p.metadata.name, TALON_NAMESPACE)
                    for p in pods
                )

            self._poll("every falco-talon replica connected to NATS", connected, timeout)

    def ensure_nats_volume(self) -> None:
        """The PersistentVolume the bundled NATS server's claim binds: a directory of the state
        dir (hostPath), owned by the server's user. Kept across ``helm uninstall`` (as the
        claim is); a volume released by a deleted claim is made available again."""
        from kubernetes import client

        persistence = yaml.safe_load(VALUES.read_text())["nats"]["deploy"]["persistence"]
        path = self.state_dir / "volumes" / NATS_VOLUME
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chown(path, NATS_UID, NATS_UID)
        pv = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": NATS_VOLUME},
            "spec": {
                "capacity": {"storage": persistence["size"]},
                "accessModes": ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": persistence["storageClassName"],
                "hostPath": {"path": str(path), "type": "Directory"},
            },
        }
        with self.api() as api:
            core: Any = client.CoreV1Api(api)
            try:
                current = core.read_persistent_volume(NATS_VOLUME)
            except client.ApiException as e:
                if e.status != 404:
                    raise
                core.create_persistent_volume(pv)
                return
            if current.status.phase == "Released":
                core.patch_persistent_volume(NATS_VOLUME, {"spec": {"claimRef": None}})

    def talon_url(self) -> str:
        from kubernetes import client

        with self.api() as api:
            svc: Any = client.CoreV1Api(api).read_namespaced_service(RELEASE, TALON_NAMESPACE)
            port = svc.spec.ports[0].port
            return f"http://{svc.spec.cluster_ip}:{port}"

    def _write_env(self, state: dict[str, Any]) -> None:
        values = {
            "KUBECONFIG": str(self.admin_kubeconfig),
            "TALON_URL": state.get("talon_url", ""),
            "CLUSTER_STATE_DIR": str(self.state_dir),
            "CLUSTER_NODE": NODE_NAME,
            "CONTAINERD_ADDRESS": str(self.containerd_sock),
            "CONTAINERD_NAMESPACE": CTR_NAMESPACE,
            "CTR": str(Path(state["bins"][CONTAINERD]) / "ctr"),
            "HELM": str(Path(state["bins"]["helm"]) / "helm"),
            "TALON_NAMESPACE": TALON_NAMESPACE,
            "TALON_RELEASE": RELEASE,
            "TESTENV_APISERVER_URL": state.get("apiserver_url", ""),
        }
        lines = [f"export {k}={shlex.quote(v)}" for k, v in values.items()]
        _write_private(
            self.env_file, "# generated by tests/env/cluster.py\n" + "\n".join(lines) + "\n"
        )

    # ---- down
    def down(self) -> None:
        with self._locked():
            self._down()

    def _down(self) -> None:
        state = self.load_state()
        state.setdefault("pids", {})
        t0 = time.monotonic()
        # 1. nothing recreates pods any more, then the kubelet stops every pod the way it
        #    always does (CRI StopPodSandbox: CNI DEL, netns and mounts released)
        for name in (CONTROLLER_MANAGER, SCHEDULER):
            self._stop(state, name)
        if self._alive(state, KUBELET) and self.control_plane.is_healthy():
            with contextlib.suppress(Exception):
                self._delete_all_pods(state)
        for name in (PROXY, KUBELET):
            self._stop(state, name)
        # 2. whatever is left in containerd: kill and remove by id
        if self._alive(state, CONTAINERD):
            self._ctr_cleanup(state)
        self._stop(state, CONTAINERD, timeout=30)
        self.control_plane.stop(force=True)
        # 3. what the processes leave on the host
        _unmount_under(self.state_dir)
        _remove_cgroup_root(state.get("cgroup_root"))
        for key, value in state.get("sysctls_before", {}).items():
            with contextlib.suppress(OSError):
                if Path(f"/proc/sys/{key}").read_text().strip() != value:
                    Path(f"/proc/sys/{key}").write_text(value)
                    _log(f"restored sysctl {key}={value}")
        _teardown_bridge()
        if "iptables_before" in state:  # never touch chains of a cluster we did not record
            _remove_owned_iptables(set(state["iptables_before"]))
        _remove_container_log_links(self.state_dir)
        if state.get("run_containerd_existed") is False:
            shutil.rmtree(RUN_CONTAINERD, ignore_errors=True)
        # 4. state, except the logs
        for child in list(self.state_dir.iterdir()) if self.state_dir.exists() else []:
            if child.name in ("logs", ".lock"):
                continue
            if child.name == "control-plane":
                for f in child.iterdir():
                    if not f.name.endswith(".log"):
                        _rm(f)
                continue
            _rm(child)
        _log(f"down in {time.monotonic() - t0:.1f}s (logs kept in {self.logs})")

    def _delete_all_pods(self, state: dict[str, Any]) -> None:
        from kubernetes import client

        with self.api() as api:
            core: Any = client.CoreV1Api(api)
            for pod in core.list_pod_for_all_namespaces().items:
                with contextlib.suppress(client.ApiException):
                    core.delete_namespaced_pod(
                        pod.metadata.name, pod.metadata.namespace, grace_period_seconds=0
                    )

        def no_tasks() -> bool:
            res = _run([*self.ctr(state), "tasks", "ls", "-q"], check=False, timeout=10)
            return res.returncode == 0 and not res.stdout.strip()

        with contextlib.suppress(ClusterError):
            self._poll("the kubelet to stop every pod", no_tasks, timeout=60)

    def _ctr_cleanup(self, state: dict[str, Any]) -> None:
        ctr = self.ctr(state)
        tasks = _run([*ctr, "tasks", "ls", "-q"], check=False).stdout.split()
        for task in tasks:
            _run([*ctr, "tasks", "kill", "-a", "-s", "SIGKILL", task], check=False)
        for task in tasks:
            for _ in range(50):
                if _run([*ctr, "tasks", "rm", "-f", task], check=False).returncode == 0:
                    break
                time.sleep(0.1)
        for c in _run([*ctr, "containers", "ls", "-q"], check=False).stdout.split():
            _run([*ctr, "containers", "rm", c], check=False)

    # ---- status
    def status(self) -> str:
        state = self.load_state()
        if not state:
            return "down"
        lines = [f"state: {self.state_dir}"]
        cp = self.control_plane.is_healthy()
        lines.append(
            f"control plane: {'ok' if cp else 'NOT healthy'} {state.get('apiserver_url', '')}"
        )
        urls = self._health_urls(state)
        for name in COMPONENTS:
            pid = int(state.get("pids", {}).get(name) or 0)
            alive = self._alive(state, name)
            ok = alive and (
                self._containerd_ok(state) if name == CONTAINERD else self._http_ok(urls[name])
            )
            lines.append(f"{name}: pid {pid} {'ok' if ok else 'NOT ok'}")
        lines.append(f"TALON_URL: {state.get('talon_url', '(chart not installed)')}")
        return "\n".join(lines)


# --------------------------------------------------------------------------
# demo workloads (namespace `demo`, the demo image)


def _demo_container() -> dict[str, Any]:
    return {
        "name": "app",
        "image": DEMO_IMAGE,
        "imagePullPolicy": "Never",
        # bash as PID 1 with a TERM trap: stops at once instead of after the grace period
        "command": ["/bin/bash", "-c", "trap 'exit 0' TERM; sleep infinity & wait"],
    }


def demo_manifests() -> list[dict[str, Any]]:
    """A Deployment, a DaemonSet, a StatefulSet (+ its headless Service) and a pod."""

    def template(labels: dict[str, str]) -> dict[str, Any]:
        return {
            "metadata": {"labels": labels},
            "spec": {"terminationGracePeriodSeconds": 5, "containers": [_demo_container()]},
        }

    web = {"app": "web"}
    agent = {"app": "node-agent"}
    db = {"app": "db"}
    return [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web", "labels": web},
            "spec": {"replicas": 2, "selector": {"matchLabels": web}, "template": template(web)},
        },
        {
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "metadata": {"name": "node-agent", "labels": agent},
            "spec": {"selector": {"matchLabels": agent}, "template": template(agent)},
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "db", "labels": db},
            "spec": {"clusterIP": "None", "selector": db, "ports": [{"port": 5432}]},
        },
        {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": {"name": "db", "labels": db},
            "spec": {
                "serviceName": "db",
                "replicas": 1,
                "selector": {"matchLabels": db},
                "template": template(db),
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "standalone", "labels": {"app": "standalone"}},
            "spec": {"terminationGracePeriodSeconds": 5, "containers": [_demo_container()]},
        },
    ]


def apply_demo(cluster: Cluster) -> None:
    from kubernetes import client

    with cluster.api() as api:
        core: Any = client.CoreV1Api(api)
        apps: Any = client.AppsV1Api(api)
        with contextlib.suppress(client.ApiException):
            core.create_namespace({"metadata": {"name": DEMO_NAMESPACE}})
        creators: dict[str, Callable[..., Any]] = {
            "Deployment": apps.create_namespaced_deployment,
            "DaemonSet": apps.create_namespaced_daemon_set,
            "StatefulSet": apps.create_namespaced_stateful_set,
            "Service": core.create_namespaced_service,
            "Pod": core.create_namespaced_pod,
        }
        for m in demo_manifests():
            try:
                creators[m["kind"]](DEMO_NAMESPACE, m)
            except client.ApiException as e:
                if e.status != 409:
                    raise


def wait_demo_ready(cluster: Cluster, timeout: float = 180) -> None:
    from kubernetes import client

    with cluster.api() as api:
        core: Any = client.CoreV1Api(api)

        def ready() -> bool:
            pods = core.list_namespaced_pod(DEMO_NAMESPACE).items
            running = [
                p
                for p in pods
                if p.metadata.deletion_timestamp is None
                and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
            ]
            return len(running) >= 5  # web x2, node-agent, db-0, standalone

        cluster._poll("the demo pods Ready", ready, timeout=timeout)


# --------------------------------------------------------------------------
# host plumbing: bridge, routes, iptables, mounts, cgroups


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run(["ip", *args], check=check)


def _setup_bridge() -> None:
    if _ip("link", "show", BRIDGE, check=False).returncode != 0:
        _ip("link", "add", BRIDGE, "type", "bridge")
    prefix = POD_CIDR.split("/")[1]
    if NODE_IP not in _ip("-o", "addr", "show", "dev", BRIDGE).stdout:
        _ip("addr", "add", f"{NODE_IP}/{prefix}", "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")
    # ClusterIPs are DNATed by kube-proxy; whatever is not stays on the bridge
    _ip("route", "replace", SERVICE_CIDR, "dev", BRIDGE, "src", NODE_IP)


def _teardown_bridge() -> None:
    _ip("route", "del", SERVICE_CIDR, "dev", BRIDGE, check=False)
    out = _ip("-o", "link", "show", "master", BRIDGE, check=False).stdout
    for line in out.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        _ip("link", "del", name, check=False)
    if _ip("link", "show", BRIDGE, check=False).returncode == 0:
        _ip("link", "del", BRIDGE, check=False)
        _log(f"removed bridge {BRIDGE}")


GUARD_CHAIN = "KUBE-TALON-GUARD"


def _guard_port(port: int) -> None:
    """kube-apiserver listens on all interfaces (127.0.0.1 for the host, the bridge for the
    pods): drop what reaches ``port`` through any other interface. ``down`` removes the chain
    with the other KUBE-* chains."""
    ipt = ["iptables", "-w"]
    if _run([*ipt, "-n", "-L", GUARD_CHAIN], check=False).returncode != 0:
        _run([*ipt, "-N", GUARD_CHAIN])
        _run([*ipt, "-A", GUARD_CHAIN, "-i", "lo", "-j", "RETURN"])
        _run([*ipt, "-A", GUARD_CHAIN, "-i", BRIDGE, "-j", "RETURN"])
        _run([*ipt, "-A", GUARD_CHAIN, "-j", "DROP"])
    rule = ["INPUT", "-p", "tcp", "--dport", str(port), "-j", GUARD_CHAIN]
    if _run([*ipt, "-C", *rule], check=False).returncode != 0:
        _run([*ipt, "-I", *rule])


def _owned_chains() -> list[str]:
    """``<binary>/<table>/<chain>`` of every KUBE-*/CNI-* chain present now."""
    found: list[str] = []
    for binary in IPTABLES:
        if not shutil.which(binary):
            continue
        for table in IPT_TABLES:
            res = _run([binary, "-w", "-t", table, "-S"], check=False)
            for line in res.stdout.splitlines():
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "-N" and OWNED_CHAIN.match(parts[1]):
                    found.append(f"{binary}/{table}/{parts[1]}")
    return found


def _remove_owned_iptables(before: set[str]) -> None:
    """Delete the KUBE-*/CNI-* chains that were not there before ``up`` and every rule that
    jumps to them (or mentions the bridge / pod CIDR)."""
    ours = [c for c in _owned_chains() if c not in before]
    by_table: dict[tuple[str, str], set[str]] = {}
    for c in ours:
        binary, table, chain = c.split("/")
        by_table.setdefault((binary, table), set()).add(chain)
    removed = 0
    for binary in IPTABLES:
        if not shutil.which(binary):
            continue
        for table in IPT_TABLES:
            chains = by_table.get((binary, table), set())
            res = _run([binary, "-w", "-t", table, "-S"], check=False)
            for line in res.stdout.splitlines():
                parts = shlex.split(line)
                if not parts or parts[0] != "-A" or parts[1] in chains:
                    continue
                target = ""
                for flag in ("-j", "-g"):
                    if flag in parts:
                        target = parts[parts.index(flag) + 1]
                if target in chains or BRIDGE in parts or POD_CIDR in parts:
                    _run([binary, "-w", "-t", table, "-D", *parts[1:]], check=False)
                    removed += 1
            for chain in chains:
                _run([binary, "-w", "-t", table, "-F", chain], check=False)
            for chain in chains:
                _run([binary, "-w", "-t", table, "-X", chain], check=False)
    if ours or removed:
        _log(f"removed {len(ours)} iptables chains and {removed} rules")


def _mounts_under(root: Path) -> list[str]:
    prefix = str(root).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mountpoint = line.split()[4].encode().decode("unicode_escape")
            if mountpoint.startswith(prefix):
                found.append(mountpoint)
    return found


def _unmount_under(root: Path) -> None:
    for _ in range(5):
        mounts = _mounts_under(root)
        if not mounts:
            return
        for m in sorted(mounts, key=len, reverse=True):
            if _run(["umount", m], check=False).returncode != 0:
                _run(["umount", "-l", m], check=False)
    left = _mounts_under(root)
    if left:
        _log(f"still mounted under {root}: {left}")


def _cgroup_hierarchies() -> list[Path]:
    base = Path("/sys/fs/cgroup")
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            mountpoint = parts[4]
            fstype = parts[parts.index("-") + 1]
            if fstype == "cgroup" and mountpoint.startswith(str(base) + "/"):
                found.append(Path(mountpoint))
    return found


def _make_cgroup_root() -> None:
    for h in _cgroup_hierarchies():
        d = h / CGROUP_ROOT.strip("/")
        d.mkdir(exist_ok=True)
        if h.name == "cpuset":  # an empty cpuset admits no task
            for f in ("cpuset.cpus", "cpuset.mems"):
                if not (d / f).read_text().strip():
                    (d / f).write_text((h / f).read_text())


def _remove_cgroup_root(root: str | None) -> None:
    if not root:
        return
    for h in _cgroup_hierarchies():
        top = h / root.strip("/")
        if not top.is_dir():
            continue
        dirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts))
        for d in [*reversed(dirs), top]:
            with contextlib.suppress(OSError):
                d.rmdir()


def _remove_container_log_links(root: Path) -> None:
    logs = Path("/var/log/containers")
    if not logs.is_dir():
        return
    for link in logs.iterdir():
        with contextlib.suppress(OSError):
            if link.is_symlink() and os.readlink(link).startswith(str(root)):
                link.unlink()


def _rm(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# --------------------------------------------------------------------------
# command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.env.cluster",
        description="A real single-node Kubernetes cluster running falco-talon.",
    )
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--state-dir", default=None, help=f"default: {default_state_dir()}")
    parser.add_argument("--timeout", type=float, default=300.0, help="per-step timeout (s)")
    parser.add_argument(
        "--no-install", action="store_true", help="up: skip the chart and demo workloads"
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("cluster: needs root (containers, bridge, iptables)", file=sys.stderr)
        return 1
    cluster = Cluster(args.state_dir, timeout=args.timeout)
    try:
        if args.command == "up":
            print(cluster.up(install=not args.no_install))
        elif args.command == "down":
            cluster.down()
        else:
            print(cluster.status())
            return 0 if cluster.is_healthy() else 1
    except TestEnvError as e:
        print(f"cluster: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main())
