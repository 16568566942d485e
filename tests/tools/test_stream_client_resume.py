"""tools/stream_client.py resumes a broken stream: its audio log, and a real blip.

The blip is a :class:`~streamer.testing.mosquitto.TcpGate` between the client
and a real daemon (App, tiny model, VAD off, one final per second of audio):
closing the gate cuts the connection like a network failure; the client
reconnects through it and resumes. The cluster case (another daemon behind
HAProxy) is tests/service/test_cluster.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamer.testing.mosquitto import TcpGate
from tools import stream_client
from tools.stream_client import RATE, AudioLog, StreamClient, StreamOptions

from ..service.test_ingest import clip_pcm, make_config, running

TIMEOUT = 60.0


def pcm(samples: int, value: int = 1) -> bytes:
    return np.full(samples, value, dtype="<i2").tobytes()


async def test_audio_log_keeps_what_a_resume_needs() -> None:
    log = AudioLog(live=False)
    await log.append(pcm(16000, 1) + pcm(16000, 2))
    log.restart(log.resume_point())
    assert await log.next_chunk(8000) == pcm(8000, 1)
    log.finalised(16000)  # a final up to 1 s; only 0.5 s was sent: keep the rest
    assert (log.base, log.keep_from) == (8000, 16000)
    assert await log.next_chunk(24000) == pcm(8000, 1) + pcm(16000, 2)
    assert log.base == 16000  # sent and finalised: dropped
    # The connection breaks: a new one starts again at the end of the last final.
    assert log.resume_point() == 16000
    log.restart(16000)
    assert await log.next_chunk(RATE) == pcm(16000, 2)
    log.end()
    assert await log.next_chunk(RATE) == b""


async def test_audio_log_of_a_file_waits_for_the_sender_a_microphone_drops_oldest() -> None:
    file = AudioLog(live=False)
    await file.append(pcm(round(stream_client.AHEAD_S * RATE) + 1))
    blocked = asyncio.create_task(file.append(pcm(10)))
    await asyncio.sleep(0)
    assert not blocked.done()  # the file is not read further ahead
    file.restart(0)
    await file.next_chunk(RATE)
    await asyncio.wait_for(blocked, 5)
    mic = AudioLog(live=True)
    keep = round(stream_client.KEEP_S * RATE)
    await mic.append(pcm(keep))
    await mic.append(pcm(RATE))  # never waits; the oldest second goes
    assert (mic.base, mic.dropped, mic.resume_point()) == (RATE, RATE, RATE)


def finals(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == "final"]


async def test_client_resumes_through_a_network_blip(tiny_whisper: Path) -> None:
    data, _, duration = clip_pcm()
    cfg = make_config(tiny_whisper, vad=False)
    cfg = dataclasses.replace(cfg, streaming=dataclasses.replace(cfg.streaming, max_segment_s=1.0))
    events: list[dict[str, Any]] = []
    lines: list[str] = []
    first_final, resumed = asyncio.Event(), asyncio.Event()

    def on_event(event: dict[str, Any], text: str) -> None:
        assert json.loads(text) == event
        events.append(event)
        if event["type"] == "final":
            first_final.set()

    def say(line: str) -> None:
        lines.append(line)
        if line.startswith("resumed stream"):
            resumed.set()

    async def source() -> AsyncIterator[bytes]:
        half = len(data) // 4 * 2
        for i in range(0, half, 3200):
            yield data[i : min(i + 3200, half)]
        await resumed.wait()  # the rest once the stream was resumed
        for i in range(half, len(data), 3200):
            yield data[i : i + 3200]

    async with running(cfg) as app:
        assert app.server is not None
        gate = TcpGate("127.0.0.1", app.server.port)
        await gate.open()
        opts = StreamOptions(url=f"ws://127.0.0.1:{gate.port}/v1/stream", stream="blip")
        client = StreamClient(opts, on_event, say)
        task = asyncio.create_task(client.run(source(), asyncio.Event()))
        try:
            await asyncio.wait_for(first_final.wait(), TIMEOUT)
            await gate.close()  # the network fails...
            await gate.open()  # ...and comes back
            assert await asyncio.wait_for(task, TIMEOUT) == 0, lines
        finally:
            await gate.close()
    assert client.resumes == 1 and any("resuming stream blip" in line for line in lines), lines
    got = finals(events)
    assert got[0]["start"] == 0.0 and got[-1]["end"] == pytest.approx(duration, abs=0.01)
    assert all(b["start"] == a["end"] for a, b in itertools.pairwise(got)), got
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(set(seqs)), seqs
