"""A real, local Kubernetes control plane (etcd + kube-apiserver) for tests.

The binaries are built from the Go module proxy by ``tests/env/build.sh`` and
cached under ``${XDG_CACHE_HOME:-~/.cache}/falco-talon/testenv/`` (or taken
from ``$KUBEBUILDER_ASSETS`` when that holds ``kube-apiserver`` and ``etcd``).
This module only needs the Python standard library and the ``openssl`` CLI
(or, failing that, the ``cryptography`` package) to make certificates.

Command line (from the repository root)::

    python -m tests.env.testenv up       # build if needed, start, print env file
    python -m tests.env.testenv status
    python -m tests.env.testenv down
    python tests/env/testenv.py up --state-dir /tmp/my-env

``up`` writes into the state directory (``--state-dir``, else
``$FALCO_TALON_TESTENV_DIR``, else ``${XDG_RUNTIME_DIR:-/tmp}/falco-talon-testenv``):
``kubeconfig`` (admin, CA embedded), ``env`` (``source`` it: ``KUBECONFIG``,
``TESTENV_APISERVER_URL``, ``TESTENV_TOKEN``, ``TESTENV_CA``, the pids...),
``state.json``, pid files and logs. ``up`` on a healthy environment only
prints the env file path.

Library use, e.g. from a pytest session fixture::

    env = TestEnv()
    info = env.start()          # TestEnvInfo(kubeconfig=..., server_url=..., token=...)
    env.stop_apiserver()        # simulate an API outage ...
    env.start_apiserver()       # ... and recovery (same port, same etcd)
    env.stop()

If ``start()`` finds an environment already running in the state directory
(e.g. from ``up``), it reuses it and ``stop()`` leaves it running (unless
``stop(force=True)``), so a developer can keep one running across test runs.

What this control plane is NOT: there is no kube-controller-manager, scheduler
or kubelet. So the ServiceAccount admission plugin is disabled (no default
ServiceAccount is ever created), ReplicaSets/Deployments/Jobs create no pods,
garbage collection and namespace deletion never finish, a pod stays Pending
unless its ``spec.nodeName`` is set, and its status only changes when written
through the ``pods/status`` subresource. A pod without ``spec.nodeName`` (or
in phase Succeeded/Failed) is deleted at once; a bound pod is only marked
terminating unless deleted with ``gracePeriodSeconds=0``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import fcntl
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "build.sh"
HOST = "127.0.0.1"
SERVICE_CIDR = "10.0.0.0/24"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
ADMIN_USER = "testenv-admin"
ADMIN_GROUP = "system:masters"
CLUSTER_NAME = "falco-talon-testenv"


class TestEnvError(RuntimeError):
    """The test control plane could not be built, started or stopped."""

    __test__ = False  # not a pytest test class


def default_state_dir() -> Path:
    """``$FALCO_TALON_TESTENV_DIR`` or ``${XDG_RUNTIME_DIR:-/tmp}/falco-talon-testenv``."""
    explicit = os.environ.get("FALCO_TALON_TESTENV_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_RUNTIME_DIR") or "/tmp") / "falco-talon-testenv"


@dataclasses.dataclass(frozen=True)
class TestEnvInfo:
    """How to reach a running test control plane."""

    __test__ = False  # not a pytest test class

    state_dir: Path
    kubeconfig: Path
    env_file: Path
    server_url: str
    token: str
    ca_path: Path
    etcd_url: str
    etcd_pid: int
    apiserver_pid: int
    bin_dir: Path
    reused: bool = False

    def env_vars(self) -> dict[str, str]:
        """The variables also written to the ``env`` file."""
        return {
            "KUBECONFIG": str(self.kubeconfig),
            "TESTENV_APISERVER_URL": self.server_url,
            "TESTENV_TOKEN": self.token,
            "TESTENV_CA": str(self.ca_path),
            "TESTENV_ETCD_URL": self.etcd_url,
            "TESTENV_ETCD_PID": str(self.etcd_pid),
            "TESTENV_APISERVER_PID": str(self.apiserver_pid),
            "TESTENV_STATE_DIR": str(self.state_dir),
        }


# --------------------------------------------------------------------------
# small helpers


def _log(msg: str) -> None:
    print(f"[testenv] {msg}", file=sys.stderr, flush=True)


def free_port(host: str = HOST, exclude: Sequence[int] = ()) -> int:
    """A TCP port on ``host`` that was free a moment ago."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in exclude:
            return port
    raise TestEnvError("could not find a free port")


