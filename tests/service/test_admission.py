"""Admission from measured load: the real daemon (App) with an engine made slow.

Every Whisper decoder layer call sleeps in proportion to its batch rows, so
the tiny model costs like a big one on a CPU (linear in streams): two live
client streams saturate the engine. Then a new ``/v1/stream`` client gets 503
with the reason and ``/readyz`` says 503 with it; once the engine is fast
again and the streams end, both recover.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from streamer.config import (
    AdmissionConfig,
    Config,
)
from streamer.service.app import App
from streamer.testing.daemon import client_config, running_app

TIMEOUT = 60.0  # only a hang reaches it
RATE = 16000
#: Seconds each decoder layer call sleeps per batch row while the engine is "slow".
SLOW_S = 0.02


def config(model: Path, **admission: Any) -> Config:
    return client_config(
        model,
        vad=False,
        max_audio_rate=4.0,
        sections={
            "admission": dataclasses.replace(AdmissionConfig(load_window_s=2.0), **admission)
        },
    )


def running(cfg: Config) -> contextlib.AbstractAsyncContextManager[App]:
    return running_app(cfg, TIMEOUT)


def get(app: App, path: str) -> tuple[int, str]:
    assert app.server is not None
    url = f"http://127.0.0.1:{app.server.port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


def stream_url(app: App) -> str:
    assert app.server is not None
    return f"ws://127.0.0.1:{app.server.port}/v1/stream"


def tone(seconds: float) -> bytes:
    t = np.arange(round(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2").tobytes()


async def start(app: App, stream: str) -> ClientConnection:
    ws = await connect(stream_url(app))
    await ws.send(json.dumps({"type": "start", "stream": stream, "sample_rate": RATE}))
    assert json.loads(await ws.recv())["type"] == "ready"
    return ws


async def feed(ws: ClientConnection) -> None:
    """Real-time audio until cancelled."""
    chunk = tone(0.1)
    with contextlib.suppress(ConnectionClosed):
        while True:
            await ws.send(chunk)
            await asyncio.sleep(0.1)


async def finish(ws: ClientConnection) -> None:
    await ws.send('{"type": "stop"}')
    async with asyncio.timeout(TIMEOUT):
        with contextlib.suppress(ConnectionClosed):
            async for _ in ws:
                pass
    assert ws.close_code == 1000, (ws.close_code, ws.close_reason)


async def until_readyz(app: App, status: int) -> str:
    async with asyncio.timeout(TIMEOUT):
        while True:
            code, body = await asyncio.to_thread(get, app, "/readyz")
            if code == status:
                return body
            await asyncio.sleep(0.1)


@pytest.fixture
def slow_engine(monkeypatch: pytest.MonkeyPatch) -> dict[str, float]:
    """``state["delay"]``: seconds per batch row each decoder layer call sleeps."""
    from transformers.models.whisper.modeling_whisper import WhisperDecoderLayer

    real = WhisperDecoderLayer.forward
    state = {"delay": 0.0}

    def forward(self: Any, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        if state["delay"]:
            time.sleep(state["delay"] * hidden_states.shape[0])  # cost linear in rows
        return real(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(WhisperDecoderLayer, "forward", forward)
    return state


async def test_saturated_engine_refuses_new_streams_and_readyz_says_why(
    tiny_whisper: Path, slow_engine: dict[str, float]
) -> None:
    async with running(config(tiny_whisper)) as app:
        code, body = await asyncio.to_thread(get, app, "/readyz")
        assert code == 200 and "admission: open" in body
        slow_engine["delay"] = SLOW_S
        streams = [await start(app, "a"), await start(app, "b")]
        feeders = [asyncio.create_task(feed(ws)) for ws in streams]
        try:
            body = await until_readyz(app, 503)
            assert "admission: refusing new streams: engine saturated: " in body, body
            with pytest.raises(InvalidStatus) as refused:
                await connect(stream_url(app))
            response = refused.value.response
            assert response.status_code == 503
            reason = response.body.decode()
            assert reason.startswith("engine saturated: "), reason
            _, metrics = await asyncio.to_thread(get, app, "/metrics")
            assert "streamer_admission_saturated 1.0" in metrics
            assert 'reason="saturated"' in metrics
            load = [
                line for line in metrics.splitlines() if line.startswith("streamer_engine_load")
            ]
            assert load and float(load[0].split()[-1]) > 0.5, load
        finally:
            slow_engine["delay"] = 0.0  # the load stops: fast again, streams end
            for task in feeders:
                task.cancel()
            await asyncio.gather(*feeders, return_exceptions=True)
        for ws in streams:
            await finish(ws)
        body = await until_readyz(app, 200)
        assert "admission: open" in body
        again = await start(app, "c")  # new clients are served again
        await again.send(tone(1.0))
        await finish(again)


@pytest.mark.parametrize("enabled", [True, False])
async def test_burst_on_a_fresh_daemon_gets_warmup_streams_in(
    tiny_whisper: Path, enabled: bool
) -> None:
    async with running(config(tiny_whisper, enabled=enabled, warmup_streams=1)) as app:
        first = await start(app, "a")  # no cost measured yet: one stream only
        if enabled:
            with pytest.raises(InvalidStatus) as refused:
                await connect(stream_url(app))
            assert refused.value.response.status_code == 503
            assert b"engine load not measured yet" in refused.value.response.body
            await finish(first)
            assert app.ingest is not None
            async with asyncio.timeout(TIMEOUT):  # its connection is gone on our side too
                while app.ingest.active:
                    await asyncio.sleep(0.01)
            await finish(await start(app, "b"))  # no stream live: admitted
        else:  # admission off: only max_streams limits clients
            second = await start(app, "b")
            code, body = await asyncio.to_thread(get, app, "/readyz")
            assert code == 200 and "admission: off" in body
            await finish(second)
            await finish(first)


async def test_a_client_sending_ahead_of_real_time_does_not_close_the_door(
    tiny_whisper: Path, slow_engine: dict[str, float]
) -> None:
    # A client sending as fast as the server reads keeps the slow engine busy and
    # its own lag growing, by design: that work yields to live streams (Scheduler),
    # so it must not make the daemon refuse them, and /readyz stays 200.
    async with running(config(tiny_whisper, warmup_streams=4)) as app:
        slow_engine["delay"] = SLOW_S
        bulk = await start(app, "bulk")

        async def flood() -> None:
            with contextlib.suppress(ConnectionClosed):
                for _ in range(600):  # 60 s of audio, read at 4x real time
                    await bulk.send(tone(0.1))

        flooding = asyncio.create_task(flood())
        try:
            assert app.factory is not None
            async with asyncio.timeout(TIMEOUT):  # the engine is busy with the bulk stream
                while app.engine is None or app.engine.stats.bulk_seconds < 3.0:
                    await asyncio.sleep(0.1)
            assert app.factory.runners["bulk"].ahead_seconds > 3.0
            code, body = await asyncio.to_thread(get, app, "/readyz")
            assert code == 200 and "admission: open" in body, body
            live = await start(app, "live")
            await live.send(tone(1.0))
            await finish(live)
        finally:
            flooding.cancel()
            slow_engine["delay"] = 0.0
            await asyncio.gather(flooding, return_exceptions=True)
        await finish(bulk)
