"""``/v1/stream``: a WebSocket client streams its own audio and gets its captions back.

The protocol (README "WebSocket protocol", checked by :mod:`streamer.core.wire`):
a JSON ``start``, then binary PCM frames, then ``{"type":"stop"}``; the server
answers ``ready``, then the stream's caption events, and after ``stop`` the
last final and a 1000 close. The client's stream is a stream like any other:
every sink (caption subscribers, MQTT, JSONL) sees its events.

Whatever a client does wrong closes that client only, with a JSON error and a
close code; the audio it sent before is still finalised for the other sinks
(nothing already heard is lost).

Flow control: a client sending faster than ``max_audio_rate`` × real time
(after ``audio_burst_s``) is throttled: the server stops reading, so TCP
pushes back on the client instead of our buffers growing. Frames are cut into
pieces of at most ``PIECE_S`` and each piece is paced before it is fed, so one
maximum-size frame (1 MiB is 32 s of 16 kHz audio) gets no more than the burst.
While the server holds a client back it cannot read the client's pongs (they
wait behind its audio in TCP), so this endpoint replaces the library's
keepalive with one that counts every frame as a sign of life and never pings
while the server itself is the one not reading.

Admission: a client holds a ``max_streams`` slot only once it is
authenticated (a bearer header before the upgrade, else the token of its
``start``); ``admission()`` (the engine's measured load) can refuse a new
stream with 503 before the upgrade, or with 1013 after ``start``.

Shutdown (:meth:`IngestService.stop_input`, then :meth:`close`): new clients
get 503; every client's reader stops at the next frame boundary (a frame the
server already read is fed, nothing after it is read), its stream ends, it
gets every final of the audio taken, then a 1001 close.

Resume: a ``start`` with ``resume`` continues a stream whose connection broke,
here or on another daemon (:mod:`streamer.service.resume`); on this daemon it
first waits for the stream's earlier session to publish its last finals.

The other client protocols (:mod:`streamer.service.realtime`,
:mod:`streamer.service.wyoming`) are served through the same service: its
public methods (:meth:`~IngestService.admit`, :meth:`~IngestService.open_stream`,
:meth:`~IngestService.serving`, ...) give them the same slots, admission,
throttle, keepalive and shutdown, and :class:`~streamer.service.client_io.AudioFeed`
the same pacing.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from streamer.core.segmenter import SegmenterSettings
from streamer.core.wire import IngestPolicy, PcmDecoder, Resume, parse_control, parse_start
from streamer.errors import ProtocolError
from streamer.service.client_io import PIECE_S, AudioFeed, IngestObserver
from streamer.service.resume import WAIT_S, ResumePlan, plan_resume
from streamer.service.streams import StreamRunner
from streamer.sinks.fanout import ALL_KINDS, Fanout, Subscription
from streamer.sinks.targets import SOURCE_ONLY, TargetSelection
from streamer.sinks.websocket import CaptionServer, close_with_error

if TYPE_CHECKING:  # app.py imports this module
    from streamer.service.stream_factory import StreamFactory

__all__ = [
    "PIECE_S",
    "STREAM_PATH",
    "IdleTimeout",
    "IngestLimits",
    "IngestObserver",
    "IngestService",
    "Liveness",
    "ShuttingDown",
]

log = logging.getLogger(__name__)

STREAM_PATH = "/v1/stream"
ENDPOINT = "stream"

#: Says why a new stream cannot be served now (None: it can).
Admission = Callable[[], str | None]


@dataclass(frozen=True, slots=True)
class IngestLimits:
    """Per-client limits from ``[websocket]``."""

    max_streams: int = 16
    max_audio_rate: float = 2.0
    audio_burst_s: float = 5.0
    idle_timeout_s: float = 30.0
    finalize_timeout_s: float = 30.0


class IdleTimeout(Exception):
    """The client sent nothing for ``idle_timeout_s``."""


class ShuttingDown(Exception):
    """The daemon is shutting down: read nothing more from this client."""


class Liveness:
    """What the keepalive knows of one client: last frame, and whether we hold it back."""

    def __init__(self, now: float) -> None:
        self.last_seen = now
        self.holding = 0  # > 0 while the server itself does not read (pacing, feeding)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self.holding += 1
        try:
            yield
        finally:
            self.holding -= 1


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
        self.admission: Admission = lambda: None
        self._conns: set[Hashable] = set()  # authenticated clients of any protocol: a slot each
        self._subs: set[Subscription] = set()
        self._finishing: set[asyncio.Task[None]] = set()
        self._finishing_by_stream: dict[str, asyncio.Task[None]] = {}
        self._handlers: set[asyncio.Task[object]] = set()
        self._feeding: set[StreamRunner] = set()  # streams whose reader may still feed
        self._fed_all = asyncio.Event()
        self._fed_all.set()
        self._stopping = asyncio.Event()
        self._names: dict[str, Iterator[int]] = {}
        server.add_route(STREAM_PATH, self._check, self._serve, name=ENDPOINT)

    def attach(
        self, factory: StreamFactory, policy: IngestPolicy, admission: Admission | None = None
    ) -> None:
        """The model is loaded: start accepting client streams."""
        self.factory = factory
        self.policy = policy
        if admission is not None:
            self.admission = admission

    @property
    def active(self) -> int:
        """Client connections on /v1/stream (including ones in their handshake)."""
        return len(self._conns)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def full(self) -> bool:
        """Every ``max_streams`` slot is taken (``/readyz`` says 503)."""
        return len(self._conns) >= self.limits.max_streams

    async def stop_input(self, timeout: float) -> bool:
        """Shutdown, first step: stop reading audio and end every client stream.

        Returns once every reader has fed its last frame and ended its stream
        (True), or after ``timeout`` (False). The finals are then on their way.
        """
        self._stopping.set()
        for runner in self._feeding:
            runner.stop_holding()
        try:
            async with asyncio.timeout(timeout):
                await self._fed_all.wait()
        except TimeoutError:
            log.warning("%d client stream(s) still feeding after %.0f s",
                        len(self._feeding), timeout)  # fmt: skip
            return False
        return True

    async def close(self, timeout: float) -> None:
        """Shutdown, last step: clients get their last finals and a 1001 close."""
        self._stopping.set()
        handlers = [t for t in self._handlers if t is not asyncio.current_task()]
        if handlers:
            _, pending = await asyncio.wait(handlers, timeout=timeout)
            if pending:
                log.warning("%d client stream(s) did not close in %.0f s", len(pending), timeout)
        for sub in list(self._subs):  # stuck handlers: their sockets get what is queued
            sub.close("server shutting down")
        if self._finishing:
            await asyncio.wait(list(self._finishing), timeout=timeout)

    # -- before the upgrade ------------------------------------------------------

    def _check(self, conn: ServerConnection, request: Request) -> Response | None:
        return self.admit(conn, ENDPOINT)

    def admit(
        self, conn: ServerConnection, endpoint: str, *, in_band_auth: bool = True
    ) -> Response | None:
        """The check before a client stream's upgrade, for every WebSocket protocol.

        None lets it through holding a ``max_streams`` slot, or, when it must
        still send its token in-band (``in_band_auth``), with no slot yet;
        without ``in_band_auth`` a missing bearer header is HTTP 401.
        """
        if self.server.closing or self.stopping:
            return conn.respond(HTTPStatus.SERVICE_UNAVAILABLE, "server shutting down\n")
        if self.factory is None:
            return conn.respond(HTTPStatus.SERVICE_UNAVAILABLE, "model loading\n")
        if self.server.needs_auth_message(conn):
            if in_band_auth:
                return None  # no slot until its first message carries the token
            self.server.rejected(endpoint, "auth")
            response = conn.respond(HTTPStatus.UNAUTHORIZED, "authentication required\n")
            response.headers["WWW-Authenticate"] = 'Bearer realm="streamer"'
            return response
        refusal = self.refusal(endpoint)
        if refusal is not None:
            return conn.respond(HTTPStatus.SERVICE_UNAVAILABLE, f"{refusal}\n")
        self.hold_slot(conn, conn.connection_lost_waiter)
        return None

    def refusal(self, endpoint: str = ENDPOINT) -> str | None:
        """Why a new stream is refused now (counted in the metrics), or None."""
        if len(self._conns) >= self.limits.max_streams:
            self.server.rejected(endpoint, "limit")
            return "too many streams"
        try:
            reason = self.admission()
        except Exception:
            log.exception("admission check failed")
            reason = None
        if reason is not None:
            self.server.rejected(endpoint, "saturated")
            return reason
        return None

    def hold_slot(self, key: Hashable, until: asyncio.Future[None] | None = None) -> None:
        """``key`` holds a ``max_streams`` slot until ``until`` is done (the TCP
        connection is gone, whatever happens) or :meth:`release_slot`."""
        self._conns.add(key)
        if until is not None:
            until.add_done_callback(lambda _: self._conns.discard(key))

    def release_slot(self, key: Hashable) -> None:
        self._conns.discard(key)

    def stream_name(self, prefix: str) -> str:
        """A free stream id for a client that named none: ``prefix-N``."""
        names = self._names.setdefault(prefix, itertools.count(1))
        runners = self.factory.runners if self.factory is not None else {}
        while (name := f"{prefix}-{next(names)}") in runners:
            pass
        return name

    def open_stream(
        self,
        stream: str,
        *,
        language: str | None = None,
        task: str | None = None,
        segmenter: Callable[[SegmenterSettings], SegmenterSettings] | None = None,
        resume: ResumePlan | None = None,
        targets: tuple[str, ...] | None = None,
    ) -> StreamRunner:
        """A new client stream (``resume``: continuing one); end it with
        :meth:`stop_feeding`, then :meth:`finish_in_background` (which releases
        its id once its finals are out)."""
        assert self.factory is not None  # admit() refused clients until attach()
        runner = self.factory.create(
            stream,
            language=language,
            task=task,
            origin="client",
            segmenter=segmenter,
            seq_floor=resume.seq_floor if resume is not None else 0,
            start=resume.start if resume is not None else 0,
            targets=targets,
        )
        self._feeding.add(runner)
        self._fed_all.clear()
        return runner

    def audio_feed(self, runner: StreamRunner, rate: int) -> AudioFeed:
        """The throttled, resampled way into ``runner`` for audio at ``rate`` Hz."""
        return AudioFeed(
            runner,
            rate,
            max_audio_rate=self.limits.max_audio_rate,
            burst_s=self.limits.audio_burst_s,
            pause=self.pause,
            clock=self.clock,
            observer=self.observer,
        )

    def subscribe(
        self,
        stream: str,
        *,
        partials: bool = True,
        name: str,
        targets: TargetSelection = SOURCE_ONLY,
    ) -> Subscription:
        """That stream's events for its client (closed at shutdown if its handler is stuck).

        ``targets``: its translation targets too (None), for a client that
        knows them apart; by default the source only (Realtime, Wyoming)."""
        kinds = ALL_KINDS if partials else frozenset({"final"})
        sub = self.fanout.subscribe({stream}, kinds, max_finals=self.server.queue_finals,
                                    name=name, targets=targets)  # fmt: skip
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        sub.close("connection closed")
        self._subs.discard(sub)

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """Around a client handler: :meth:`close` waits for it at shutdown."""
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            yield
        finally:
            self._handlers.discard(task)

    async def wait_stopping(self) -> None:
        await self._stopping.wait()

    # -- one client ------------------------------------------------------------------

    async def _serve(self, conn: ServerConnection) -> None:
        with self.serving():
            await self._serve_client(conn)

    async def _serve_client(self, conn: ServerConnection) -> None:
        factory = self.factory
        assert factory is not None  # _check refused the upgrade otherwise
        runner: StreamRunner | None = None
        sub: Subscription | None = None
        sender: asyncio.Task[None] | None = None
        code: int = CloseCode.NORMAL_CLOSURE
        live = Liveness(self.clock())
        keepalive = self.keepalive(conn, live)
        try:
            start = parse_start(await self._recv_text_first(conn, live), self.policy)
            if self.server.needs_auth_message(conn):
                if not self.server.access.token_matches(start.token):
                    self.server.rejected(ENDPOINT, "auth")
                    raise ProtocolError("authentication failed", CloseCode.POLICY_VIOLATION)
                self.server.authenticated(conn)
                refusal = self.refusal()
                if refusal is not None:
                    raise ProtocolError(refusal, CloseCode.TRY_AGAIN_LATER)
                self.hold_slot(conn, conn.connection_lost_waiter)
            stream = start.stream or self.stream_name("client")
            plan = await self._plan(stream, start.resume)
            runner = self.open_stream(stream, language=start.language, task=start.task,
                                      resume=plan, targets=start.targets)  # fmt: skip
            sub = self.subscribe(
                stream, partials=start.partials, name=f"ingest {stream}", targets=None
            )  # its targets too: they carry "target"
            sr = factory.client.sample_rate
            resumed = None if plan is None else Resume(runner.session.last_seq, plan.start / sr)
            await conn.send(json.dumps(start.ready(sr, stream, resumed)))
            for event in plan.replay if plan is not None else ():  # finals it missed, first
                await conn.send(json.dumps(event.to_wire(), ensure_ascii=False))
            sender = asyncio.create_task(_forward(conn, sub), name=f"ingest-send-{stream}")
            log.info("client stream %s %s (%d Hz %s)", stream, "started" if plan is None
                     else "resumed", start.sample_rate, start.encoding)  # fmt: skip
            shutdown = await self._receive_audio(conn, runner, live, start.sample_rate,
                                                 start.encoding, start.channels,
                                                 skip=plan.skip if plan else 0)  # fmt: skip
            # stop (or shutdown): finalise, deliver the last final, close.
            self.stop_feeding(runner)
            if not await runner.wait_done(self.limits.finalize_timeout_s):
                log.warning("stream %s did not finalise in time", stream)
            sub.close("end of stream")
            await asyncio.wait({sender}, timeout=self.server.drain_timeout)
            if shutdown:
                code = CloseCode.GOING_AWAY
                await conn.close(code, "server shutting down")
            else:
                await conn.close(CloseCode.NORMAL_CLOSURE, "end of stream")
        except ShuttingDown:  # before its stream started: nothing to finalise
            code = CloseCode.GOING_AWAY
            await conn.close(code, "server shutting down")
        except IdleTimeout:
            code = CloseCode.POLICY_VIOLATION
            self.server.rejected(ENDPOINT, "idle")
            await close_with_error(
                conn, code, f"idle timeout: nothing received for {self.limits.idle_timeout_s:g} s"
            )
        except ProtocolError as exc:
            code = exc.close_code
            if "authentication" not in str(exc) and code != CloseCode.TRY_AGAIN_LATER:
                self.server.rejected(ENDPOINT, "protocol" if sub is not None else "bad_request")
            log.info("closing client stream from %s: %s", conn.remote_address, exc)
            await close_with_error(conn, code, str(exc))
        except ConnectionClosed as exc:
            code = _close_code(exc)
            if code == CloseCode.MESSAGE_TOO_BIG:
                self.server.rejected(ENDPOINT, "protocol")
        finally:
            if keepalive is not None:
                keepalive.cancel()
            if sender is not None:
                sender.cancel()
            if sub is not None:
                self.unsubscribe(sub)
            if runner is not None:
                self.stop_feeding(runner)
                self.finish_in_background(runner)
            if self.observer is not None:
                self.observer.client_stream_closed(int(code))

    def stop_feeding(self, runner: StreamRunner) -> None:
        """The reader is done with ``runner``: end its stream (idempotent)."""
        runner.end()
        self._feeding.discard(runner)
        if not self._feeding:
            self._fed_all.set()

    def keepalive(self, conn: ServerConnection, live: Liveness) -> asyncio.Task[None] | None:
        """Replace the library's keepalive with one that knows about throttling."""
        if conn.keepalive_task is not None:
            conn.keepalive_task.cancel()
            conn.keepalive_task = None
        interval, timeout = self.server.ping_interval, self.server.ping_timeout
        if not interval:
            return None
        return asyncio.create_task(
            _keepalive(conn, live, interval, timeout or None, self.clock),
            name=f"ingest-keepalive-{conn.id}",
        )

    async def _plan(self, stream: str, resume: Resume | None) -> ResumePlan | None:
        """Refuse a stream id in use; plan a resumed stream (None: a new one)."""
        factory = self.factory
        assert factory is not None
        finishing = self._finishing_by_stream.get(stream)
        if resume is not None and finishing is not None:  # its earlier session here ends first
            await asyncio.wait({finishing}, timeout=WAIT_S)
        if stream in factory.runners:  # (a resuming client's old connection may linger)
            code = CloseCode.POLICY_VIOLATION if resume is None else CloseCode.TRY_AGAIN_LATER
            raise ProtocolError(f"stream {stream!r} is in use", code)
        if resume is None:
            return None
        plan = plan_resume(resume, self.fanout.history, stream, factory.client.sample_rate)
        log.info("resuming stream %s at %.3f s after seq %d (%d final(s) replayed)",
                 stream, resume.offset, resume.seq, len(plan.replay))  # fmt: skip
        return plan

    async def _recv_text_first(self, conn: ServerConnection, live: Liveness) -> str:
        message = await self.recv(conn, live)
        if isinstance(message, bytes):
            raise ProtocolError(
                "expected a JSON start message before audio", CloseCode.UNSUPPORTED_DATA
            )
        return message

    async def recv(self, conn: ServerConnection, live: Liveness) -> str | bytes:
        """The next message; IdleTimeout after ``idle_timeout_s``, ShuttingDown at shutdown."""
        if self._stopping.is_set():
            raise ShuttingDown
        recv = asyncio.ensure_future(conn.recv())
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait(
                (recv, stop), timeout=self.limits.idle_timeout_s,
                return_when=asyncio.FIRST_COMPLETED,
            )  # fmt: skip
        finally:
            stop.cancel()
            if not recv.done():
                recv.cancel()  # websockets: cancelling recv() loses no message
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                    await recv
        if recv.done() and not recv.cancelled():
            message = recv.result()  # raises ConnectionClosed when it is
            live.last_seen = self.clock()
            return message
        if self._stopping.is_set():
            raise ShuttingDown
        raise IdleTimeout

    async def pause(self, seconds: float) -> None:
        """Throttle: wait ``seconds`` unless shutdown begins meanwhile."""
        if self._stopping.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _receive_audio(
        self,
        conn: ServerConnection,
        runner: StreamRunner,
        live: Liveness,
        rate: int,
        encoding: str,
        channels: int,
        *,
        skip: int = 0,
    ) -> bool:
        """Feed binary frames to the stream until ``stop`` (False) or shutdown (True).

        ``skip``: model-rate samples at the start already finalised here (a
        resume): the first block starts that far before the stream's audio, and
        the runner drops what overlaps."""
        decoder = PcmDecoder(encoding, channels)
        feed = self.audio_feed(runner, rate)
        feed.position = -skip
        shutdown = False
        while True:
            try:
                message = await self.recv(conn, live)
            except ShuttingDown:
                shutdown = True
                message = None
            if message is None or isinstance(message, str):
                if message is not None:
                    if len(message) > self.server.max_frame_bytes:
                        raise ProtocolError("control message over max_frame_bytes",
                                            CloseCode.MESSAGE_TOO_BIG)  # fmt: skip
                    parse_control(message)  # "stop" is the only control message
                await feed.flush()
                return shutdown
            if len(message) > self.server.max_frame_bytes:
                raise ProtocolError(
                    f"audio frame of {len(message)} bytes is over the limit of "
                    f"{self.server.max_frame_bytes} bytes (max_frame_bytes)",
                    CloseCode.MESSAGE_TOO_BIG,
                )
            pcm = decoder.decode(message)
            with live.held():
                await feed.feed(pcm)

    def finish_in_background(self, runner: StreamRunner) -> None:
        """End the stream (idempotent) and release its id once its finals are out."""
        factory = self.factory
        assert factory is not None
        runner.end()

        async def finish() -> None:
            try:
                if not await runner.wait_done(self.limits.finalize_timeout_s):
                    log.warning("stream %s did not finalise in time", runner.stream)
            finally:
                factory.release(runner.stream)

        task = asyncio.create_task(finish(), name=f"ingest-finish-{runner.stream}")
        self._finishing.add(task)
        self._finishing_by_stream[runner.stream] = task

        def forget(done: asyncio.Task[None]) -> None:
            self._finishing.discard(done)
            if self._finishing_by_stream.get(runner.stream) is done:
                del self._finishing_by_stream[runner.stream]

        task.add_done_callback(forget)


async def _keepalive(
    conn: ServerConnection,
    live: Liveness,
    interval: float,
    timeout: float | None,
    clock: Callable[[], float],
) -> None:
    """Ping a client that has been quiet for ``interval``; close it if no pong comes.

    A frame counts as a pong (the client is alive), and while the server holds
    the client back its pongs sit behind the audio in TCP: no verdict then.
    """
    while True:
        await asyncio.sleep(interval)
        if live.holding or clock() - live.last_seen < interval:
            continue
        try:
            pong = await conn.ping()
        except ConnectionClosed:
            return
        if timeout is None:
            continue
        try:
            async with asyncio.timeout(timeout):
                await pong
        except TimeoutError:
            if live.holding or clock() - live.last_seen < interval + timeout:
                continue
            log.info("closing client stream from %s: keepalive ping timeout", conn.remote_address)
            await conn.close(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
            return
        except ConnectionClosed:
            return


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