def _port_free(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def _write_private(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600, atomically."""
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():  # a zombie nobody reaped yet is as good as dead
        with contextlib.suppress(OSError, IndexError):
            if stat.read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                return False
    return True


def _pid_cmdline(pid: int) -> list[str] | None:
    proc = Path(f"/proc/{pid}/cmdline")
    if proc.parent.exists():
        try:
            return [a for a in proc.read_bytes().decode(errors="replace").split("\0") if a]
        except OSError:
            return None
    try:  # no procfs (macOS): ask ps
        out = subprocess.run(
            ["ps", "-p", str(pid), "-o", "args="], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        return None
    return out.split() if out else None


def pid_matches(pid: int, binary: str, marker: str) -> bool:
    """True if ``pid`` runs a binary named ``binary`` with ``marker`` in its arguments.

    ``marker`` is the state directory, so a recycled pid or another user's
    kube-apiserver is never mistaken for ours.
    """
    if not _pid_alive(pid):
        return False
    argv = _pid_cmdline(pid)
    if not argv:
        return False
    name = os.path.basename(argv[0])
    with contextlib.suppress(OSError):
        name = os.path.basename(os.readlink(f"/proc/{pid}/exe")).removesuffix(" (deleted)")
    return name == binary and any(marker in a for a in argv[1:])


def terminate_pid(pid: int, binary: str, marker: str, timeout: float = 15.0) -> bool:
    """SIGTERM ``pid`` if it is ours, SIGKILL after ``timeout``. True if it was ours."""
    if not pid_matches(pid, binary, marker):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pid)
        if not _pid_alive(pid):
            return True
        time.sleep(0.05)
    _log(f"{binary} (pid {pid}) ignored SIGTERM for {timeout:.0f}s; sending SIGKILL")
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        _reap(pid)
        if not _pid_alive(pid):
            return True
        time.sleep(0.05)
    raise TestEnvError(f"{binary} (pid {pid}) survived SIGKILL")


# Processes this interpreter started, so that they are reaped through their
# Popen object (no zombie, no "subprocess still running" ResourceWarning).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _reap(pid: int) -> None:
    """Collect ``pid`` if it is our child (no-op otherwise)."""
    proc = _CHILDREN.get(pid)
    if proc is not None:
        if proc.poll() is not None:
            del _CHILDREN[pid]
        return
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


# --------------------------------------------------------------------------
# certificates


def _openssl(*args: str, cwd: Path) -> None:
    res = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise TestEnvError(f"openssl {' '.join(args)} failed:\n{res.stderr}")


def _certs_openssl(d: Path, sans: Sequence[str]) -> None:
    days = "3650"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", days,
        "-subj", f"/CN={CLUSTER_NAME}-ca",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )  # fmt: skip
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=kube-apiserver",
        cwd=d,
    )  # fmt: skip
    (d / "server.ext").write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        f"subjectAltName={','.join(sans)}\n"
    )
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.crt", "-days", days, "-extfile", "server.ext",
        cwd=d,
    )  # fmt: skip
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=d)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=d)
    for junk in ("server.csr", "server.ext", "ca.srl"):
        (d / junk).unlink(missing_ok=True)


def _certs_cryptography(d: Path, sans: Sequence[str]) -> None:  # pragma: no cover - fallback
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def pem_key(key: Any) -> bytes:
        return key.private_bytes(  # type: ignore[no-any-return]
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )

    now = datetime.datetime.now(datetime.UTC)
    later = now + datetime.timedelta(days=3650)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{CLUSTER_NAME}-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(later)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    alt: list[x509.GeneralName] = []
    for san in sans:
        kind, _, value = san.partition(":")
        alt.append(
            x509.IPAddress(ipaddress.ip_address(value)) if kind == "IP" else x509.DNSName(value)
        )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(later)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _write_private(d / "ca.key", pem_key(ca_key))
    (d / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    _write_private(d / "server.key", pem_key(key))
    (d / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(d / "sa.key", pem_key(sa_key))
    (d / "sa.pub").write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def make_certs(d: Path) -> None:
    """CA, kube-apiserver serving certificate and service-account key pair in ``d``."""
    d.mkdir(parents=True, exist_ok=True)
    sans = [
        f"IP:{HOST}",
        "IP:10.0.0.1",  # first address of SERVICE_CIDR: the `kubernetes` Service
        "DNS:localhost",
        "DNS:kubernetes",
        "DNS:kubernetes.default",
        "DNS:kubernetes.default.svc",
        "DNS:kubernetes.default.svc.cluster.local",
    ]
    if shutil.which("openssl") and not os.environ.get("FALCO_TALON_TESTENV_NO_OPENSSL"):
        _certs_openssl(d, sans)
        return
    try:
        _certs_cryptography(d, sans)
    except ImportError as e:
        raise TestEnvError(
            "need the `openssl` CLI or the `cryptography` Python package to make certificates"
        ) from e


# --------------------------------------------------------------------------
# the environment


class TestEnv:
    """Start, stop and restart etcd + kube-apiserver recorded in one state directory."""

    __test__ = False  # not a pytest test class

    ETCD = "etcd"
    APISERVER = "kube-apiserver"

    def __init__(
        self,
        state_dir: str | os.PathLike[str] | None = None,
        *,
        bin_dir: str | os.PathLike[str] | None = None,
        startup_timeout: float = 90.0,
        stop_timeout: float = 15.0,
        extra_apiserver_args: Sequence[str] = (),
    ) -> None:
        self.state_dir = Path(state_dir) if state_dir is not None else default_state_dir()
        self.state_dir = self.state_dir.absolute()
        self._bin_dir = Path(bin_dir) if bin_dir is not None else None
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.extra_apiserver_args = list(extra_apiserver_args)
        self._reused = False

    # ---- paths
    @property
    def certs_dir(self) -> Path:
        return self.state_dir / "pki"

    @property
    def etcd_data_dir(self) -> Path:
        return self.state_dir / "etcd-data"

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def env_file(self) -> Path:
        return self.state_dir / "env"

    @property
    def kubeconfig_path(self) -> Path:
        return self.state_dir / "kubeconfig"

    def log_path(self, binary: str) -> Path:
        return self.state_dir / f"{binary}.log"

    def pid_path(self, binary: str) -> Path:
        return self.state_dir / f"{binary}.pid"

    # ---- locking (several pytest-xdist workers may share a state dir)
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.state_dir / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # ---- state
    def _load_state(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _save_state(self, state: dict[str, Any]) -> None:
        _write_private(self.state_file, json.dumps(state, indent=2) + "\n")
        for binary, key in ((self.ETCD, "etcd_pid"), (self.APISERVER, "apiserver_pid")):
            if state.get(key):
                self.pid_path(binary).write_text(f"{state[key]}\n")
            else:
                self.pid_path(binary).unlink(missing_ok=True)
        info = self._info(state)
        if state.get("apiserver_pid"):
            self._write_env(info)

    def _info(self, state: dict[str, Any]) -> TestEnvInfo:
        return TestEnvInfo(
            state_dir=self.state_dir,
            kubeconfig=self.kubeconfig_path,
            env_file=self.env_file,
            server_url=state["server_url"],
            token=state["token"],
            ca_path=self.certs_dir / "ca.crt",
            etcd_url=state["etcd_url"],
            etcd_pid=int(state.get("etcd_pid") or 0),
            apiserver_pid=int(state.get("apiserver_pid") or 0),
            bin_dir=Path(state["bin_dir"]),
            reused=self._reused,
        )

    def _write_env(self, info: TestEnvInfo) -> None:
        lines = [f"export {k}={shlex.quote(v)}" for k, v in info.env_vars().items()]
        _write_private(
            self.env_file, "# generated by tests/env/testenv.py\n" + "\n".join(lines) + "\n"
        )

    def _write_kubeconfig(self, state: dict[str, Any]) -> None:
        ca = base64.b64encode((self.certs_dir / "ca.crt").read_bytes()).decode()
        _write_private(
            self.kubeconfig_path,
            f"""apiVersion: v1
kind: Config
clusters:
- name: {CLUSTER_NAME}
  cluster:
    server: {state["server_url"]}
    certificate-authority-data: {ca}
users:
- name: {ADMIN_USER}
  user:
    token: {state["token"]}
contexts:
- name: {CLUSTER_NAME}
  context:
    cluster: {CLUSTER_NAME}
    user: {ADMIN_USER}
    namespace: default
current-context: {CLUSTER_NAME}
""",
        )

    # ---- binaries
    def bin_dir(self) -> Path:
        """Directory with ``kube-apiserver`` and ``etcd``; runs build.sh if needed."""
        if self._bin_dir is None:
            res = subprocess.run(
                ["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True, check=False
            )
            if res.returncode != 0:
                raise TestEnvError(
                    f"{BUILD_SCRIPT} failed (exit {res.returncode}); see its output above"
                )
            lines = res.stdout.strip().splitlines()
            if not lines:
                raise TestEnvError(f"{BUILD_SCRIPT} printed no bin directory")
            self._bin_dir = Path(lines[-1])
        for b in (self.ETCD, self.APISERVER):
            if not os.access(self._bin_dir / b, os.X_OK):
                raise TestEnvError(f"{self._bin_dir / b} is missing or not executable")
        return self._bin_dir

    # ---- health
    def _ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.certs_dir / "ca.crt"))

    def _get(self, url: str, token: str | None = None, timeout: float = 2.0) -> tuple[int, str]:
        req = urllib.request.Request(url)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        ctx = self._ssl_context() if url.startswith("https:") else None
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=ctx) as resp:
                return int(resp.status), resp.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            return int(e.code), e.read().decode(errors="replace")

    def _etcd_healthy(self, etcd_url: str) -> bool:
        try:
            code, body = self._get(f"{etcd_url}/health")
        except (OSError, ValueError):
            return False
        return code == 200 and '"true"' in body

    def _apiserver_ready(self, state: dict[str, Any]) -> bool:
        try:
            code, _ = self._get(f"{state['server_url']}/readyz", state["token"])
        except (OSError, ValueError, ssl.SSLError):
            return False
        return code == 200

    def is_healthy(self) -> bool:
        """True if both processes recorded in the state dir are ours, alive and ready."""
        state = self._load_state()
        if not state or not state.get("etcd_pid") or not state.get("apiserver_pid"):
            return False
        marker = str(self.state_dir)
        return (
            pid_matches(int(state["etcd_pid"]), self.ETCD, marker)
            and pid_matches(int(state["apiserver_pid"]), self.APISERVER, marker)
            and self._etcd_healthy(state["etcd_url"])
            and self._apiserver_ready(state)
        )

    def _wait(self, what: str, binary: str, pid: int, check: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if check():
                return
            _reap(pid)
            if not _pid_alive(pid):
                raise TestEnvError(
                    f"{what} exited during startup; last lines of {self.log_path(binary)}:\n"
                    + _tail(self.log_path(binary))
                )
            if time.monotonic() > deadline:
                raise TestEnvError(
                    f"{what} not ready after {self.startup_timeout:.0f}s; last lines of "
                    f"{self.log_path(binary)}:\n" + _tail(self.log_path(binary))
                )
            time.sleep(0.2)

    # ---- processes
    def _spawn(self, binary: str, args: list[str]) -> int:
        log = open(self.log_path(binary), "ab")  # noqa: SIM115 - handed to the child
        with log:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
            log.write(f"\n==== {stamp} {binary} {shlex.join(args)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                [str(Path(self._info_bin()) / binary), *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.state_dir,
                start_new_session=True,  # no Ctrl-C from the terminal; survives `up`
                close_fds=True,
            )
        _CHILDREN[proc.pid] = proc
        return proc.pid

    def _info_bin(self) -> Path:
        assert self._bin_dir is not None
        return self._bin_dir

    def _etcd_args(self, state: dict[str, Any]) -> list[str]:
        peer = f"http://{HOST}:{state['etcd_peer_port']}"
        return [
            "--name=testenv",
            f"--data-dir={self.etcd_data_dir}",
            f"--listen-client-urls={state['etcd_url']}",
            f"--advertise-client-urls={state['etcd_url']}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=testenv={peer}",
            "--initial-cluster-state=new",
            "--unsafe-no-fsync=true",  # throwaway data: trade durability for speed
            "--log-level=warn",
        ]

    def _apiserver_args(self, state: dict[str, Any]) -> list[str]:
        pki = self.certs_dir
        return [
            f"--etcd-servers={state['etcd_url']}",
            f"--bind-address={HOST}",
            f"--advertise-address={HOST}",
            f"--secure-port={state['apiserver_port']}",
            f"--cert-dir={pki}",
            f"--tls-cert-file={pki / 'server.crt'}",
            f"--tls-private-key-file={pki / 'server.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--token-auth-file={self.state_dir / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            # no kube-controller-manager: nobody would create the default ServiceAccount
            "--disable-admission-plugins=ServiceAccount",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            # 127.0.0.1 is not a valid Endpoints address; skip the `kubernetes` endpoints
            "--endpoint-reconciler-type=none",
            "--allow-privileged=true",
            "--profiling=false",
            *self.extra_apiserver_args,
        ]

    def _start_etcd(self, state: dict[str, Any]) -> None:
        pid = self._spawn(self.ETCD, self._etcd_args(state))
        state["etcd_pid"] = pid
        self._save_state(state)
        self._wait("etcd", self.ETCD, pid, lambda: self._etcd_healthy(state["etcd_url"]))

    def _start_apiserver(self, state: dict[str, Any]) -> None:
        if not _port_free(int(state["apiserver_port"])):
            raise TestEnvError(f"port {HOST}:{state['apiserver_port']} for kube-apiserver is taken")
        pid = self._spawn(self.APISERVER, self._apiserver_args(state))
        state["apiserver_pid"] = pid
        self._save_state(state)
        self._wait("kube-apiserver", self.APISERVER, pid, lambda: self._apiserver_ready(state))

    def _kill_recorded(self, state: dict[str, Any] | None) -> None:
        if not state:
            return
        marker = str(self.state_dir)
        for binary, key in ((self.APISERVER, "apiserver_pid"), (self.ETCD, "etcd_pid")):
            pid = int(state.get(key) or 0)
            if pid and terminate_pid(pid, binary, marker, self.stop_timeout):
                _log(f"stopped {binary} (pid {pid})")
            _reap(pid)  # it may have died on its own (failed startup)
            state[key] = 0

    # ---- public API
    def info(self) -> TestEnvInfo:
        """Connection details of the environment recorded in the state dir."""
        state = self._load_state()
        if not state:
            raise TestEnvError(f"no test environment recorded in {self.state_dir}")
        return self._info(state)

    def start(self) -> TestEnvInfo:
        """Start etcd and kube-apiserver (or reuse the healthy ones already recorded)."""
        with self._locked():
            if self.is_healthy():
                self._reused = True
                current = self._load_state()
                assert current is not None
                self._bin_dir = Path(current["bin_dir"])
                return self._info(current)
            self._reused = False
            stale = self._load_state()
            if stale:
                _log(f"cleaning up a stale environment in {self.state_dir}")
            self._kill_recorded(stale)
            self._clean(keep_logs=True)
            bin_dir = self.bin_dir()
            t0 = time.monotonic()
            make_certs(self.certs_dir)
            token = secrets.token_hex(24)
            _write_private(
                self.state_dir / "tokens.csv",
                f'{token},{ADMIN_USER},{ADMIN_USER},"{ADMIN_GROUP}"\n',
            )
            last_error: TestEnvError | None = None
            for attempt in range(3):  # ports are picked racily: retry on a clash
                ports: list[int] = []
                for _ in range(3):
                    ports.append(free_port(exclude=ports))
                state: dict[str, Any] = {
                    "bin_dir": str(bin_dir),
                    "etcd_url": f"http://{HOST}:{ports[0]}",
                    "etcd_peer_port": ports[1],
                    "apiserver_port": ports[2],
                    "server_url": f"https://{HOST}:{ports[2]}",
                    "token": token,
                    "etcd_pid": 0,
                    "apiserver_pid": 0,
                }
                try:
                    self._write_kubeconfig(state)
                    self._start_etcd(state)
                    self._start_apiserver(state)
                except TestEnvError as e:
                    last_error = e
                    self._kill_recorded(state)
                    shutil.rmtree(self.etcd_data_dir, ignore_errors=True)
                    if "address already in use" not in str(e) and "is taken" not in str(e):
                        break
                    _log(f"port clash, retrying ({attempt + 1}/3)")
                    continue
                self._save_state(state)
                _log(f"up in {time.monotonic() - t0:.1f}s: {state['server_url']}")
                return self._info(state)
            self._clean(keep_logs=True)
            assert last_error is not None
            raise last_error

    def stop(self, force: bool = False) -> None:
        """Stop both processes and remove etcd data (a reused env only with ``force``)."""
        if self._reused and not force:
            return
        with self._locked():
            self._kill_recorded(self._load_state())
            self._clean(keep_logs=True)
            self._reused = False

    def stop_apiserver(self) -> None:
        """Stop kube-apiserver only (etcd keeps the data): an API outage."""
        with self._locked():
            state = self._load_state()
            if not state:
                raise TestEnvError(f"no test environment recorded in {self.state_dir}")
            pid = int(state.get("apiserver_pid") or 0)
            if pid:
                terminate_pid(pid, self.APISERVER, str(self.state_dir), self.stop_timeout)
            state["apiserver_pid"] = 0
            self._save_state(state)
            self.env_file.unlink(missing_ok=True)

    def start_apiserver(self) -> TestEnvInfo:
        """Start kube-apiserver again, same port and certificates, on the running etcd."""
        with self._locked():
            state = self._load_state()
            if not state:
                raise TestEnvError(f"no test environment recorded in {self.state_dir}")
            marker = str(self.state_dir)
            if not pid_matches(int(state.get("etcd_pid") or 0), self.ETCD, marker):
                raise TestEnvError("etcd is not running; use start() instead")
            self._bin_dir = Path(state["bin_dir"])
            pid = int(state.get("apiserver_pid") or 0)
            if not pid_matches(pid, self.APISERVER, marker):
                self._start_apiserver(state)
            return self._info(state)

    def _clean(self, keep_logs: bool) -> None:
        shutil.rmtree(self.etcd_data_dir, ignore_errors=True)
        shutil.rmtree(self.certs_dir, ignore_errors=True)
        for p in (
            self.state_file,
            self.env_file,
            self.kubeconfig_path,
            self.state_dir / "tokens.csv",
            self.pid_path(self.ETCD),
            self.pid_path(self.APISERVER),
        ):
            p.unlink(missing_ok=True)
        if not keep_logs:
            for b in (self.ETCD, self.APISERVER):
                self.log_path(b).unlink(missing_ok=True)

    def __enter__(self) -> TestEnvInfo:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------
# command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.env.testenv",
        description="Local etcd + kube-apiserver for falco-talon tests.",
    )
    parser.add_argument(
        "command",
        choices=["up", "down", "status", "stop-apiserver", "start-apiserver"],
    )
    parser.add_argument(
        "--state-dir",
        default=None,
        help=f"default: $FALCO_TALON_TESTENV_DIR or {default_state_dir()}",
    )
    parser.add_argument("--timeout", type=float, default=90.0, help="startup timeout (s)")
    args = parser.parse_args(argv)
    env = TestEnv(args.state_dir, startup_timeout=args.timeout)
    try:
        if args.command == "up":
            info = env.start()
            if info.reused:
                _log(f"already up: {info.server_url}")
            print(info.env_file)
        elif args.command == "down":
            env.stop(force=True)
        elif args.command == "status":
            healthy = env.is_healthy()
            state = env._load_state()
            if healthy and state:
                info = env._info(state)
                print(
                    f"up: {info.server_url} (etcd pid {info.etcd_pid}, "
                    f"kube-apiserver pid {info.apiserver_pid})"
                )
                print(info.env_file)
                return 0
            print("down" if not state else "unhealthy (run `down` or `up`)")
            return 1
        elif args.command == "stop-apiserver":
            env.stop_apiserver()
        elif args.command == "start-apiserver":
            print(env.start_apiserver().env_file)
    except TestEnvError as e:
        print(f"testenv: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
