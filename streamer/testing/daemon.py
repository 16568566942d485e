"""A real ``streamer serve`` process for tests: config file, free port, log file, signals.

Its output goes to a file (a pipe nobody reads would block the daemon), so a
test can read the whole log afterwards, look for tracebacks, and send signals
by PID like systemd does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from streamer.testing.net import free_port

if TYPE_CHECKING:
    from streamer.config import Config
    from streamer.service.app import App

__all__ = ["DaemonProcess", "client_config", "http_status", "running_app", "tiny_model_config"]


def client_config(
    model: Path,
    *,
    vad: bool = True,
    streaming: Mapping[str, object] | None = None,
    sections: Mapping[str, object] | None = None,
    **websocket: object,
) -> Config:
    """An in-process daemon on ``model`` for client tests: no sources, no console.

    Tiny-model streaming settings (0.5 s hops, short decodes), float32 (exact
    and small: ``auto`` is bfloat16 on AMX CPUs), Silero VAD unless ``vad`` is
    off, the WebSocket on a free loopback port; ``streaming`` and ``websocket``
    override keys of those sections, ``sections`` replaces whole ones (e.g.
    ``{"admission": AdmissionConfig(...)}``).
    """
    import dataclasses

    from streamer.config import (
        Config,
        ConsoleConfig,
        ModelConfig,
        StreamingConfig,
        VadConfig,
        WebSocketConfig,
    )

    stream = {"chunk_ms": 500, "max_tokens_per_second": 3.0, "min_tokens": 2, **(streaming or {})}
    ws: dict[str, object] = {"port": 0, "max_audio_rate": 50.0, **websocket}
    return Config(
        model=ModelConfig(
            id=str(model), device="cpu", dtype="float32", source_language="en", target_language="en"
        ),
        streaming=dataclasses.replace(StreamingConfig(), **stream),  # type: ignore[arg-type]
        vad=VadConfig(enabled=vad, backend="silero"),
        sources=(),
        websocket=dataclasses.replace(WebSocketConfig(), **ws),  # type: ignore[arg-type]
        console=ConsoleConfig(enabled=False),
        **(sections or {}),  # type: ignore[arg-type]
    )


@contextlib.asynccontextmanager
async def running_app(cfg: Config, timeout: float = 60.0) -> AsyncIterator[App]:
    """The daemon in this process (``App``), ready; stopped on the way out (exit 0)."""
    from streamer.service.app import App

    app = App(cfg, keep_serving=True)
    task = asyncio.create_task(app.run(), name="app")
    async with asyncio.timeout(timeout):
        while not app.ready:
            assert not task.done(), task.exception()
            await asyncio.sleep(0.02)
    try:
        yield app
    finally:
        app.request_stop()
        assert await asyncio.wait_for(task, timeout) == 0


def tiny_model_config(
    model: Path,
    websocket: str = "",
    extra: str = "",
    *,
    streaming: str = "",
    vad: bool = False,
    port: int | None = None,
) -> str:
    """TOML for a daemon on ``model`` with no configured sources.

    ``websocket`` and ``streaming`` add lines to those sections, ``extra`` whole
    sections; without ``port`` the port stays a ``{port}`` placeholder that
    :meth:`DaemonProcess.start` fills.
    """
    return f"""
sources = []

[model]
id = "{model}"
device = "cpu"
dtype = "float32"
source_language = "en"
target_language = "en"

[streaming]
chunk_ms = 500
max_tokens_per_second = 3.0
min_tokens = 2
{streaming}

[vad]
enabled = {"true" if vad else "false"}

[websocket]
host = "127.0.0.1"
port = {"{port}" if port is None else port}
{websocket}

[console]
enabled = false
{extra}
"""


def http_status(port: int, path: str, timeout: float = 5.0) -> int | None:
    """HTTP status of ``GET path`` on 127.0.0.1, or None when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


@dataclass
class DaemonProcess:
    """``python -m streamer serve --config FILE --keep-serving`` in a subprocess."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @classmethod
    def start(
        cls, workdir: Path, config: str, env: Mapping[str, str], port: int | None = None
    ) -> DaemonProcess:
        """Write ``config`` (``{port}`` is filled in) and start the daemon on it."""
        port = port or free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        cfg = workdir / "serve.toml"
        cfg.write_text(config.replace("{port}", str(port)), encoding="utf-8")
        log_path = workdir / "daemon.log"
        argv = [sys.executable, "-m", "streamer", "serve", "--config", str(cfg), "--keep-serving"]
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env),
                cwd=workdir,
            )
        return cls(proc, port, log_path)

    def url(self, path: str, scheme: str = "ws") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    @property
    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    async def wait_ready(self, timeout: float = 120.0) -> None:
        """Until ``/readyz`` answers 200; fails with the log when the process dies."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log}")
            if await asyncio.to_thread(http_status, self.port, "/readyz", 2.0) == 200:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"daemon not ready in {timeout} s:\n{self.log}")

    def signal(self, signum: int) -> None:
        os.kill(self.proc.pid, signum)

    async def wait_exit(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"daemon still running after {timeout} s:\n{self.log}")
            await asyncio.sleep(0.05)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL if still running (test teardown)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
