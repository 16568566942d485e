"""``/v1/stream`` with ``start.resume``: a real daemon (App), real sockets, real audio.

VAD off and ``max_segment_s = 1`` make every second of audio one final, so the
finals of a stream must tile its audio exactly: each starts where the one
before ended. The cluster case (another daemon, HAProxy, MQTT) is in
test_cluster.py; here one daemon, where a resumed stream's earlier session may
still be finishing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from streamer.config import Config
from streamer.service.app import App
from streamer.service.resume import SEQ_GAP

from ..conftest import check_wire_event
from .test_ingest import TIMEOUT, clip_pcm, make_config, read_all, running, send_pcm, ws_url

SEGMENT_S = 1.0


def config(model: Path) -> Config:
    cfg = make_config(model, vad=False)
    return dataclasses.replace(
        cfg, streaming=dataclasses.replace(cfg.streaming, max_segment_s=SEGMENT_S)
    )


def finals(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("type") == "final"]


def assert_tiles(events: list[dict[str, Any]], start: float, end: float) -> None:
    """Finals cover ``[start, end]`` exactly once, in order; seq strictly rises."""
    got = finals(events)
    assert got, events
    assert got[0]["start"] == pytest.approx(start, abs=1e-3), got
    for a, b in itertools.pairwise(got):
        assert b["start"] == a["end"], (a, b)  # contiguous: no gap, no overlap
    assert got[-1]["end"] == pytest.approx(end, abs=0.01), got
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(set(seqs)), seqs


async def open_stream(
    app: App, stream: str, **fields: Any
) -> tuple[ClientConnection, dict[str, Any]]:
    ws = await connect(ws_url(app, "/v1/stream"))
    await ws.send(json.dumps({"type": "start", "stream": stream, "sample_rate": 16000, **fields}))
    ready = json.loads(await ws.recv())
    return ws, ready


async def resume_when_free(
    app: App, stream: str, seq: int, offset: float
) -> tuple[ClientConnection, dict[str, Any]]:
    """A client's reconnect: 1013 (the old connection not yet noticed gone) means retry."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            ws, ready = await open_stream(app, stream, resume={"seq": seq, "offset": offset})
            if ready["type"] == "ready":
                return ws, ready
            assert ready["code"] == 1013 and "in use" in ready["message"], ready
            await ws.wait_closed()
            await asyncio.sleep(0.05)  # a client's backoff


async def test_resume_elsewhere_continues_seq_and_the_stream_clock(tiny_whisper: Path) -> None:
    data, _, duration = clip_pcm()
    async with (
        running(config(tiny_whisper)) as app,
        connect(ws_url(app, "/v1/captions?streams=carol&kinds=final")) as sub,
    ):
        ws, ready = await open_stream(app, "carol", resume={"seq": 41, "offset": 2.5})
        assert ready["resume"] == {"seq": 41 + SEQ_GAP, "offset": 2.5}
        await send_pcm(ws, data)
        await ws.send('{"type": "stop"}')
        own = await read_all(ws)
        assert ws.close_code == 1000
        seen = [json.loads(await asyncio.wait_for(sub.recv(), TIMEOUT)) for _ in finals(own)]
    for event in own:
        check_wire_event(event)
    assert min(e["seq"] for e in own) > 41 + SEQ_GAP
    assert_tiles(own, 2.5, 2.5 + duration)
    for event in finals(own):
        assert all(event["start"] <= w["start"] <= w["end"] <= event["end"] + 1e-3
                   for w in event.get("words", []))  # fmt: skip
    assert seen == finals(own)


async def test_resume_never_moves_seq_back(tiny_whisper: Path) -> None:
    """Neither below what this process numbered nor below the durable marks: a
    client claiming ``seq`` 0 gets the finals it says it missed (replayed, with
    their own numbers), and every new event is numbered above all of them."""
    data, _, _ = clip_pcm()

    async def stream(app: App, seconds: int, **fields: Any) -> list[dict[str, Any]]:
        ws, ready = await open_stream(app, "dave", **fields)
        assert ready["type"] == "ready", ready
        await send_pcm(ws, data[: 16000 * 2 * seconds])
        await ws.send('{"type": "stop"}')
        return await read_all(ws)

    async with running(config(tiny_whisper)) as app:
        first = await stream(app, 2)
        again = await stream(app, 3, resume={"seq": 0, "offset": 0})
    assert [e for e in again if e.get("replay")] == [{**e, "replay": True} for e in first]
    new = [e for e in again if not e.get("replay")]
    assert new and min(e["seq"] for e in new) > max(e["seq"] for e in first)
    assert_tiles(first + new, 0.0, 3.0)
    async with running(config(tiny_whisper)) as restarted:  # same state folder, no history
        later = await stream(restarted, 1, resume={"seq": 3, "offset": 0})
    assert min(e["seq"] for e in later) > max(e["seq"] for e in again)


async def test_resume_on_the_daemon_that_finalised_the_rest_replays_it(tiny_whisper: Path) -> None:
    """The connection breaks after a final; the daemon finalises what it had read.
    The client resumes from its last final: it gets the finals it missed (marked
    ``replay``), the daemon drops the audio they cover, and everybody sees each
    stretch once."""
    data, _, duration = clip_pcm()
    async with (
        running(config(tiny_whisper)) as app,
        connect(ws_url(app, "/v1/captions?streams=erin&kinds=final")) as sub,
    ):
        ws, ready = await open_stream(app, "erin")
        await send_pcm(ws, data)  # all of it, but no stop
        got: list[dict[str, Any]] = []
        async with asyncio.timeout(TIMEOUT):
            while not finals(got):
                got.append(json.loads(await ws.recv()))
        assert ws.transport is not None
        ws.transport.abort()  # the network dropped it: no close frame
        last = finals(got)[-1]
        ws, ready = await resume_when_free(app, "erin", got[-1]["seq"], last["end"])
        assert ready["resume"]["offset"] > last["end"]  # the daemon had finalised more
        await send_pcm(ws, data[round(last["end"] * 16000) * 2 :])  # from its last final
        await ws.send('{"type": "stop"}')
        resumed = await read_all(ws)
        assert ws.close_code == 1000
        everybody: list[dict[str, Any]] = []
        with contextlib.suppress(TimeoutError, ConnectionClosed):
            async with asyncio.timeout(2.0):  # nothing more than the client got
                while True:
                    everybody.append(json.loads(await sub.recv()))
    replayed = [e for e in resumed if e.get("replay")]
    assert replayed and replayed == finals(resumed)[: len(replayed)]
    assert min(e["seq"] for e in replayed) > got[-1]["seq"]
    client = got + resumed
    assert_tiles(client, 0.0, duration)
    assert [{k: v for k, v in e.items() if k != "replay"} for e in finals(client)] == everybody


async def test_resuming_a_live_stream_is_try_again_later(tiny_whisper: Path) -> None:
    async with running(config(tiny_whisper)) as app:
        ws, ready = await open_stream(app, "frank")
        assert ready["type"] == "ready"
        _, taken = await open_stream(app, "frank")
        assert (taken["type"], taken["code"]) == ("error", 1008)
        _, busy = await open_stream(app, "frank", resume={"seq": 1, "offset": 0})
        assert (busy["type"], busy["code"]) == ("error", 1013) and "in use" in busy["message"]
        _, bad = await open_stream(app, "frank", resume={"seq": -1, "offset": 0})
        assert (bad["type"], bad["code"]) == ("error", 1008) and "resume.seq" in bad["message"]
        await ws.close()
