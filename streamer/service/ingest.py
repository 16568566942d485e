"""``/v1/stream``: a WebSocket client streams its own audio and gets its captions back.

The protocol (README "WebSocket protocol", checked by :mod:`streamer.core.wire`):
a JSON ``start``, then binary PCM frames, then ``{"type":"stop"}``; the server
answers ``ready``, then the stream's caption events, and after ``stop`` the
last final and a 1000 close. The client's stream is a stream like any other:
every sink (caption subscribers, MQTT, JSONL) sees its events.

Whatever a client does wrong closes that client only, with a JSON error and a
close code; the audio it sent before is still finalised for the other sinks
(nothing already heard is lost). A client sending faster than
``max_audio_rate`` × real time (after a burst) is throttled: the server stops
reading, so TCP pushes back on the client instead of our buffers growing.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Protocol

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from streamer.audio.resample import StreamResampler
from streamer.core.wire import IngestPolicy, PcmDecoder, RateGuard, parse_control, parse_start
from streamer.errors import ProtocolError
from streamer.service.streams import StreamRunner
from streamer.sinks.fanout import ALL_KINDS, Fanout, Subscription
from streamer.sinks.websocket import CaptionServer, close_with_error
from streamer.types import AudioBlock

if TYPE_CHECKING:  # app.py imports this module
    from streamer.service.app import StreamFactory

__all__ = ["STREAM_PATH", "IngestLimits", "IngestObserver", "IngestService"]

log = logging.getLogger(__name__)

STREAM_PATH = "/v1/stream"
ENDPOINT = "stream"


class IngestObserver(Protocol):
    """What the metrics learn from client streams."""

    def audio_received(self, seconds: float) -> None: ...

    def throttled(self, seconds: float) -> None: ...

    def client_stream_closed(self, code: int) -> None: ...


@dataclass(frozen=True, slots=True)
class IngestLimits:
    """Per-client limits from ``[websocket]``."""

    max_streams: int = 16
    max_audio_rate: float = 2.0
    audio_burst_s: float = 5.0
    idle_timeout_s: float = 30.0
    finalize_timeout_s: float = 30.0


class _Idle(Exception):
    pass


class IngestService:
    """Serves ``/v1/stream`` on a :class:`CaptionServer`.

    Registered before the model loads (answering 503 until :meth:`attach`
    gives it the stream factory), so clients see "not ready" rather than 404.
    """

    def __init__(
        self,
        server: CaptionServer,
        fanout: Fanout,
        limits: IngestLimits,
        observer: IngestObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.server = server
        self.fanout = fanout
        self.limits = limits
        self.observer = observer
        self.clock = clock
        self.factory: StreamFactory | None = None
        self.policy = IngestPolicy()
        self._conns: set[ServerConnection] = set()
        self._subs: set[Subscription] = set()
        self._finishing: set[asyncio.Task[None]] = set()
        self._names = itertools.count(1)
        server.add_route(STREAM_PATH, self._check, self._serve, name=ENDPOINT)

    def attach(self, factory: StreamFactory, policy: IngestPolicy) -> None:
        """The model is loaded: start accepting client streams."""
        self.factory = factory
        self.policy = policy

    @property
    def active(self) -> int:
        """Client connections on /v1/stream (including ones in their handshake)."""
        return len(self._conns)

    async def close(self, timeout: float) -> None:
        """Deliver what client sockets have queued and let background finals finish."""
        for sub in list(self._subs):
            sub.close("server shutting down")
        waits = [sub.wait_drained(timeout) for sub in list(self._subs)]
        await asyncio.gather(*waits)
        if self._finishing:
            await asyncio.wait(list(self._finishing), timeout=timeout)

    # -- before the upgrade ------------------------------------------------------

    def _check(self, conn: ServerConnection, request: Request) -> Response | None:
        if self.server.closing:
            return conn.respond(HTTPStatus.SERVICE_UNAVAILABLE, "server shutting down\n")
        if self.factory is None:
            return conn.respond(HTTPStatus.SERVICE_UNAVAILABLE, "model loading\n")
        if len(self._conns) >= self.limits.max_streams:
            self.server.rejected(ENDPOINT, "limit")
            return conn.respond(HTTPStatus.SERVICE_UNAVAILABLE, "too many streams\n")
        self._conns.add(conn)
        conn.connection_lost_waiter.add_done_callback(lambda _: self._conns.discard(conn))
        return None

    # -- one client ------------------------------------------------------------------

    async def _serve(self, conn: ServerConnection) -> None:
        factory = self.factory
        assert factory is not None  # _check refused the upgrade otherwise
        runner: StreamRunner | None = None
        sub: Subscription | None = None
        sender: asyncio.Task[None] | None = None
        code: int = CloseCode.NORMAL_CLOSURE
        try:
            start = parse_start(await self._recv_text_first(conn), self.policy)
            if self.server.needs_auth_message(conn) and not self.server.access.token_matches(
                start.token
            ):
                self.server.rejected(ENDPOINT, "auth")
                raise ProtocolError("authentication failed", CloseCode.POLICY_VIOLATION)
            stream = start.stream or f"client-{next(self._names)}"
            if stream in factory.runners:
                raise ProtocolError(f"stream {stream!r} is in use", CloseCode.POLICY_VIOLATION)
            runner = factory.create(
                stream, language=start.language, task=start.task, origin="client"
            )
            kinds = ALL_KINDS if start.partials else frozenset({"final"})
            sub = self.fanout.subscribe(
                {stream}, kinds, max_finals=self.server.queue_finals, name=f"ingest {stream}"
            )
            self._subs.add(sub)
            await conn.send(json.dumps(start.ready(factory.client.sample_rate, stream)))
            sender = asyncio.create_task(_forward(conn, sub), name=f"ingest-send-{stream}")
            log.info("client stream %s started (%d Hz %s)", stream, start.sample_rate,
                     start.encoding)  # fmt: skip
            await self._receive_audio(conn, runner, start.sample_rate, start.encoding,
                                      start.channels)  # fmt: skip
            # stop: finalise, deliver the last final, close 1000.
            runner.end()
            if not await runner.wait_done(self.limits.finalize_timeout_s):
                log.warning("stream %s did not finalise in time", stream)
            sub.close("end of stream")
            await asyncio.wait({sender}, timeout=self.server.drain_timeout)
            await conn.close(CloseCode.NORMAL_CLOSURE, "end of stream")
        except _Idle:
            code = CloseCode.POLICY_VIOLATION
            self.server.rejected(ENDPOINT, "idle")
            await close_with_error(
                conn, code, f"idle timeout: nothing received for {self.limits.idle_timeout_s:g} s"
            )
        except ProtocolError as exc:
            code = exc.close_code
            if "authentication" not in str(exc):
                self.server.rejected(ENDPOINT, "protocol" if sub is not None else "bad_request")
            log.info("closing client stream from %s: %s", conn.remote_address, exc)
            await close_with_error(conn, code, str(exc))
        except ConnectionClosed as exc:
            code = _close_code(exc)
            if code == CloseCode.MESSAGE_TOO_BIG:
                self.server.rejected(ENDPOINT, "protocol")
        finally:
            if sender is not None:
                sender.cancel()
            if sub is not None:
                sub.close("connection closed")
                self._subs.discard(sub)
            if runner is not None:
                self._finish_in_background(factory, runner)
            if self.observer is not None:
                self.observer.client_stream_closed(int(code))

    async def _recv_text_first(self, conn: ServerConnection) -> str:
        message = await self._recv(conn)
        if isinstance(message, bytes):
            raise ProtocolError(
                "expected a JSON start message before audio", CloseCode.UNSUPPORTED_DATA
            )
        return message

    async def _recv(self, conn: ServerConnection) -> str | bytes:
        try:
            async with asyncio.timeout(self.limits.idle_timeout_s):
                return await conn.recv()
        except TimeoutError:
            raise _Idle from None

    async def _receive_audio(
        self, conn: ServerConnection, runner: StreamRunner, rate: int, encoding: str, channels: int
    ) -> None:
        """Feed binary frames to the stream until ``stop``."""
        decoder = PcmDecoder(encoding, channels)
        resampler = StreamResampler(rate, runner.engine.sample_rate)
        guard = RateGuard(self.limits.max_audio_rate, self.limits.audio_burst_s, self.clock())
        position = 0
        while True:
            message = await self._recv(conn)
            if isinstance(message, str):
                parse_control(message)  # "stop" is the only control message
                tail = resampler.flush()
                if len(tail):
                    await runner.feed(AudioBlock(runner.stream, position, tail,
                                                 resampler.to_rate, self.clock()))  # fmt: skip
                return
            pcm = decoder.decode(message)
            seconds = len(pcm) / rate
            if self.observer is not None:
                self.observer.audio_received(seconds)
            samples = resampler.process(pcm)
            if len(samples):
                block = AudioBlock(runner.stream, position, samples, resampler.to_rate,
                                   self.clock())  # fmt: skip
                position += len(samples)
                await runner.feed(block)
            wait = guard.admit(seconds, self.clock())
            if wait > 0:
                if self.observer is not None:
                    self.observer.throttled(wait)
                await asyncio.sleep(wait)

    def _finish_in_background(self, factory: StreamFactory, runner: StreamRunner) -> None:
        """End the stream (idempotent) and release its id once its finals are out."""
        runner.end()

        async def finish() -> None:
            try:
                if not await runner.wait_done(self.limits.finalize_timeout_s):
                    log.warning("stream %s did not finalise in time", runner.stream)
            finally:
                factory.release(runner.stream)

        task = asyncio.create_task(finish(), name=f"ingest-finish-{runner.stream}")
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)


async def _forward(conn: ServerConnection, sub: Subscription) -> None:
    """The client's own events, as on /v1/captions."""
    try:
        async for event in sub:
            await conn.send(json.dumps(event.to_wire(), ensure_ascii=False))
    except ConnectionClosed:
        pass


def _close_code(exc: ConnectionClosed) -> int:
    frame = exc.sent or exc.rcvd
    return int(frame.code) if frame is not None else int(CloseCode.ABNORMAL_CLOSURE)
