"""A small test kubelet (``talon-kubelet``) that serves ``pods/exec`` for the test control plane.

``main.go`` next to this file is built by ``tests/env/build.sh kubelet`` (cached under
``${XDG_CACHE_HOME:-~/.cache}/falco-talon/testenv/kubelet-<hash>/``). It registers a Node,
keeps it Ready and serves the kubelet's ``/exec/...`` endpoint, which the kube-apiserver
proxies ``pods/exec`` to: the command runs as a local process (as the user running the
tests) in ``<sandbox_root>/<namespace>/<pod>/<container>/``. No containers, no isolation.

From a pytest session fixture::

    env = TestEnv(state_dir, extra_apiserver_args=kubelet_apiserver_args(state_dir))
    info = env.start()
    kubelet = TestKubelet(info.kubeconfig)  # node "talon-node-1"
    kubelet.start()  # builds if needed; returns when the Node is Ready
    ...  # pods with spec.nodeName="talon-node-1" can be exec'ed into
    kubelet.stop()
    env.stop()

``kubelet_apiserver_args`` is optional: it makes the apiserver verify the kubelet's serving
certificate (signed by the test CA); without it the apiserver skips that verification.
Only the Python standard library is used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE.parent / "build.sh"
BINARY = "talon-kubelet"
DEFAULT_NODE_NAME = "talon-node-1"
HOST = "127.0.0.1"

__all__ = [
    "DEFAULT_NODE_NAME",
    "TestKubelet",
    "TestKubeletError",
    "TestKubeletInfo",
    "build",
    "kubelet_apiserver_args",
]


class TestKubeletError(RuntimeError):
    """The test kubelet could not be built, started or stopped."""

    __test__ = False  # not a pytest test class


@dataclasses.dataclass(frozen=True)
class TestKubeletInfo:
    """A running test kubelet."""

    __test__ = False

    node_name: str
    pid: int
    port: int
    url: str  # https://127.0.0.1:PORT
    sandbox_root: Path
    work_dir: Path
    log_path: Path
    binary: Path
    ca_path: Path | None  # the CA that signed its serving certificate (None: self-signed)


def _log(msg: str) -> None:
    print(f"[testkubelet] {msg}", file=sys.stderr, flush=True)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def build() -> Path:
    """Path of the ``talon-kubelet`` binary; runs ``build.sh kubelet`` (fast when cached)."""
    res = subprocess.run(
        ["bash", str(BUILD_SCRIPT), "kubelet"], stdout=subprocess.PIPE, text=True, check=False
    )
    if res.returncode != 0:
        raise TestKubeletError(f"{BUILD_SCRIPT} kubelet failed (exit {res.returncode})")
    lines = res.stdout.strip().splitlines()
    if not lines:
        raise TestKubeletError(f"{BUILD_SCRIPT} kubelet printed no bin directory")
    binary = Path(lines[-1]) / BINARY
    if not os.access(binary, os.X_OK):
        raise TestKubeletError(f"{binary} is missing or not executable")
    return binary


def kubelet_apiserver_args(state_dir: str | os.PathLike[str]) -> list[str]:
    """Extra kube-apiserver args so it verifies the kubelet's certificate against the test CA.

    For ``TestEnv(state_dir, extra_apiserver_args=...)``: ``<state_dir>/pki/ca.crt`` is
    created by ``TestEnv.start()`` before kube-apiserver starts, and ``TestKubelet`` (with
    the testenv kubeconfig) signs its serving certificate with ``<state_dir>/pki/ca.key``.
    Without these args the apiserver talks to the kubelet without verifying its certificate
    (its default when ``--kubelet-certificate-authority`` is unset), which works as well.
    """
    ca = Path(state_dir).absolute() / "pki" / "ca.crt"
    return [f"--kubelet-certificate-authority={ca}"]


class TestKubelet:
    """Start and stop one ``talon-kubelet`` process (and only that one)."""

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        kubeconfig: str | os.PathLike[str],
        node_name: str = DEFAULT_NODE_NAME,
        sandbox_root: str | os.PathLike[str] | None = None,
        *,
        work_dir: str | os.PathLike[str] | None = None,
        ca_cert: str | os.PathLike[str] | None = None,
        ca_key: str | os.PathLike[str] | None = None,
        self_signed: bool = False,
        binary: str | os.PathLike[str] | None = None,
        status_interval: float = 10.0,
        check_pods: bool = True,
        delete_node_on_stop: bool = False,
        startup_timeout: float = 60.0,
        stop_timeout: float = 10.0,
        extra_args: list[str] | None = None,
    ) -> None:
        """Configure (nothing starts before ``start()``).

        ``work_dir`` (log, port file) defaults to ``<kubeconfig dir>/kubelet-<node_name>``,
        ``sandbox_root`` to ``<work_dir>/sandbox``. The serving certificate is signed by
        ``ca_cert``/``ca_key``; when not given, by ``<kubeconfig dir>/pki/ca.{crt,key}`` if
        those exist (the TestEnv layout), else it is self-signed (``self_signed=True`` forces
        that).
        """
        self.kubeconfig = Path(kubeconfig).absolute()
        self.node_name = node_name
        self.work_dir = (
            Path(work_dir).absolute()
            if work_dir is not None
            else self.kubeconfig.parent / f"kubelet-{node_name}"
        )
        self.sandbox_root = (
            Path(sandbox_root).absolute() if sandbox_root is not None else self.work_dir / "sandbox"
        )
        self.ca_cert: Path | None = None
        self.ca_key: Path | None = None
        if not self_signed:
            if ca_cert is not None or ca_key is not None:
                if ca_cert is None or ca_key is None:
                    raise TestKubeletError("give both ca_cert and ca_key, or neither")
                self.ca_cert, self.ca_key = Path(ca_cert), Path(ca_key)
            else:
                pki = self.kubeconfig.parent / "pki"
                if (pki / "ca.crt").is_file() and (pki / "ca.key").is_file():
                    self.ca_cert, self.ca_key = pki / "ca.crt", pki / "ca.key"
        self._binary = Path(binary) if binary is not None else None
        self.status_interval = status_interval
        self.check_pods = check_pods
        self.delete_node_on_stop = delete_node_on_stop
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.extra_args = list(extra_args or [])
        self._proc: subprocess.Popen[bytes] | None = None
        self._info: TestKubeletInfo | None = None

    @property
    def log_path(self) -> Path:
        return self.work_dir / "talon-kubelet.log"

    @property
    def port_file(self) -> Path:
        return self.work_dir / "port"

    @property
    def info(self) -> TestKubeletInfo:
        if self._info is None or not self.running:
            raise TestKubeletError("the test kubelet is not running")
        return self._info

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _args(self, binary: Path) -> list[str]:
        args = [
            str(binary),
            f"--kubeconfig={self.kubeconfig}",
            f"--node-name={self.node_name}",
            f"--bind-address={HOST}",
            "--port=0",
            f"--port-file={self.port_file}",
            f"--sandbox-root={self.sandbox_root}",
            f"--status-interval={self.status_interval}s",
            f"--check-pods={'true' if self.check_pods else 'false'}",
            f"--delete-node-on-exit={'true' if self.delete_node_on_stop else 'false'}",
            # Exit if this Python process dies without calling stop().
            "--exit-with-parent",
        ]
        if self.ca_cert is not None and self.ca_key is not None:
            args += [f"--ca-cert-file={self.ca_cert}", f"--ca-key-file={self.ca_key}"]
        return args + self.extra_args

    def _ssl_context(self) -> ssl.SSLContext:
        if self.ca_cert is not None:
            return ssl.create_default_context(cafile=str(self.ca_cert))
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # self-signed serving certificate
        return ctx

    def _healthy(self, port: int) -> bool:
        """``/healthz`` is 200 only once the kubelet wrote its Node with Ready=True."""
        try:
            with urllib.request.urlopen(
                f"https://{HOST}:{port}/healthz", timeout=2, context=self._ssl_context()
            ) as resp:
                return int(resp.status) == 200
        except (urllib.error.URLError, OSError, ssl.SSLError):
            return False

    def start(self) -> TestKubeletInfo:
        """Build if needed, start on a free port, return once the Node is Ready."""
        if self.running:
            return self.info
        if not self.kubeconfig.is_file():
            raise TestKubeletError(f"no kubeconfig at {self.kubeconfig}")
        binary = self._binary or build()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.sandbox_root.mkdir(parents=True, exist_ok=True)
        self.port_file.unlink(missing_ok=True)
        t0 = time.monotonic()
        args = self._args(binary)
        with open(self.log_path, "ab") as log:
            log.write(f"\n==== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(args)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.work_dir,
                start_new_session=True,  # no Ctrl-C from the terminal: stop() handles it
                close_fds=True,
            )
        proc = self._proc
        deadline = t0 + self.startup_timeout
        port = 0
        while True:
            if proc.poll() is not None:
                self._proc = None
                raise TestKubeletError(
                    f"talon-kubelet exited with {proc.returncode} during startup; "
                    f"last lines of {self.log_path}:\n{_tail(self.log_path)}"
                )
            if not port:
                with contextlib.suppress(OSError, ValueError):
                    port = int(self.port_file.read_text().strip())
            if port and self._healthy(port):
                break
            if time.monotonic() > deadline:
                self.stop()
                raise TestKubeletError(
                    f"talon-kubelet not ready after {self.startup_timeout:.0f}s (node "
                    f"{self.node_name} not registered?); last lines of {self.log_path}:\n"
                    + _tail(self.log_path)
                )
            time.sleep(0.1)
        self._info = TestKubeletInfo(
            node_name=self.node_name,
            pid=proc.pid,
            port=port,
            url=f"https://{HOST}:{port}",
            sandbox_root=self.sandbox_root,
            work_dir=self.work_dir,
            log_path=self.log_path,
            binary=binary,
            ca_path=self.ca_cert,
        )
        _log(f"node {self.node_name} Ready in {time.monotonic() - t0:.1f}s: {self._info.url}")
        return self._info

    def stop(self) -> None:
        """SIGTERM its own process (the Node is marked NotReady), SIGKILL after ``stop_timeout``."""
        proc, self._proc, self._info = self._proc, None, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                _log(f"talon-kubelet (pid {proc.pid}) ignored SIGTERM; sending SIGKILL")
                proc.kill()
                proc.wait(10)
        self.port_file.unlink(missing_ok=True)

    def __enter__(self) -> TestKubeletInfo:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
