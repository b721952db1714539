"""A real, local nats-server with JetStream, for tests/nats/ (not named nats.py: pytest puts
tests/env/ on sys.path, where it would shadow the nats-py package).

The ``nats-server`` binary (``github.com/nats-io/nats-server/v2``) is built by
``tests/env/build.sh nats`` and cached under
``${XDG_CACHE_HOME:-~/.cache}/falco-talon/testenv/nats-<version>/``. This module only needs
the Python standard library.

The server listens on 127.0.0.1 on a free port, stores JetStream's files under its state
directory (so a restart on the same directory keeps every stored event), and is stopped by
its pid. Optional token auth and TLS (certificate and key files given by the test)::

    server = TestNats(tmp_path / "nats")
    url = server.start()      # nats://127.0.0.1:PORT
    server.stop()             # SIGTERM; server.kill() for SIGKILL
    server.start()            # same port, same store
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


class NatsError(RuntimeError):
    pass


def nats_bin_dir() -> Path:
    """The directory holding ``nats-server`` (built on first use)."""
    out = subprocess.run(
        ["bash", str(HERE / "build.sh"), "nats"], check=True, capture_output=True, text=True
    )
    return Path(out.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TestNats:
    """One nats-server process: ``start``/``stop``/``kill``, restartable on the same port."""

    __test__ = False  # not a pytest class

    def __init__(
        self,
        state_dir: Path,
        *,
        token: str = "",
        nkey: str = "",
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        startup_timeout: float = 20.0,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.token = token
        self.nkey = nkey
        """A user's public NKEY (U...): the only user the server accepts."""
        self.tls = (tls_cert, tls_key) if tls_cert and tls_key else None
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.state_dir / "nats-server.log"

    @property
    def url(self) -> str:
        return f"{'tls' if self.tls else 'nats'}://127.0.0.1:{self.port}"

    def _config(self) -> Path:
        store = self.state_dir / "js"
        lines = [
            f"listen: 127.0.0.1:{self.port}",
            "jetstream {",
            f'  store_dir: "{store}"',
            "  max_memory_store: 64MB",
            "  max_file_store: 1GB",
            "}",
        ]
        if self.token:
            lines += ["authorization {", f'  token: "{self.token}"', "}"]
        if self.nkey:
            lines += ["authorization {", f'  users: [{{nkey: "{self.nkey}"}}]', "}"]
        if self.tls:
            lines += ["tls {", f'  cert_file: "{self.tls[0]}"', f'  key_file: "{self.tls[1]}"', "}"]
        path = self.state_dir / "nats.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self) -> str:
        if self.proc is not None and self.proc.poll() is None:
            return self.url
        self.state_dir.mkdir(parents=True, exist_ok=True)
        binary = nats_bin_dir() / "nats-server"
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the process
        self.proc = subprocess.Popen(
            [str(binary), "-c", str(self._config())],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NatsError(f"nats-server exited: {self.log_path.read_text()[-2000:]}")
            if "Server is ready" in self.log_path.read_text(errors="replace"):
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", self.port)) == 0:
                        return self.url
            time.sleep(0.05)
        self.kill()
        raise NatsError(f"nats-server not ready in {self.startup_timeout}s")

    def _signal(self, sig: int) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, sig)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
        # a restart must see the "ready" line of its own run only
        self.log_path.rename(self.log_path.with_suffix(f".{int(time.time() * 1000)}.log"))

    def stop(self) -> None:
        """Graceful stop (SIGTERM), waiting for the process to exit."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)
