"""Access control of the caption server: Origin, Host (DNS rebinding), the
unauthenticated pool and the connection gate, over real loopback sockets with
real websockets clients; then the daemon's defaults (App, tiny Whisper)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.http11 import Request, Response
from websockets.typing import Origin

from streamer.cli import main as cli_main
from streamer.config import Config, ConsoleConfig, ModelConfig, VadConfig, WebSocketConfig
from streamer.service.app import App
from streamer.service.exposure import exposure_warnings
from streamer.sinks.access import (
    ACCEPT_ERROR,
    AcceptErrorFilter,
    AccessPolicy,
    connection_limit,
    install_accept_error_filter,
    is_loopback,
    parse_host,
)
from streamer.sinks.caption_page import add_page_routes
from streamer.sinks.fanout import Fanout
from streamer.sinks.websocket import CaptionServer
from streamer.testing.daemon import running_app
from streamer.types import Hypothesis

TIMEOUT = 5.0
TOKEN = "s3cret"
EVIL = "evil.example"


def final(seq: int) -> Hypothesis:
    return Hypothesis(
        kind="final", stream="a", segment=seq, seq=seq, text=f"final {seq}",
        committed="", start=0.0, end=0.5, lang="en",
    )  # fmt: skip


async def until(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


@dataclasses.dataclass
class Served:
    fan: Fanout
    server: CaptionServer
    rejected: list[tuple[str, str]]

    @property
    def port(self) -> int:
        return self.server.port

    def url(self, path: str = "/v1/captions", host: str = "127.0.0.1") -> str:
        return f"ws://{host}:{self.port}{path}"


Factory = Callable[..., Awaitable[Served]]


async def _accept(conn: ServerConnection, request: Request) -> Response | None:
    return None


async def _echo_stream(conn: ServerConnection) -> None:
    """A stand-in for /v1/stream (served by the daemon's ingest service)."""
    async for message in conn:
        await conn.send(message)


@pytest.fixture
async def make_server() -> AsyncIterator[Factory]:
    servers: list[CaptionServer] = []

    async def make(host: str = "127.0.0.1", **kwargs: Any) -> Served:
        fan, rejected = Fanout(), []
        kwargs.setdefault("drain_timeout", 1.0)
        server = CaptionServer(
            fan, host, 0, on_reject=lambda *r: rejected.append(r), **kwargs
        )  # fmt: skip
        server.add_route("/v1/stream", _accept, _echo_stream, name="stream")
        server.add_route(
            "/metrics", lambda c, r: c.respond(200, "up 1\n"), name="metrics", auth=True
        )
        add_page_routes(server)
        await server.start()
        servers.append(server)
        return Served(fan, server, rejected)

    yield make
    for server in servers:
        await server.close()


async def refused(url: str, **kwargs: Any) -> int:
    """The HTTP status a WebSocket handshake was refused with."""
    with pytest.raises(InvalidStatus) as info:
        await connect(url, open_timeout=TIMEOUT, **kwargs)
    return info.value.response.status_code


def via_loopback(port: int) -> socket.socket:
    """A socket to 127.0.0.1, for a URL with another name (what DNS rebinding does)."""
    return socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)


async def http_status(port: int, path: str, host: str, headers: str = "") -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{headers}\r\n".encode())
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), TIMEOUT)
        return int(line.split()[1])
    finally:
        writer.close()


async def receives(ws: ClientConnection, fan: Fanout, seq: int) -> None:
    fan.publish(final(seq))
    message = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
    assert message["seq"] == seq


# -- pure helpers -------------------------------------------------------------------


def test_host_parsing_and_loopback_names() -> None:
    assert parse_host("LocalHost:8765") == "localhost"
    assert parse_host("[::1]:8765") == "::1"
    assert parse_host("127.0.0.1") == "127.0.0.1"
    assert parse_host("evil.example.:80") == "evil.example"
    for bad in ("", "a b", "[::1", "[nothost]:1", "x:port", "::1"):
        assert parse_host(bad) is None, bad
    for name in ("localhost", "app.localhost", "127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"):
        assert is_loopback(name), name
    for name in ("0.0.0.0", "::", "10.0.0.1", EVIL, "localhost.evil.example"):
        assert not is_loopback(name), name


def test_connection_limit_leaves_a_reserve_below_the_fd_limit() -> None:
    assert connection_limit(1024) == 1024 - 102 - 100
    assert connection_limit(512) == 512 - 64 - 100
    assert connection_limit(65536) == 65536 - 6553 - 100
    assert connection_limit(100) == 8


