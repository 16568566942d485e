"""Caption server over real loopback sockets with real websockets clients."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from streamer.errors import StreamerError
from streamer.sinks.fanout import Fanout
from streamer.sinks.websocket import CaptionServer, parse_caption_query
from streamer.types import Hypothesis

TIMEOUT = 5.0


def ev(kind: str, stream: str, segment: int, seq: int, text: str = "") -> Hypothesis:
    return Hypothesis(
        kind=kind,  # type: ignore[arg-type]
        stream=stream,
        segment=segment,
        seq=seq,
        text=text or f"{kind}-{stream}-{seq}",
        committed=text if kind == "partial" else "",
        start=float(segment),
        end=float(segment) + 0.5,
        lang="en",
    )


async def until(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    """Wait for a condition of the server (polled), failing after ``timeout``."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


Factory = Callable[..., Awaitable[tuple[Fanout, CaptionServer]]]


@pytest.fixture
async def make_server() -> AsyncIterator[Factory]:
    servers: list[CaptionServer] = []

    async def make(**kwargs: Any) -> tuple[Fanout, CaptionServer]:
        fan = Fanout()
        kwargs.setdefault("drain_timeout", 2.0)
        server = CaptionServer(fan, "127.0.0.1", 0, **kwargs)
        await server.start()
        servers.append(server)
        return fan, server

    yield make
    for server in servers:
        await server.close()


def url(server: CaptionServer, path: str) -> str:
    return f"ws://127.0.0.1:{server.port}{path}"


async def read_until_closed(ws: ClientConnection) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    async with asyncio.timeout(TIMEOUT):
        try:
            async for message in ws:
                assert isinstance(message, str)
                out.append(json.loads(message))
        except ConnectionClosed:  # closed with a code other than 1000/1001
            pass
    return out


