"""WebSocket caption server (websockets 17 asyncio API) with plain HTTP probes.

One port serves everything; ``process_request`` routes by path before the
WebSocket upgrade, through a route table that later endpoints extend with
:meth:`CaptionServer.add_route` (audio ingest ``/v1/stream``, ``/metrics``,
the caption page ``/``):

=============================================  ==================================
``GET /v1/captions?streams=a,b&kinds=final``   WebSocket; one JSON text message
                                               per event (``Hypothesis.to_wire``)
``GET /healthz``                               200 ``ok`` while the process runs
``GET /readyz``                                200 when ``ready()`` else 503
anything else                                  404
=============================================  ==================================

Access (:mod:`streamer.sinks.access`: Host, Origin, token, connection caps)
is checked before the upgrade, for every WebSocket route and for routes
registered with ``auth=True``; the Host check (DNS rebinding) for every
route. WebSocket handlers of token-protected routes use two methods:

- ``server.needs_auth_message(conn)``: True while a token is configured and
  ``conn`` has not authenticated (no valid ``Authorization`` header, no
  ``authenticated`` call); such a connection must send the token first
  (``/v1/captions``: ``{"type":"auth","token":…}``; ``/v1/stream``: the
  ``token`` of its start message).
- ``server.authenticated(conn)``: call right after checking that token:
  takes ``conn`` out of the unauthenticated pool and cancels its deadline
  (otherwise the server closes it with 1008 "authentication timed out"
  ``auth_timeout`` seconds after its request); idempotent. Count
  per-endpoint slots (``max_streams``) only from here on, or before the
  upgrade when ``needs_auth_message`` is False.

Caption subscriptions: ``streams``, ``kinds``, ``targets`` (the source by
default, or translation targets) and ``history`` (the recent finals first;
:mod:`streamer.sinks.captions`). A malformed query, an unknown
parameter or kind, a bad count answers HTTP 400 before the upgrade; more than
``max_subscribers`` authenticated caption connections answer 503 (or, when
the slots filled while the client authenticated, close 1013).

Each connection owns a :class:`~streamer.sinks.fanout.Subscription` with
``queue_finals`` finals of room. A client that cannot keep up (its socket
stays full until that queue overflows) is closed with 1013 "slow subscriber";
everybody else is unaffected. Text messages from caption clients are ignored
(clients may send "ping"); a binary message closes the connection with 1003.
Every close for a client's fault is preceded by a JSON
``{"type":"error","code":…,"message":…}`` message (:func:`close_with_error`).

Shutdown (:meth:`CaptionServer.close`): refuse new subscribers, close the
subscriptions so each connection delivers what it has queued (bounded by a
timeout), then close connections with 1001 and abort whatever is left.
"""

from __future__ import annotations

import asyncio
import email.utils
import inspect
import json
import logging
import ssl
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response
from websockets.protocol import State

from streamer.core.wire import parse_auth
from streamer.errors import ProtocolError, StreamerError
from streamer.sinks.access import (
    REASON_AUTH_TIMEOUT,
    AccessControl,
    AccessPolicy,
    RejectHook,
)
from streamer.sinks.access import peer as _peer
from streamer.sinks.captions import CaptionQuery, parse_caption_query
from streamer.sinks.fanout import Fanout, Subscription

__all__ = [
    "CAPTIONS_PATH",
    "AccessPolicy",
    "CaptionQuery",
    "CaptionServer",
    "HttpProcess",
    "Route",
    "WsHandler",
    "close_with_error",
    "http_response",
    "parse_caption_query",
]

log = logging.getLogger(__name__)

CAPTIONS_PATH = "/v1/captions"

