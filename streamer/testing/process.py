"""A helper server process for tests (Mosquitto, HAProxy): start, wait until ready, stop.

Each server runs in its own session (a Ctrl-C in the test run is not sent to
it twice) with stdout and stderr appended to one file, and is stopped by its
PID: SIGTERM, then SIGKILL if it outlives the timeout.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Self

__all__ = ["ServerProcess", "accepts"]


def accepts(host: str, port: int) -> bool:
    """Whether ``host:port`` takes a TCP connection now."""
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class ServerProcess:
    """Start/stop bookkeeping; a subclass gives the command and the readiness check."""

    name = "server"
    host = "127.0.0.1"
    port = 0
    error: type[Exception] = RuntimeError

    def __init__(self, out_path: Path, log_paths: tuple[Path, ...] = ()) -> None:
        self.out_path = out_path
        self.log_paths = (*log_paths, out_path) if out_path not in log_paths else log_paths
        self._proc: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        """Whether the started process serves (polled until the start timeout)."""
        return accepts(self.host, self.port)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start the process and wait until :meth:`ready`."""
        if self.running:
            return
        self._close_out()
        self._out = open(self.out_path, "ab")  # noqa: SIM115 - closed in stop()/kill()
        self._proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                self._close_out()
                raise self.error(f"{self.name} exited with {code} at start\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                if self.ready():
                    return
            if time.monotonic() > deadline:
                self.kill()
                raise self.error(f"{self.name} not ready within {timeout} s\n{self.log_tail()}")
            time.sleep(0.02)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM by PID, SIGKILL if it is still alive after ``timeout``."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout)
        self._proc = None
        self._close_out()

    def kill(self) -> None:
        """SIGKILL by PID (an abrupt outage: no goodbye to the clients)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5.0)
        self._proc = None
        self._close_out()

    def _close_out(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server's log files, for failure messages."""
        parts = []
        for path in dict.fromkeys(self.log_paths):
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            tail = text.splitlines()[-lines:]
            if tail:
                parts.append(f"--- {path.name} ---\n" + "\n".join(tail))
        return "\n".join(parts) if parts else f"(no {self.name} output)"

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"<{type(self).__name__} {self.host}:{self.port} {state}>"