def http_get(server: CaptionServer, path: str) -> tuple[int, str]:
    """Plain HTTP GET (urllib, no upgrade headers) -> (status, body)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


# -- query parsing -----------------------------------------------------------------


def test_parse_caption_query() -> None:
    q = parse_caption_query("")
    assert q.streams is None and q.kinds == {"partial", "final", "source_lost", "source_restored"}
    assert q.history == 0
    assert parse_caption_query("history=5&streams=a").history == 5
    assert parse_caption_query("history=0").history == 0
    assert parse_caption_query("history=100").history == 100
    for bad in ("history=101", "history=-1", "history=", "history=x", "history=1.5",
                "history=1,2", "history=%201", "history=1&history=2", "history=0100"):  # fmt: skip
        with pytest.raises(ValueError, match="history"):
            parse_caption_query(bad)
    q = parse_caption_query("streams=a,%20b&kinds=final")
    assert q.streams == frozenset({"a", "b"}) and q.kinds == frozenset({"final"})
    q = parse_caption_query("streams=a&streams=c&kinds=partial")
    assert q.streams == frozenset({"a", "c"}) and q.kinds == frozenset({"partial"})
    for bad in ("kinds=partial,interim", "stream=a", "streams=", "streams=a,,b", "streams"):
        with pytest.raises(ValueError):
            parse_caption_query(bad)


# -- caption subscriptions ------------------------------------------------------------


async def test_filtered_subscriptions_receive_exactly_their_events(make_server: Factory) -> None:
    fan, server = await make_server()
    queries = {
        "all": "",
        "a": "?streams=a",
        "a_finals": "?streams=a,b&kinds=final",
        "partials": "?kinds=partial",
        "a_again": "?streams=a",
    }
    clients = {name: await connect(url(server, "/v1/captions" + q)) for name, q in queries.items()}
    await until(lambda: fan.subscribers == len(clients))

    # One partial per stream after the finals: no newer partial or final can
    # supersede it, so what each client gets is fully determined.
    events = [ev("final", s, 0, 0) for s in "abc"] + [ev("partial", s, 1, 1) for s in "abc"]
    for e in events:
        fan.publish(e)
    await server.close()  # flushes queued events, then closes with 1001

    got = {name: await read_until_closed(ws) for name, ws in clients.items()}
    wire = [e.to_wire() for e in events]
    assert got["all"] == wire
    assert got["a"] == [w for w in wire if w["stream"] == "a"]
    assert got["a_finals"] == [w for w in wire if w["stream"] in "ab" and w["type"] == "final"]
    assert got["partials"] == [w for w in wire if w["type"] == "partial"]
    assert got["a_again"] == got["a"]  # two subscribers of one stream both receive
    for ws in clients.values():
        assert ws.close_code == 1001
        assert ws.close_reason == "server shutting down"
    assert fan.subscribers == 0


async def test_two_subscribers_of_one_stream_both_receive_live(make_server: Factory) -> None:
    fan, server = await make_server()
    async with (
        connect(url(server, "/v1/captions?streams=mic0")) as one,
        connect(url(server, "/v1/captions?streams=mic0&kinds=final")) as two,
    ):
        await until(lambda: fan.subscribers == 2)
        for seq in range(3):
            fan.publish(ev("final", "mic0", seq, seq, text=f"sentence {seq} é"))
            for ws in (one, two):
                msg = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
                assert (msg["seq"], msg["text"]) == (seq, f"sentence {seq} é")
    await until(lambda: fan.subscribers == 0)  # client disconnects free subscriptions
    await until(lambda: server.subscribers == 0)


def small_buffer_socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    return sock


async def test_stalled_subscriber_is_closed_1013_others_keep_receiving(
    make_server: Factory,
) -> None:
    fan, server = await make_server(queue_finals=4)
    path = "/v1/captions?streams=a&kinds=final"
    stalled = await connect(url(server, path), sock=small_buffer_socket(server.port), max_queue=1)
    good = await connect(url(server, path), max_size=2**20)
    await until(lambda: fan.subscribers == 2)

    # Incompressible (permessage-deflate is on): a few fill the stalled socket.
    big = base64.b64encode(os.urandom(150_000)).decode()
    seq = 0
    while fan.disconnected_slow == 0:
        assert seq < 400, "stalled subscriber was never disconnected"
        fan.publish(ev("final", "a", seq, seq, text=big))
        msg = json.loads(await asyncio.wait_for(good.recv(), TIMEOUT))
        assert msg["seq"] == seq
        seq += 1
    assert fan.subscribers == 1
    for extra in range(seq, seq + 5):  # the healthy subscriber is unaffected
        fan.publish(ev("final", "a", extra, extra, text="after"))
        msg = json.loads(await asyncio.wait_for(good.recv(), TIMEOUT))
        assert (msg["seq"], msg["text"]) == (extra, "after")

    # Now read the stalled one: what reached its socket, then the close frame.
    received = await read_until_closed(stalled)
    assert stalled.close_code == 1013
    assert stalled.close_reason == "slow subscriber"
    *received, error = received
    assert error == {"type": "error", "code": 1013, "message": "slow subscriber"}
    assert [m["seq"] for m in received] == list(range(len(received)))
    assert len(received) < seq  # it really was behind
    assert server.slow_disconnects == 1
    await good.close()


async def test_shutdown_is_bounded_with_a_stuck_client(make_server: Factory) -> None:
    fan, server = await make_server(queue_finals=10_000, drain_timeout=0.3)
    path = "/v1/captions?kinds=final"
    stuck = await connect(url(server, path), sock=small_buffer_socket(server.port), max_queue=1)
    await until(lambda: fan.subscribers == 1)
    big = base64.b64encode(os.urandom(150_000)).decode()
    for seq in range(200):  # far more than the socket buffers hold
        fan.publish(ev("final", "a", seq, seq, text=big))
    assert not await fan.wait_idle(0.3)  # the sender is stuck on a full socket
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(server.close(), TIMEOUT)
    assert loop.time() - started < 3.0  # drain, close, abort: each bounded by 0.3 s
    received = await read_until_closed(stuck)
    assert 0 < len(received) < 200
    assert stuck.close_code == 1006  # aborted: it never answered the closing handshake


async def test_client_text_ignored_binary_refused(make_server: Factory) -> None:
    fan, server = await make_server()
    async with connect(url(server, "/v1/captions")) as ws:
        await until(lambda: fan.subscribers == 1)
        await ws.send("ping")
        fan.publish(ev("final", "a", 0, 0))
        assert json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))["seq"] == 0
        await ws.send(b"\x00\x01")
        assert await read_until_closed(ws) == [
            {
                "type": "error",
                "code": 1003,
                "message": "captions endpoint accepts no binary messages",
            }
        ]
        assert ws.close_code == 1003
    await until(lambda: fan.subscribers == 0)


async def test_over_max_subscribers_is_503_until_a_slot_frees(make_server: Factory) -> None:
    fan, server = await make_server(max_subscribers=2)
    first = await connect(url(server, "/v1/captions"))
    second = await connect(url(server, "/v1/captions"))
    with pytest.raises(InvalidStatus) as info:
        await connect(url(server, "/v1/captions"))
    assert info.value.response.status_code == 503
    await first.close()
    await until(lambda: server.subscribers == 1)
    async with connect(url(server, "/v1/captions")) as third:
        await until(lambda: fan.subscribers == 2)
        fan.publish(ev("final", "a", 0, 0))
        assert json.loads(await asyncio.wait_for(third.recv(), TIMEOUT))["seq"] == 0
    await second.close()


# -- history: a late subscriber gets the recent finals ---------------------------------


async def test_late_subscriber_gets_history_then_live_without_gap_or_duplicate(
    make_server: Factory,
) -> None:
    """Finals are published all along, also while the client connects: what it
    gets is the last 5 finals before its subscription, then every later one."""
    fan, server = await make_server()
    for seq in range(1, 9):
        fan.publish(ev("partial", "a", seq, 100 + seq))  # partials are never replayed
        fan.publish(ev("final", "a", seq, 200 + seq))
    fan.publish(ev("final", "b", 0, 1))  # another stream: filtered out
    published = list(range(201, 209))

    async def publish_more() -> None:
        seq = 209
        while True:
            fan.publish(ev("final", "a", seq, seq))
            published.append(seq)
            seq += 1
            await asyncio.sleep(0.002)

    publisher = asyncio.create_task(publish_more())
    try:
        async with connect(url(server, "/v1/captions?streams=a&kinds=final&history=5")) as ws:
            got = [json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT)) for _ in range(25)]
    finally:
        publisher.cancel()
    seqs = [m["seq"] for m in got]
    replayed = [m["seq"] for m in got if m.get("replay")]
    assert len(replayed) == 5 and seqs[:5] == replayed  # history first
    assert all("replay" not in m for m in got[5:])
    # Strictly increasing and contiguous: no duplicate, no gap at the seam.
    assert seqs == published[published.index(seqs[0]) :][:25]
    assert all(m["type"] == "final" and m["stream"] == "a" for m in got)

    # Without history=, a subscriber gets live events only (the API as before).
    async with connect(url(server, "/v1/captions?streams=a")) as plain:
        await until(lambda: fan.subscribers == 1)
        fan.publish(ev("final", "a", 999, 9999))
        assert json.loads(await asyncio.wait_for(plain.recv(), TIMEOUT))["seq"] == 9999


@pytest.mark.parametrize(
    "query",
    ["kinds=partial,interim", "kinds=", "stream=a", "streams", "history=101", "history=-1",
     "history=two", "history=1&history=1"],
)  # fmt: skip
async def test_bad_query_is_400_before_upgrade(make_server: Factory, query: str) -> None:
    fan, server = await make_server()
    with pytest.raises(InvalidStatus) as info:
        await connect(url(server, f"/v1/captions?{query}"))
    assert info.value.response.status_code == 400
    assert fan.subscribers == 0 and server.subscribers == 0


async def test_unknown_websocket_path_is_404(make_server: Factory) -> None:
    _, server = await make_server()
    with pytest.raises(InvalidStatus) as info:
        await connect(url(server, "/v1/nope"))
    assert info.value.response.status_code == 404


# -- plain HTTP -----------------------------------------------------------------------------


async def test_health_ready_and_404_over_plain_http(make_server: Factory) -> None:
    state = {"ready": False}
    _, server = await make_server(ready=lambda: state["ready"])
    assert await asyncio.to_thread(http_get, server, "/healthz") == (200, "ok\n")
    status, _ = await asyncio.to_thread(http_get, server, "/readyz")
    assert status == 503
    state["ready"] = True
    assert await asyncio.to_thread(http_get, server, "/readyz") == (200, "ready\n")
    status, _ = await asyncio.to_thread(http_get, server, "/nowhere")
    assert status == 404
    # The captions route without an upgrade is not a plain HTTP endpoint.
    status, _ = await asyncio.to_thread(http_get, server, "/v1/captions")
    assert status == 426
    await until(lambda: server.subscribers == 0)  # the refused upgrade released its slot


async def test_route_table_accepts_new_routes(make_server: Factory) -> None:
    _, server = await make_server()
    server.add_route("/metrics", lambda conn, req: conn.respond(200, "streamer_up 1\n"))
    assert await asyncio.to_thread(http_get, server, "/metrics") == (200, "streamer_up 1\n")


async def test_close_refuses_new_and_is_idempotent(make_server: Factory) -> None:
    _, server = await make_server()
    port = server.port
    await server.close()
    await server.close()
    with pytest.raises(OSError):
        await connect(f"ws://127.0.0.1:{port}/v1/captions", open_timeout=2)


async def test_port_in_use_is_a_streamer_error(make_server: Factory) -> None:
    _, server = await make_server()
    clash = CaptionServer(Fanout(), "127.0.0.1", server.port)
    with pytest.raises(StreamerError, match="cannot listen"):
        await clash.start()
