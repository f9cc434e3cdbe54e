"""A real ``redis-server`` on a free local port, for tests.

    server = RedisServer().start()     # waits until it answers PING
    server.url                         # redis://127.0.0.1:<port>/0
    server.kill()                      # SIGKILL (an outage)
    server.restart()                   # same port, empty data (nothing is persisted)
    server.stop()

Also a context manager. Nothing is saved to disk (``--save "" --appendonly no``) and it binds
127.0.0.1 only.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: every socket stays bound until all are picked (two
    free_port() calls in a row may get the same port back from the kernel, and the second
    server then cannot bind: seen in CI as a worker's /metrics refusing connections)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class RedisServer:
    def __init__(self, port: int | None = None, executable: str = "redis-server"):
        path = shutil.which(executable)
        if path is None:
            raise RuntimeError(f"{executable} not found on PATH")
        self.executable = path
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self._dir = tempfile.mkdtemp(prefix="softvq-redis-")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> RedisServer:
        if self.running:
            return self
        cmd = [
            self.executable,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self._dir,
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            if self.ping():
                return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not answer within {timeout}s")

    def ping(self) -> bool:
        """A raw PING over a socket (no client library), True on +PONG."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: an abrupt outage, like a crashed Redis."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            self.proc = None

    def restart(self, timeout: float = 10.0) -> RedisServer:
        """Back on the same port (empty, as after a crash without persistence)."""
        self.kill()
        # The port may linger briefly in TIME_WAIT for the server's socket; retry a few times.
        end = time.monotonic() + timeout
        while True:
            try:
                return self.start(timeout=max(1.0, end - time.monotonic()))
            except RuntimeError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.2)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