# -- Origin and Host -------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/captions", "/v1/stream"])
async def test_other_origins_are_refused_by_default(make_server: Factory, path: str) -> None:
    s = await make_server()
    for origin in (f"http://{EVIL}", f"http://{EVIL}:{s.port}", "null", "http://localhost"):
        assert await refused(s.url(path), origin=Origin(origin)) == 403, origin
    assert s.rejected == [(path.rsplit("/", 1)[1], "origin")] * 4
    assert s.server.subscribers == 0


@pytest.mark.parametrize("path", ["/v1/captions", "/v1/stream"])
async def test_own_page_and_non_browser_clients_are_accepted(
    make_server: Factory, path: str
) -> None:
    s = await make_server()
    async with connect(s.url(path)):  # no Origin: not a browser
        pass
    async with connect(s.url(path), origin=Origin(f"http://127.0.0.1:{s.port}")):
        pass
    own = Origin(f"http://localhost:{s.port}")  # the page opened as http://localhost:PORT/
    async with connect(s.url(path, "localhost"), sock=via_loopback(s.port), origin=own):
        pass
    assert s.rejected == []


async def test_dns_rebinding_is_refused_on_every_route(make_server: Factory) -> None:
    """A page on evil.example:PORT, the name resolving to 127.0.0.1: its own origin."""
    s = await make_server()
    evil = Origin(f"http://{EVIL}:{s.port}")
    for path in ("/v1/captions", "/v1/stream"):
        url = s.url(path, EVIL)
        assert await refused(url, sock=via_loopback(s.port), origin=evil) == 421
        assert await refused(url, sock=via_loopback(s.port)) == 421  # same-origin fetch: no Origin
    for path in ("/", "/captions.js", "/metrics", "/healthz", "/readyz", "/nowhere"):
        assert await http_status(s.port, path, f"{EVIL}:{s.port}") == 421, path
        assert await http_status(s.port, path, EVIL) == 421, path
    for host in (f"localhost:{s.port}", f"127.0.0.1:{s.port}", f"[::1]:{s.port}", "127.3.2.1"):
        assert await http_status(s.port, "/healthz", host) == 200, host
    # A trusted Host with the attacker's Origin is still another site's page.
    assert await refused(s.url(), origin=evil) == 403


async def test_configured_origins_and_server_names(make_server: Factory) -> None:
    policy = AccessPolicy(
        allowed_origins=frozenset({"https://Captions.Example.org"}),
        server_names=frozenset({"captions.lan"}),
    )
    s = await make_server(access=policy)
    async with connect(s.url(), origin=Origin("https://captions.example.org")):
        pass
    assert await refused(s.url(), origin=Origin("https://other.example.org")) == 403
    # The daemon reached as captions.lan: its page there is its own page.
    own = Origin(f"http://captions.lan:{s.port}")
    async with connect(s.url(host="captions.lan"), sock=via_loopback(s.port), origin=own):
        pass
    assert await http_status(s.port, "/", "captions.lan") == 200

    anyone = await make_server(access=AccessPolicy(allowed_origins=frozenset({"*"})))
    async with connect(anyone.url(), origin=Origin(f"http://{EVIL}")):
        pass


async def test_spoofed_host_is_not_own_origin_when_reachable_from_elsewhere(
    make_server: Factory,
) -> None:
    s = await make_server(host="0.0.0.0")
    evil = Origin(f"http://{EVIL}:{s.port}")
    assert await refused(s.url(host=EVIL), sock=via_loopback(s.port), origin=evil) == 403
    assert await http_status(s.port, "/healthz", EVIL) == 200  # Host names are not limited
    async with connect(s.url(), origin=Origin(f"http://127.0.0.1:{s.port}")):
        pass


# -- the unauthenticated pool ---------------------------------------------------------------


def token_policy(**changes: Any) -> AccessPolicy:
    return dataclasses.replace(AccessPolicy(token=TOKEN), **changes)


async def open_silent(
    s: Served, count: int, **kwargs: Any
) -> tuple[list[ClientConnection], list[int]]:
    """``count`` caption clients that never authenticate: (upgraded, refusal statuses)."""
    upgraded, statuses = [], []
    for _ in range(count):
        try:
            upgraded.append(await connect(s.url(), open_timeout=TIMEOUT, **kwargs))
        except InvalidStatus as exc:
            statuses.append(exc.response.status_code)
    return upgraded, statuses


