"""The daemon end to end: ``python -m streamer serve`` with the real model.

A real process, a real French clip paced in real time, real WebSocket
clients on loopback. Clients connect while the model is still loading (the
server listens first), read every event until the server closes them, and
the process must exit 0 on its own (clip over) or on SIGTERM
(``--keep-serving``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.frames import CloseCode

from streamer.testing.net import free_port

pytestmark = pytest.mark.slow

MP3 = "common_voice_fr_17767732.mp3"
STREAM = "cv"
START_TIMEOUT = 30.0  # the server listens within a second or two of starting
RUN_TIMEOUT = 120.0  # model load + a 4 s clip in real time on 2 busy cores
EXIT_TIMEOUT = 30.0

WireCheck = Callable[..., dict[str, Any]]


def write_config(tmp_path: Path, clip: Path, port: int, whisper_input: str = "padded") -> Path:
    config = tmp_path / "serve.toml"
    config.write_text(
        f"""
[streaming]
chunk_ms = 1000
whisper_input = "{whisper_input}"

[[sources]]
type = "file"
stream = "{STREAM}"
path = "{clip}"
pace = "realtime"

[websocket]
host = "127.0.0.1"
port = {port}

[console]
enabled = true
partials = true
""",
        encoding="utf-8",
    )
    return config


@dataclass
class Daemon:
    """A running ``streamer serve`` with its output collected as it comes."""

    proc: asyncio.subprocess.Process
    port: int
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    readers: list[asyncio.Task[None]] = field(default_factory=list)
    clients: list[ClientConnection] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/captions"

    def output(self) -> str:
        return f"--- stdout\n{''.join(self.stdout)}--- stderr\n{''.join(self.stderr)}"

    async def wait_exit(self, timeout: float = EXIT_TIMEOUT) -> int:
        async with asyncio.timeout(timeout):
            code = await self.proc.wait()
            await asyncio.gather(*self.readers)  # pipes read to their end
        return code


async def _collect(stream: asyncio.StreamReader | None, sink: list[str]) -> None:
    assert stream is not None
    while line := await stream.readline():
        sink.append(line.decode("utf-8", "replace"))


@contextlib.asynccontextmanager
async def serve(config: Path, port: int, env: dict[str, str], *extra: str) -> AsyncIterator[Daemon]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "streamer",
        "serve",
        "-c",
        str(config),
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    daemon = Daemon(proc, port)
    daemon.readers = [
        asyncio.create_task(_collect(proc.stdout, daemon.stdout), name="daemon-stdout"),
        asyncio.create_task(_collect(proc.stderr, daemon.stderr), name="daemon-stderr"),
    ]
    try:
        yield daemon
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for task in daemon.readers:
            task.cancel()
        await asyncio.gather(*daemon.readers, return_exceptions=True)
        for ws in daemon.clients:  # the peer is gone: closing returns at once
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 5)


async def connect_when_up(daemon: Daemon, query: str = "") -> ClientConnection:
    """Connect as soon as the server listens; fail early if the process died."""
    async with asyncio.timeout(START_TIMEOUT):
        while True:
            if daemon.proc.returncode is not None:
                pytest.fail(f"serve exited with {daemon.proc.returncode}\n{daemon.output()}")
            try:
                ws = await connect(daemon.url + query, open_timeout=5)
            except OSError:  # not listening yet
                await asyncio.sleep(0.1)
                continue
            daemon.clients.append(ws)
            return ws


async def http_status(port: int, path: str) -> int:
    """Status code of a plain ``GET path`` (the probes are not WebSocket routes)."""
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            await writer.drain()
            status_line = await reader.readline()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", status_line)
    assert match, status_line
    return int(match.group(1))


async def read_until_closed(ws: ClientConnection, events: list[dict[str, Any]]) -> None:
    """Append every event (parsed) until the server closes the connection."""
    async for message in ws:
        assert isinstance(message, str), message
        events.append(json.loads(message))


def check_caption_events(
    events: list[dict[str, Any]], wire_event: WireCheck, *, partials: bool
) -> dict[str, Any]:
    """The stream's events are well-formed and ordered; returns the one final.

    ``partials``: require at least one partial before the final.
    """
    for event in events:
        wire_event(event)
    assert {e["stream"] for e in events} == {STREAM}
    seqs = [e["seq"] for e in events]
    assert all(a < b for a, b in itertools.pairwise(seqs)), seqs
    kinds = [e["type"] for e in events]
    finals = [e for e in events if e["type"] == "final"]
    assert len(finals) == 1, kinds  # one sentence, one segment
    if partials:
        assert kinds.index("final") > 0, f"no partial before the final: {kinds}"
    assert kinds[-1] == "final", kinds
    final = finals[0]
    for partial in events[:-1]:
        assert partial["segment"] == final["segment"]
        # Committed text is a promise: the final keeps it.
        assert final["text"].startswith(partial["committed"]), (partial, final)
    assert "national assembly" in final["text"].lower(), final
    assert final["lang"] == "fr"
    assert 0 <= final["start"] < final["end"] <= 5.0, final
    return final


def assert_final_printed(daemon: Daemon, final: dict[str, Any]) -> None:
    lines = "".join(daemon.stdout).splitlines()
    kept = [line for line in lines if line.startswith(f"[{STREAM} ")]
    pattern = rf"\[{STREAM} \d+\.\d–\d+\.\ds\] {re.escape(final['text'])}"
    assert len(kept) == 1 and re.fullmatch(pattern, kept[0]), lines
    assert all(line.startswith(("~ ", f"[{STREAM} ")) for line in lines), lines


@pytest.mark.usefixtures("whisper_base_dir")
async def test_serve_file_source_to_websocket_clients(
    tmp_path: Path, audio_dir: Path, cli_env: dict[str, str], wire_event: WireCheck
) -> None:
    # Partials need a decode to finish before the 4 s clip ends; with the
    # 30 s-padded encoder that takes ~1.7 s on 2 idle cores and loses the race
    # on a loaded machine. The trimmed input decodes ~4x faster.
    port = free_port()
    config = write_config(tmp_path, audio_dir / MP3, port, whisper_input="trimmed")
    async with serve(config, port, cli_env) as daemon:
        ws = await connect_when_up(daemon)
        # Listening comes first, then torch and the model load (seconds).
        assert await http_status(port, "/readyz") == 503
        assert await http_status(port, "/healthz") == 200
        other = await connect_when_up(daemon, "?streams=other")
        events: list[dict[str, Any]] = []
        others: list[dict[str, Any]] = []
        async with asyncio.timeout(RUN_TIMEOUT):
            await asyncio.gather(read_until_closed(ws, events), read_until_closed(other, others))
        assert ws.close_code == CloseCode.GOING_AWAY, (ws.close_code, ws.close_reason)
        assert other.close_code == CloseCode.GOING_AWAY
        assert others == []
        final = check_caption_events(events, wire_event, partials=True)
        code = await daemon.wait_exit()
        assert code == 0, daemon.output()
        assert "Traceback" not in "".join(daemon.stderr), daemon.output()
        assert_final_printed(daemon, final)


@pytest.mark.usefixtures("whisper_base_dir")
async def test_keep_serving_until_sigterm(
    tmp_path: Path, audio_dir: Path, cli_env: dict[str, str], wire_event: WireCheck
) -> None:
    port = free_port()
    config = write_config(tmp_path, audio_dir / MP3, port)  # the default, padded input
    async with serve(config, port, cli_env, "--keep-serving") as daemon:
        ws = await connect_when_up(daemon)
        events: list[dict[str, Any]] = []
        async with asyncio.timeout(RUN_TIMEOUT):
            while not events or events[-1]["type"] != "final":
                events.append(json.loads(await ws.recv()))
        # The clip is over and finalised; the daemon keeps serving.
        assert await http_status(port, "/healthz") == 200
        assert await http_status(port, "/readyz") == 200
        assert daemon.proc.returncode is None
        final = check_caption_events(events, wire_event, partials=False)

        daemon.proc.send_signal(signal.SIGTERM)
        rest: list[dict[str, Any]] = []
        async with asyncio.timeout(EXIT_TIMEOUT):
            await read_until_closed(ws, rest)
        assert rest == []  # the stream had already ended: nothing new at shutdown
        assert ws.close_code == CloseCode.GOING_AWAY, (ws.close_code, ws.close_reason)
        code = await daemon.wait_exit()
        assert code == 0, daemon.output()
        stderr = "".join(daemon.stderr)
        assert "SIGTERM received" in stderr and "Traceback" not in stderr, daemon.output()
        assert_final_printed(daemon, final)
