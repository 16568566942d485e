"""Fuzzing /v1/stream with random frame sequences against one running daemon.

Whatever a client sends, it gets either its stream served or a JSON error and
one of the documented close codes, and the daemon keeps serving everybody
else. The daemon runs in a background thread's event loop so that Hypothesis
drives plain (synchronous) examples.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from streamer.service.app import App

from .test_ingest import TIMEOUT, http_status, make_config, marker, ws_url

DOCUMENTED = {1000, 1003, 1007, 1008, 1009}
START_KEYS = ["type", "stream", "sample_rate", "encoding", "channels", "language", "task",
              "token", "partials", "model"]  # fmt: skip

json_values = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=False),
    st.text(max_size=20), st.sampled_from(["start", "stop", "pcm_s16le", "pcm_f32le", "auto"]),
)  # fmt: skip
start_like = st.dictionaries(st.sampled_from(START_KEYS), json_values, max_size=6).map(json.dumps)
valid_start = st.builds(
    lambda rate, enc, ch: json.dumps(
        {"type": "start", "sample_rate": rate, "encoding": enc, "channels": ch}
    ),
    st.sampled_from([8000, 16000, 44100, 48000]),
    st.sampled_from(["pcm_s16le", "pcm_f32le"]),
    st.integers(1, 2),
)
frames = st.lists(
    st.one_of(
        st.binary(max_size=4096),
        st.text(max_size=64),
        start_like,
        valid_start,
        st.just('{"type":"stop"}'),
        st.just(b"\x00" * 5000),  # over the 4 KiB frame limit
    ),
    max_size=6,
)


@pytest.fixture(scope="module")
def daemon(tiny_whisper: Path) -> Iterator[tuple[App, asyncio.AbstractEventLoop]]:
    cfg = make_config(tiny_whisper, max_frame_bytes=4096, idle_timeout_s=5.0)
    loop = asyncio.new_event_loop()
    app = App(cfg, keep_serving=True)
    result: dict[str, Any] = {}

    def serve() -> None:
        asyncio.set_event_loop(loop)
        result["code"] = loop.run_until_complete(app.run())

    thread = threading.Thread(target=serve, name="daemon", daemon=True)
    thread.start()

    async def ready() -> None:
        while not app.ready:
            await asyncio.sleep(0.02)

    while not loop.is_running():
        threading.Event().wait(0.01)
    asyncio.run_coroutine_threadsafe(ready(), loop).result(TIMEOUT)
    yield app, loop
    loop.call_soon_threadsafe(app.request_stop)
    thread.join(TIMEOUT)
    assert result.get("code") == 0


async def one_client(app: App, sequence: list[str | bytes], n: int) -> None:
    async with connect(ws_url(app, "/v1/captions?streams=marker")) as sub:
        received: list[dict[str, Any]] = []
        async with connect(ws_url(app, "/v1/stream"), max_size=None) as ws:
            with contextlib.suppress(ConnectionClosed):
                for frame in sequence:
                    await ws.send(frame)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        async for message in ws:
                            received.append(json.loads(message))
        code = ws.close_code
        assert code is None or code in DOCUMENTED or code == 1000, (code, ws.close_reason)
        for message in received:
            assert message["type"] in {"ready", "partial", "final", "error"}, message
            if message["type"] == "error":
                assert message["code"] == code and message["message"]
        # Everybody else is still served.
        async with asyncio.timeout(TIMEOUT):
            while app.fanout.subscribers < 1:
                await asyncio.sleep(0.01)
        app.fanout.publish(marker(n))
        event = json.loads(await asyncio.wait_for(sub.recv(), TIMEOUT))
        assert event["seq"] == n
    assert await asyncio.to_thread(http_status, app, "/healthz") == 200


counter = iter(range(1, 10**6))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(sequence=frames)
def test_random_frames_never_hurt_the_daemon(
    daemon: tuple[App, asyncio.AbstractEventLoop], sequence: list[str | bytes]
) -> None:
    app, loop = daemon
    n = next(counter)
    asyncio.run_coroutine_threadsafe(one_client(app, sequence, n), loop).result(TIMEOUT * 2)
    assert app.engine is not None and app.engine.alive