async def closed_with(ws: ClientConnection) -> tuple[int | None, list[Any]]:
    messages = []
    with contextlib.suppress(ConnectionClosed):
        async with asyncio.timeout(TIMEOUT):
            async for message in ws:
                messages.append(json.loads(message))
    return ws.close_code, messages


async def test_silent_unauthenticated_clients_do_not_block_authenticated_ones(
    make_server: Factory,
) -> None:
    policy = token_policy(
        auth_timeout=1.5, max_unauthenticated=16, max_unauthenticated_per_address=64
    )
    s = await make_server(access=policy, max_subscribers=2)
    browser = await connect(s.url())  # authenticates with its first message, before the flood
    await browser.send(json.dumps({"type": "auth", "token": TOKEN}))
    await until(lambda: s.server.subscribers == 1)

    loop = asyncio.get_running_loop()
    flooded = loop.time()
    silent, statuses = await open_silent(s, 20)
    assert (len(silent), statuses) == (16, [503] * 4)
    assert s.server.unauthenticated == 16 and s.server.subscribers == 1  # no slot held
    assert s.rejected == [("captions", "limit")] * 4

    bearer = {"Authorization": f"Bearer {TOKEN}"}
    async with connect(s.url(), additional_headers=bearer) as client:
        await until(lambda: s.fan.subscribers == 2)
        await receives(client, s.fan, 1)
        await asyncio.wait_for(browser.recv(), TIMEOUT)

        # The server closes each silent one at its deadline.
        results = await asyncio.gather(*(closed_with(ws) for ws in silent))
        waited = loop.time() - flooded
        error = {"type": "error", "code": 1008, "message": "authentication timed out"}
        assert results == [(1008, [error])] * 16
        assert 1.4 < waited < 4.0, waited
        print(f"16 silent connections closed {waited:.2f} s after they opened")
        assert s.server.unauthenticated == 0
        assert s.rejected.count(("captions", "auth")) == 16
        await receives(browser, s.fan, 2)  # authenticated in time: its deadline was cancelled
        await receives(client, s.fan, 2)
    await browser.close()


async def test_unauthenticated_cap_per_address(make_server: Factory) -> None:
    s = await make_server(access=token_policy(max_unauthenticated_per_address=4))
    for _ in range(6):  # refused by the route after all: they hold no place
        assert await refused(s.url("/v1/captions?kinds=nope")) == 400
    assert s.server.unauthenticated == 0
    silent, statuses = await open_silent(s, 6)
    assert (len(silent), statuses) == (4, [429, 429])
    other = await connect(s.url(), local_addr=("127.0.0.2", 0))  # another address
    await other.send(json.dumps({"type": "auth", "token": TOKEN}))
    await until(lambda: s.server.subscribers == 1)
    assert s.server.unauthenticated == 4
    await silent[0].close()
    await until(lambda: s.server.unauthenticated == 3)  # a closed one frees its place
    async with connect(s.url()) as again:
        await again.send(json.dumps({"type": "auth", "token": TOKEN}))
        await until(lambda: s.server.subscribers == 2)
    for ws in (*silent, other):
        await ws.close()


async def test_subscriber_slot_is_taken_once_authenticated(make_server: Factory) -> None:
    s = await make_server(access=token_policy(), max_subscribers=1)
    waiting = await connect(s.url())  # upgraded, holds no slot yet
    assert s.server.subscribers == 0
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    async with connect(s.url(), additional_headers=bearer) as holder:  # takes the one slot
        assert s.server.subscribers == 1
        await waiting.send(json.dumps({"type": "auth", "token": TOKEN}))
        code, messages = await closed_with(waiting)
        assert code == 1013
        assert messages == [{"type": "error", "code": 1013, "message": "too many subscribers"}]
        assert await refused(s.url()) == 503  # full: refused before the upgrade
        await receives(holder, s.fan, 1)


# -- the connection gate (file descriptors) -------------------------------------------------


async def test_gate_evicts_idle_sockets_never_established_connections(
    make_server: Factory,
) -> None:
    s = await make_server(max_connections=8)
    async with connect(s.url()) as sub:
        await until(lambda: s.fan.subscribers == 1)
        idle = [socket.create_connection(("127.0.0.1", s.port)) for _ in range(30)]
        try:
            await until(lambda: s.server.connections == 8 and s.server.guard.gate.evicted >= 20)
            for _ in range(5):  # each probe evicts the oldest idle socket
                assert await http_status(s.port, "/healthz", "127.0.0.1") == 200
            await receives(sub, s.fan, 1)  # the established stream was never touched
            assert s.server.connections <= 8
        finally:
            for sock in idle:
                sock.close()

    full = await make_server(max_connections=2)
    async with connect(full.url()) as one, connect(full.url()) as two:
        await until(lambda: full.fan.subscribers == 2)
        with socket.create_connection(("127.0.0.1", full.port), timeout=TIMEOUT) as extra:
            assert await asyncio.to_thread(extra.recv, 16) == b""  # closed at once
        await receives(one, full.fan, 1)
        await receives(two, full.fan, 1)
        assert full.server.guard.gate.refused >= 1


