"""SIGTERM with ``/v1/stream`` clients connected: nothing they sent is lost.

A real daemon process (tiny Whisper, VAD off so every sample belongs to a
segment), real WebSocket clients: one that sent audio and went quiet, one
still sending when the signal comes. Each must get the finals of all the
audio the server took, then a 1001 close, with no error and no traceback in
the log; the daemon exits 0. The unit's stop timeout must cover the flush.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from streamer.service.app import SHUTDOWN_MAX_S
from streamer.testing.daemon import DaemonProcess, tiny_model_config

TIMEOUT = 60.0
RATE = 16000
REPO = Path(__file__).resolve().parents[2]


def tone(seconds: float) -> bytes:
    """Audible, deterministic s16 audio (the tiny random model decodes anything)."""
    t = np.arange(round(seconds * RATE)) / RATE
    wave = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * np.sin(2 * np.pi * 1333 * t)
    return (wave * 32767).astype("<i2").tobytes()


def start(stream: str) -> str:
    return json.dumps({"type": "start", "stream": stream, "sample_rate": RATE})


async def collect(ws: ClientConnection, events: list[dict[str, Any]]) -> None:
    with contextlib.suppress(ConnectionClosed):
        async for message in ws:
            assert isinstance(message, str)
            events.append(json.loads(message))


async def until(check: Callable[[], bool], what: str) -> None:
    async with asyncio.timeout(TIMEOUT):
        while not check():
            await asyncio.sleep(0.02)


def received_seconds(port: int) -> float:
    """The daemon's ``streamer_audio_received_seconds_total`` (client audio it read)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith("streamer_audio_received_seconds_total "):
            return float(line.split()[1])
    return 0.0


async def until_received(daemon: DaemonProcess, seconds: float) -> None:
    async with asyncio.timeout(TIMEOUT):
        while await asyncio.to_thread(received_seconds, daemon.port) < seconds - 1e-6:
            await asyncio.sleep(0.02)


def covered(events: list[dict[str, Any]]) -> float:
    """The furthest audio any event of the stream showed (seconds)."""
    return max((e["end"] for e in events if e.get("type") in ("partial", "final")), default=0.0)


def check_finals(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """No error; finals in order, one per segment, the last covering every partial."""
    assert not [e for e in events if e.get("type") == "error"], events
    finals = [e for e in events if e.get("type") == "final"]
    assert finals, events
    assert [f["segment"] for f in finals] == sorted({f["segment"] for f in finals})
    seqs = [e["seq"] for e in events if "seq" in e]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert finals[-1]["end"] >= covered(events) - 1e-3, (finals[-1], covered(events))
    return finals


async def test_sigterm_flushes_every_client_then_closes_1001(
    tiny_whisper: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    daemon = DaemonProcess.start(
        tmp_path, tiny_model_config(tiny_whisper, "max_audio_rate = 4.0"), cli_env
    )
    try:
        await daemon.wait_ready()
        quiet_events: list[dict[str, Any]] = []
        busy_events: list[dict[str, Any]] = []
        async with (
            connect(daemon.url("/v1/stream")) as quiet,
            connect(daemon.url("/v1/stream")) as busy,
        ):
            await quiet.send(start("quiet"))
            await busy.send(start("busy"))
            assert json.loads(await quiet.recv())["type"] == "ready"
            assert json.loads(await busy.recv())["type"] == "ready"
            readers = [
                asyncio.create_task(collect(quiet, quiet_events)),
                asyncio.create_task(collect(busy, busy_events)),
            ]
            # quiet: 3 s of audio, taken by the server (a partial shows it), then silence
            for i in range(0, len(tone(3.0)), 3200):
                await quiet.send(tone(3.0)[i : i + 3200])
            await until_received(daemon, 3.0)  # the server took all of it

            async def keep_sending() -> None:
                chunk = tone(0.01)  # small frames, often: one lands mid-shutdown
                with contextlib.suppress(ConnectionClosed):
                    while True:
                        await busy.send(chunk)
                        await asyncio.sleep(0.005)  # 2x real time: never throttled

            sender = asyncio.create_task(keep_sending())
            await until_received(daemon, 4.0)  # and some of busy's audio
            daemon.signal(signal.SIGTERM)  # mid-stream for busy, idle for quiet
            async with asyncio.timeout(TIMEOUT):
                await asyncio.gather(*readers)
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
        assert quiet.close_code == 1001 and busy.close_code == 1001, (
            quiet.close_code,
            quiet.close_reason,
            busy.close_code,
            busy.close_reason,
        )
        quiet_finals = check_finals(quiet_events)
        assert abs(quiet_finals[-1]["end"] - 3.0) < 0.05  # all of it, and nothing more
        check_finals(busy_events)
        assert await daemon.wait_exit(TIMEOUT) == 0
        log = daemon.log
        assert "Traceback" not in log, log
        assert "after end of stream" not in log and "past its end" not in log, log
    finally:
        daemon.kill()


async def test_new_clients_are_refused_once_shutdown_began(
    tiny_whisper: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    from streamer.config import Config, ConsoleConfig, ModelConfig, VadConfig, WebSocketConfig
    from streamer.service.app import App

    cfg = Config(
        model=ModelConfig(id=str(tiny_whisper), device="cpu", source_language="en"),
        vad=VadConfig(enabled=False),
        sources=(),
        websocket=WebSocketConfig(port=0),
        console=ConsoleConfig(enabled=False),
    )
    app = App(cfg, keep_serving=True)
    task = asyncio.create_task(app.run())
    await until(lambda: app.ready, "ready")
    assert app.ingest is not None and app.server is not None
    port = app.server.port
    async with connect(f"ws://127.0.0.1:{port}/v1/stream") as ws:
        await ws.send(start("held"))
        await ws.recv()
        await ws.send(tone(1.0))
        app.request_stop()
        await until(lambda: app.ingest is not None and app.ingest.stopping, "stopping")
        from websockets.exceptions import InvalidStatus

        with contextlib.suppress(OSError):  # refused at the door, or the port closed
            try:
                await connect(f"ws://127.0.0.1:{port}/v1/stream")
            except InvalidStatus as exc:
                assert exc.response.status_code == 503
            else:
                raise AssertionError("a new stream was accepted during shutdown")
        events: list[dict[str, Any]] = []
        await collect(ws, events)
    assert ws.close_code == 1001
    assert check_finals(events)[-1]["end"] == 1.0
    assert await asyncio.wait_for(task, TIMEOUT) == 0


def test_unit_stop_timeout_covers_the_flush() -> None:
    unit = (REPO / "systemd" / "streamer.service").read_text(encoding="utf-8")
    match = re.search(r"^TimeoutStopSec=(\d+)$", unit, re.MULTILINE)
    assert match is not None
    assert int(match.group(1)) >= SHUTDOWN_MAX_S + 10
