"""File descriptor exhaustion: a flood of idle sockets against a daemon with few fds.

``python -m streamer serve`` (tiny random Whisper, no sources, ``--keep-serving``)
runs with ``RLIMIT_NOFILE`` lowered to :data:`FD_LIMIT` (systemd's default
1024 behaves the same, only later). The test opens more idle TCP connections
than the daemon has file descriptors and holds them: ``/healthz`` must keep
answering within seconds (the server evicts the oldest idle socket for a new
one instead of running out of descriptors), the daemon stays up, and its log
holds no flood of asyncio accept-error tracebacks.
"""

from __future__ import annotations

import contextlib
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamer.testing.daemon import tiny_model_config
from streamer.testing.net import free_port

FD_LIMIT = 512
IDLE_SOCKETS = 2 * FD_LIMIT
START_TIMEOUT = 120.0  # torch import and the tiny model on 2 busy cores
PROBE_TIMEOUT = 2.0
PROBES, PROBE_EVERY = 8, 0.5  # over 4 s: the flood lands within the first second


def write_config(tmp_path: Path, model: Path, port: int) -> Path:
    config = tmp_path / "serve.toml"
    extra = '[logging]\nformat = "human"\n'
    config.write_text(tiny_model_config(model, extra=extra, port=port), encoding="utf-8")
    return config


def http_status(port: int, path: str, timeout: float = PROBE_TIMEOUT) -> int | None:
    """Status of ``GET path`` over a fresh connection; None when no answer in time."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            head = sock.recv(64)
    except OSError:
        return None
    parts = head.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


def lower_fd_limit() -> None:  # runs in the child, before exec
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, hard))


@contextlib.contextmanager
def daemon(config: Path, log: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamer", "serve", "-c", str(config), "--keep-serving"],
            stdout=subprocess.DEVNULL,
            stderr=out,
            env=env,
            preexec_fn=lower_fd_limit,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_ready(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while http_status(port, "/readyz", timeout=1.0) != 200:
        assert proc.poll() is None, log.read_text(errors="replace")
        assert time.monotonic() < deadline, log.read_text(errors="replace")
        time.sleep(0.1)


def open_idle(port: int, count: int) -> list[socket.socket]:
    """``count`` connections that never send a byte (non-blocking connects)."""
    socks = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        socks.append(sock)
    return socks


@pytest.fixture
def many_fds() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = IDLE_SOCKETS + 256
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"this test process may open only {hard} files")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def test_idle_socket_flood_keeps_healthz_answering(
    many_fds: None, tiny_whisper: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    port = free_port()
    log = tmp_path / "daemon.log"
    env = {**cli_env, "STATE_DIRECTORY": str(tmp_path / "state")}
    with daemon(write_config(tmp_path, tiny_whisper, port), log, env) as proc:
        wait_ready(proc, port, log)
        socks = open_idle(port, IDLE_SOCKETS)
        try:
            # While they are held (within the server's 5 s opening-handshake
            # timeout, so none of them went away by itself yet): probe.
            latencies = []
            for _ in range(PROBES):
                sent = time.monotonic()
                status = http_status(port, "/healthz")
                latencies.append(round(time.monotonic() - sent, 3))
                assert status == 200, (latencies, log.read_text(errors="replace")[-3000:])
                time.sleep(PROBE_EVERY)
            print(f"/healthz under {IDLE_SOCKETS} idle sockets: {max(latencies):.3f} s max")
        finally:
            for sock in socks:
                sock.close()
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        deadline = time.monotonic() + 30
        while http_status(port, "/readyz") != 200:  # still up and ready afterwards
            assert time.monotonic() < deadline
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    text = log.read_text(errors="replace")
    accept_errors = text.count("socket.accept() out of system resource")
    print(f"log: {len(text)} bytes, {accept_errors} accept-error lines")
    assert accept_errors <= 3, text[-3000:]
    assert text.count("Traceback") <= 3, text[-3000:]
    assert len(text) < 20_000, text[-3000:]