def test_accept_errors_are_logged_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("asyncio")
    now = [0.0]
    saved = list(logger.filters)
    logger.filters[:] = [f for f in saved if not isinstance(f, AcceptErrorFilter)]
    logger.addFilter(AcceptErrorFilter(interval=10.0, clock=lambda: now[0]))
    loop = asyncio.new_event_loop()
    try:
        caplog.set_level(logging.ERROR, logger="asyncio")
        error = OSError(24, "Too many open files")
        for second in range(25):  # 100 a second, as asyncio's accept loop does
            now[0] = float(second)
            for _ in range(100):
                context = {"message": ACCEPT_ERROR, "exception": error}
                loop.call_exception_handler(context)
        records = [r for r in caplog.records if r.name == "asyncio"]
        assert len(records) == 3  # at 0, 10 and 20 s
        assert all(r.exc_info is None and "\n" not in r.getMessage() for r in records)
        assert "Too many open files" in records[1].getMessage()
        assert "999 more in the last 10 s" in records[1].getMessage()
        loop.call_exception_handler({"message": "something else"})
        assert caplog.records[-1].getMessage() == "something else"  # others pass
    finally:
        loop.close()
        logger.filters[:] = saved
    assert install_accept_error_filter(logger) is install_accept_error_filter(logger)
    logger.filters[:] = saved


# -- exposure warnings ------------------------------------------------------------------------


def test_exposure_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def cfg(**ws: Any) -> Config:
        return Config(websocket=WebSocketConfig(**ws))

    assert exposure_warnings(cfg(), environ={}) == []
    assert exposure_warnings(cfg(host="localhost"), environ={}) == []
    (line,) = exposure_warnings(cfg(host="0.0.0.0"), environ={})
    assert "0.0.0.0" in line and "no token" in line
    assert exposure_warnings(cfg(host="0.0.0.0"), environ={"STREAMER_WS_TOKEN": "x"}) == []
    token = tmp_path / "token"
    assert exposure_warnings(cfg(host="::", auth_token_file=str(token)), environ={}) == []
    (line,) = exposure_warnings(cfg(allowed_origins="*"), environ={})
    assert "allowed_origins" in line
    assert exposure_warnings(cfg(host="0.0.0.0", enabled=False), environ={}) == []

    assert cli_main(["check-config", "--set", 'websocket.host="0.0.0.0"']) == 0
    err = capsys.readouterr().err
    assert err.count("WARNING") == 1 and "no token" in err


# -- the daemon's defaults ----------------------------------------------------------------------


def running(cfg: Config) -> contextlib.AbstractAsyncContextManager[App]:
    return running_app(cfg, 120)


async def test_daemon_defaults_admit_only_its_own_page(
    tiny_whisper: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path))
    monkeypatch.delenv("STREAMER_WS_TOKEN", raising=False)
    cfg = Config(
        model=ModelConfig(id=str(tiny_whisper), device="cpu", source_language="en"),
        vad=VadConfig(enabled=False),
        sources=(),
        websocket=WebSocketConfig(port=0),  # the defaults otherwise
        console=ConsoleConfig(enabled=False),
    )
    async with running(cfg) as app:
        assert app.server is not None
        port = app.server.port
        evil = Origin(f"http://{EVIL}:{port}")
        for path in ("/v1/captions", "/v1/stream"):
            url = f"ws://127.0.0.1:{port}{path}"
            assert await refused(url, origin=Origin(f"http://{EVIL}")) == 403, path
            rebound = f"ws://{EVIL}:{port}{path}"
            assert await refused(rebound, sock=via_loopback(port), origin=evil) == 421, path
            async with connect(url, origin=Origin(f"http://127.0.0.1:{port}")):
                pass
            async with connect(url):
                pass
        for path in ("/", "/metrics", "/healthz"):
            assert await http_status(port, path, f"{EVIL}:{port}") == 421, path
            assert await http_status(port, path, f"localhost:{port}") == 200, path