#: Runs before the upgrade: returns a Response to answer with plain HTTP, or
#: None to accept the WebSocket (only valid when the route has a handler).
HttpProcess = Callable[[ServerConnection, Request], Response | Awaitable[Response | None] | None]
#: Serves an accepted WebSocket connection; the server closes it afterwards.
WsHandler = Callable[[ServerConnection], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Route:
    """One path of the server: a pre-upgrade check and an optional WebSocket handler.

    ``name`` labels refusals in the metrics; ``auth`` applies the access policy
    to a plain HTTP route too (WebSocket routes always get it).
    """

    process: HttpProcess
    handler: WsHandler | None = None
    name: str = ""
    auth: bool = False


class CaptionServer:
    """Serves caption events from a :class:`Fanout` to WebSocket clients.

    ``ready`` answers ``/readyz`` (None: always ready). ``drain_timeout``
    bounds each shutdown step in :meth:`close`. ``max_connections`` caps open
    TCP connections (None: from the file descriptor limit at :meth:`start`);
    ``open_timeout`` bounds each opening handshake.
    """

    def __init__(
        self,
        fanout: Fanout,
        host: str,
        port: int,
        max_subscribers: int = 64,
        queue_finals: int = 256,
        ready: Callable[[], bool] | None = None,
        *,
        drain_timeout: float = 5.0,
        access: AccessPolicy | None = None,
        ssl_context: ssl.SSLContext | None = None,
        max_frame_bytes: int = 1 << 20,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        on_reject: RejectHook | None = None,
        max_connections: int | None = None,
        open_timeout: float = 5.0,
    ) -> None:
        self._fanout = fanout
        self.host = host
        self._port = port
        self.max_subscribers = max_subscribers
        self.queue_finals = queue_finals
        self._ready = ready
        self.drain_timeout = drain_timeout
        self.access = access or AccessPolicy()
        self.ssl_context = ssl_context
        self.max_frame_bytes = max_frame_bytes
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.on_reject = on_reject
        self.open_timeout = open_timeout
        self.guard = AccessControl(
            self.access,
            tls=ssl_context is not None,
            on_reject=self.rejected,
            on_expire=self._auth_expired,
            max_connections=max_connections,
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: Server | None = None
        self._routes: dict[str, Route] = {}
        # Authenticated caption connections, until connection lost.
        self._caption_conns: set[ServerConnection] = set()
        self._subs: set[Subscription] = set()
        self._closing = False
        self._close_task: asyncio.Task[None] | None = None
        self._close_code: int = CloseCode.GOING_AWAY
        self._close_reason = "server shutting down"
        self.slow_disconnects = 0
        self._ready_details: list[Callable[[], str]] = []
        self.add_route("/healthz", self._healthz)
        self.add_route("/readyz", self._readyz)
        self.add_route(CAPTIONS_PATH, self._check_captions, self._serve_captions, name="captions")

    # -- lifecycle ---------------------------------------------------------------

    def add_route(
        self,
        path: str,
        process: HttpProcess,
        handler: WsHandler | None = None,
        *,
        name: str = "",
        auth: bool = False,
    ) -> None:
        """Register (or replace) the route for ``path`` (exact match, query ignored)."""
        self._routes[path] = Route(process, handler, name or path.strip("/"), auth)

    def add_ready_detail(self, detail: Callable[[], str]) -> None:
        """Add a line to the ``/readyz`` body (e.g. a sink's connection state)."""
        self._ready_details.append(detail)

    @property
    def closing(self) -> bool:
        return self._closing

    def rejected(self, endpoint: str, reason: str) -> None:
        """Count one refused connection or closed client (reason: a short fixed word)."""
        if self.on_reject is not None:
            try:
                self.on_reject(endpoint, reason)
            except Exception:
                log.exception("on_reject hook failed")

    def needs_auth_message(self, conn: ServerConnection) -> bool:
        """A token is configured and this connection has not authenticated yet."""
        return self.guard.needs_auth_message(conn)

    def authenticated(self, conn: ServerConnection) -> None:
        """``conn`` showed the token: leave the unauthenticated pool, cancel its deadline."""
        self.guard.authenticated(conn)

    @property
    def unauthenticated(self) -> int:
        """WebSockets waiting to authenticate with their first message."""
        return len(self.guard.pool)

    @property
    def connections(self) -> int:
        """Open TCP connections (all routes, handshakes included)."""
        return len(self.guard.gate)

    async def start(self) -> None:
        """Bind and start serving; raises StreamerError when the port is unavailable."""
        if self._server is not None:
            raise RuntimeError("CaptionServer already started")
        guard = self.guard

        class GatedConnection(ServerConnection):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                super().connection_made(transport)
                guard.connection_made(self)

        try:
            self._server = await serve(
                self._dispatch,
                self.host,
                self._port,
                process_request=self._process_request,
                ssl=self.ssl_context,
                # Handlers refuse a message over max_frame_bytes with a JSON error;
                # the protocol layer cuts off only twice that (a bare 1009 close).
                max_size=2 * self.max_frame_bytes,
                ping_interval=self.ping_interval or None,
                ping_timeout=self.ping_timeout or None,
                server_header=None,
                open_timeout=self.open_timeout,
                create_connection=GatedConnection,
            )
        except OSError as exc:
            raise StreamerError(
                f"cannot listen on {self.host}:{self._port}: {exc.strerror or exc}"
            ) from exc
        self.guard.bound([str(s.getsockname()[0]) for s in self._server.sockets], self.host)
        scheme = "wss" if self.ssl_context is not None else "ws"
        log.info("caption server listening on %s://%s:%d (at most %d connections)",
                 scheme, self.host, self.port, self.guard.gate.limit)  # fmt: skip

    @property
    def port(self) -> int:
        """The bound port (the real one when 0 was asked for).

        With a host name that resolves to several addresses and port 0, each
        socket gets its own port; this is the first one's.
        """
        if self._server is None:
            return self._port
        sockets = self._server.sockets
        if not sockets:
            return self._port
        return int(sockets[0].getsockname()[1])

    @property
    def subscribers(self) -> int:
        """Caption connections holding a subscriber slot (authenticated ones)."""
        return len(self._caption_conns)

    async def close(
        self, code: int = CloseCode.GOING_AWAY, reason: str = "server shutting down"
    ) -> None:
        """Flush subscribers, close connections with ``code``; idempotent.

        Each step (delivering queued events, the closing handshakes) is bounded
        by ``drain_timeout``; connections still open after that are aborted.
        Concurrent callers all wait for the one shutdown.
        """
        if self._server is None:
            return
        if self._close_task is None:
            self._closing = True
            self._close_code, self._close_reason = code, reason
            self._close_task = asyncio.create_task(
                self._shutdown(self._server), name="caption-server-close"
            )
        await asyncio.shield(self._close_task)

    async def _shutdown(self, server: Server) -> None:
        code, reason = self._close_code, self._close_reason
        self.guard.pool.clear()
        subs = list(self._subs)
        for sub in subs:
            sub.close(reason)
        if subs:
            try:
                async with asyncio.timeout(self.drain_timeout):
                    for sub in subs:
                        await sub.drained.wait()
            except TimeoutError:
                log.warning("caption subscribers did not drain in %.1fs", self.drain_timeout)
        server.close(close_connections=True, code=code, reason=reason)
        for conn in self.guard.gate.connections() - server.all_connections:
            conn.transport.abort()  # not upgraded: no closing handshake to wait for
        try:
            async with asyncio.timeout(self.drain_timeout):
                await server.wait_closed()
        except TimeoutError:
            # all_connections includes those stuck in their closing handshake.
            stuck = list(server.all_connections)
            log.warning("aborting %d connections after shutdown timeout", len(stuck))
            for conn in stuck:
                conn.transport.abort()
            try:
                async with asyncio.timeout(self.drain_timeout):
                    await server.wait_closed()
            except TimeoutError:
                log.error("caption server handlers did not finish")

    # -- routing -------------------------------------------------------------------

    async def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        route = self._routes.get(urlsplit(request.path).path)
        websocket = route is not None and route.handler is not None
        endpoint = route.name if route is not None and (websocket or route.auth) else None
        refusal = self.guard.check_host(conn, request, endpoint)
        if refusal is not None:
            return refusal
        if route is None:
            return conn.respond(HTTPStatus.NOT_FOUND, "not found\n")
        if endpoint is not None:
            refusal = self.guard.check(conn, request, endpoint, websocket)
            if refusal is not None:
                return refusal
        result = route.process(conn, request)
        if inspect.isawaitable(result):
            result = await result
        if result is None and route.handler is None:
            log.error("route %s accepted a WebSocket but has no handler", request.path)
            return conn.respond(HTTPStatus.INTERNAL_SERVER_ERROR, "no handler\n")
        if result is None:
            self.guard.gate.busy(conn)  # a WebSocket now: never evicted for an idle socket
        else:
            self.guard.pool.release(conn)  # refused after all: no place to hold
        return result

    async def _dispatch(self, conn: ServerConnection) -> None:
        assert conn.request is not None  # set once the handshake succeeded
        route = self._routes.get(urlsplit(conn.request.path).path)
        if route is None or route.handler is None:  # routes changed mid-handshake
            await conn.close(CloseCode.INTERNAL_ERROR, "no handler")
            return
        await route.handler(conn)

    def _auth_expired(self, conn: ServerConnection, endpoint: str) -> None:
        """The pool's deadline: close a connection that did not authenticate in time."""
        self.rejected(endpoint, REASON_AUTH_TIMEOUT)
        log.info("closing %s from %s: authentication timed out", endpoint, _peer(conn))
        if conn.protocol.state is not State.OPEN:
            conn.transport.abort()
            return

        async def close() -> None:
            try:
                async with asyncio.timeout(2.0):  # a silent client gets no close_timeout
                    await close_with_error(
                        conn, CloseCode.POLICY_VIOLATION, "authentication timed out"
                    )
            except TimeoutError:
                conn.transport.abort()

        task = asyncio.create_task(close(), name=f"auth-timeout-{conn.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def authenticate_first_message(self, conn: ServerConnection, endpoint: str) -> bool:
        """Browser auth on ``/v1/captions``: the first message carries the token.

        Closes the connection (1008) and returns False when it does not; the
        pool's deadline closes a silent one (recv then raises ConnectionClosed).
        """
        try:
            async with asyncio.timeout(self.access.auth_timeout + 1.0):  # backstop only
                message = await conn.recv()
        except TimeoutError:
            self.rejected(endpoint, REASON_AUTH_TIMEOUT)
            await close_with_error(conn, CloseCode.POLICY_VIOLATION, "authentication timed out")
            return False
        except ConnectionClosed:
            return False
        try:
            if isinstance(message, bytes):
                raise ProtocolError('expected {"type":"auth","token":…} first')
            token = parse_auth(message)
        except ProtocolError as exc:
            self.rejected(endpoint, "auth")
            await close_with_error(conn, exc.close_code, str(exc))
            return False
        if not self.access.token_matches(token):
            self.rejected(endpoint, "auth")
            log.info("refused %s from %s: bad token", endpoint, _peer(conn))
            await close_with_error(conn, CloseCode.POLICY_VIOLATION, "authentication failed")
            return False
        self.authenticated(conn)
        return True

    def _healthz(self, conn: ServerConnection, request: Request) -> Response:
        return conn.respond(HTTPStatus.OK, "ok\n")

    def _readyz(self, conn: ServerConnection, request: Request) -> Response:
        try:
            ok = self._ready is None or bool(self._ready())
        except Exception:
            log.exception("readiness check failed")
            ok = False
        lines = []
        for detail in self._ready_details:
            try:
                lines.append(detail())
            except Exception:
                log.exception("readiness detail failed")
        body = "".join(f"{line}\n" for line in lines if line)
        if ok and not self._closing:
            return conn.respond(HTTPStatus.OK, "ready\n" + body)
        return conn.respond(HTTPStatus.SERVICE_UNAVAILABLE, "not ready\n" + body)

    # -- captions --------------------------------------------------------------------

    def _check_captions(self, conn: ServerConnection, request: Request) -> Response | None:
        """Validate the query; reserve a subscriber slot if no auth message is due."""
        if self._closing:
            return conn.respond(HTTPStatus.SERVICE_UNAVAILABLE, "server shutting down\n")
        try:
            parse_caption_query(urlsplit(request.path).query)
        except ValueError as exc:
            self.rejected("captions", "bad_request")
            return conn.respond(HTTPStatus.BAD_REQUEST, f"{exc}\n")
        full = len(self._caption_conns) >= self.max_subscribers
        if full or (not self.needs_auth_message(conn) and not self._take_caption_slot(conn)):
            self.rejected("captions", "limit")
            return conn.respond(HTTPStatus.SERVICE_UNAVAILABLE, "too many subscribers\n")
        return None

    def _take_caption_slot(self, conn: ServerConnection) -> bool:
        """Hold a subscriber slot until the TCP connection is gone; False when full."""
        if conn in self._caption_conns:
            return True
        if len(self._caption_conns) >= self.max_subscribers:
            return False
        self._caption_conns.add(conn)
        conn.connection_lost_waiter.add_done_callback(lambda _: self._caption_conns.discard(conn))
        return True

    async def _serve_captions(self, conn: ServerConnection) -> None:
        assert conn.request is not None
        query = parse_caption_query(urlsplit(conn.request.path).query)
        if self.needs_auth_message(conn) and not await self.authenticate_first_message(
            conn, "captions"
        ):
            return
        if not self._take_caption_slot(conn):  # the slots filled while it authenticated
            self.rejected("captions", "limit")
            await close_with_error(conn, CloseCode.TRY_AGAIN_LATER, "too many subscribers")
            return
        sub = self._fanout.subscribe(
            query.streams,
            query.kinds,
            max_finals=self.queue_finals,
            name=f"ws {_peer(conn)}",
            history=query.history,
            targets=query.targets,
        )
        if self._closing:
            sub.close(self._close_reason)
        self._subs.add(sub)
        sender = asyncio.create_task(_send_events(conn, sub), name=f"captions-send-{conn.id}")
        reader = asyncio.create_task(_read_client(conn), name=f"captions-read-{conn.id}")
        closed = asyncio.create_task(sub.wait_closed(), name=f"captions-closed-{conn.id}")
        tasks = (sender, reader, closed)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if sub.slow:
                self.slow_disconnects += 1
                self.rejected("captions", "slow")
                log.warning("closing slow caption subscriber %s", _peer(conn))
                await close_with_error(conn, CloseCode.TRY_AGAIN_LATER, "slow subscriber")
            elif sender.done() and _failed(sender):
                await conn.close(CloseCode.INTERNAL_ERROR, "internal error")
            elif not reader.done():
                # Shutting down: deliver what is queued, then close.
                if not sender.done():
                    await asyncio.wait(
                        (sender, reader),
                        timeout=self.drain_timeout,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                await conn.close(self._close_code, self._close_reason)
        finally:
            sub.close("connection closed")
            self._subs.discard(sub)
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for result in results:
                if isinstance(result, Exception) and not isinstance(result, ConnectionClosed):
                    log.error("caption connection %s failed", _peer(conn), exc_info=result)


def _failed(task: asyncio.Task[None]) -> bool:
    """A finished task that raised something other than a closed connection."""
    if task.cancelled():
        return False
    exc = task.exception()
    return exc is not None and not isinstance(exc, ConnectionClosed)


async def _send_events(conn: ServerConnection, sub: Subscription) -> None:
    """Forward events until the subscription ends; one JSON text message each."""
    async for event in sub:
        await conn.send(json.dumps(event.to_wire(), ensure_ascii=False))


async def _read_client(conn: ServerConnection) -> None:
    """Consume client messages: text is ignored, binary is refused (1003)."""
    try:
        async for message in conn:
            if isinstance(message, bytes):
                await close_with_error(
                    conn, CloseCode.UNSUPPORTED_DATA, "captions endpoint accepts no binary messages"
                )
                return
    except ConnectionClosed:
        pass


async def close_with_error(conn: ServerConnection, code: int, message: str) -> None:
    """Tell the client why in a JSON error message, then close with ``code``."""
    error = json.dumps({"type": "error", "code": code, "message": message}, ensure_ascii=False)
    reason = message.encode()[:120].decode(errors="ignore")  # a close reason fits 123 bytes
    try:
        async with asyncio.timeout(1.0):  # a stalled client gets the close frame only
            await conn.send(error)
    except (ConnectionClosed, TimeoutError):
        pass
    await conn.close(code, reason)


def http_response(
    status: HTTPStatus, body: bytes, content_type: str, headers: Iterable[tuple[str, str]] = ()
) -> Response:
    """A plain HTTP answer with a body of any type (``conn.respond`` only does text)."""
    fields = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Connection", "close"),
            ("Content-Length", str(len(body))),
            ("Content-Type", content_type),
            *headers,
        ]
    )
    return Response(status.value, status.phrase, fields, body)
