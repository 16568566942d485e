"""``/v1/stream`` slots belong to authenticated clients only.

Real daemon (``App``) with a token, real WebSocket clients: silent
connections without the token wait in the server's small unauthenticated
pool (per address too) and are closed at its deadline; they never hold a
``max_streams`` slot, so an authenticated client is never locked out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from .test_ingest import make_config, read_all, running, send_pcm, start_msg, ws_url

TOKEN = "s3cret"
GOOD = {"Authorization": f"Bearer {TOKEN}"}


async def test_silent_unauthenticated_clients_hold_no_stream_slot(
    tiny_whisper: Path, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    cfg = make_config(
        tiny_whisper, vad=False, auth_token_file=str(token), max_streams=2,
        max_unauthenticated=16, max_unauthenticated_per_address=4, auth_timeout_s=1.5,
    )  # fmt: skip
    async with running(cfg) as app:
        silent: list[ClientConnection] = []
        refused: list[int] = []
        for _ in range(16):  # what an attacker on one address can open
            try:
                silent.append(await connect(ws_url(app, "/v1/stream")))
            except InvalidStatus as exc:
                refused.append(exc.response.status_code)
        assert len(silent) == 4 and set(refused) == {429}
        assert app.ingest is not None and app.ingest.active == 0  # no slot taken
        t0 = time.monotonic()
        # Both slots stay free for clients with the token, header or first message.
        async with (
            connect(ws_url(app, "/v1/stream"), additional_headers=GOOD) as a,
            connect(ws_url(app, "/v1/stream"), additional_headers=GOOD) as b,
        ):
            for ws, name in ((a, "a"), (b, "b")):
                await ws.send(start_msg(stream=name))
                assert json.loads(await ws.recv())["type"] == "ready"
            assert app.ingest.active == 2
            with pytest.raises(InvalidStatus) as full:  # the limit still holds
                await connect(ws_url(app, "/v1/stream"), additional_headers=GOOD)
            assert full.value.response.status_code == 503
            await send_pcm(a, b"\x00\x10" * 8000)
            await a.send('{"type":"stop"}')
            assert (await read_all(a))[-1]["type"] == "final"
            assert a.close_code == 1000
            await b.send('{"type":"stop"}')
            await read_all(b)
        # The silent ones were closed at the deadline with a reason.
        for ws in silent:
            events = await read_all(ws)
            assert ws.close_code == 1008, (ws.close_code, ws.close_reason)
            assert events and "authentication" in events[-1]["message"]
        assert time.monotonic() - t0 < 10
        # Their places are free again: a browser-style client authenticates by message.
        async with connect(ws_url(app, "/v1/stream")) as browser:
            await browser.send(start_msg(stream="browser", token=TOKEN))
            assert json.loads(await browser.recv())["type"] == "ready"


async def test_a_full_daemon_refuses_after_the_start_message(
    tiny_whisper: Path, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    cfg = make_config(tiny_whisper, vad=False, auth_token_file=str(token), max_streams=1)
    async with (
        running(cfg) as app,
        connect(ws_url(app, "/v1/stream"), additional_headers=GOOD) as holder,
    ):
        await holder.send(start_msg(stream="holder"))
        assert json.loads(await holder.recv())["type"] == "ready"
        async with connect(ws_url(app, "/v1/stream")) as late:  # pre-auth: admitted
            await late.send(start_msg(stream="late", token=TOKEN))
            events = await read_all(late)
        assert late.close_code == 1013
        assert events == [{"type": "error", "code": 1013, "message": "too many streams"}]
        with contextlib.suppress(ConnectionClosed):
            await holder.send('{"type":"stop"}')
            await asyncio.wait_for(read_all(holder), 30)
