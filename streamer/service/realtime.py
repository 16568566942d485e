"""``GET /v1/realtime``: OpenAI Realtime transcription sessions on the daemon's port.

A client that speaks OpenAI's Realtime API (the ``openai`` SDK's realtime
client, LiteLLM, clients of NVIDIA Riva NIM) connects with
``?intent=transcription``, sends ``session.update``,
``input_audio_buffer.append`` (base64 audio), ``.commit`` and ``.clear``, and
gets ``session.created``/``updated``, ``speech_started``/``stopped``,
``committed``, the transcription ``delta``/``completed`` events and
``error``. The mapping onto caption events lives in
:mod:`streamer.service.realtime_protocol`; this module is the socket side.

Behind the socket it is a client stream like ``/v1/stream``'s, through
:class:`~streamer.service.ingest.IngestService`: the same ``max_streams``
slots, admission, throttle, keepalive, idle timeout and shutdown, and its
events reach every other sink under its stream id (``realtime-N``, or the
``stream`` query parameter). The stream starts with the first audio, with the
session's format, language and endpointing at that moment.

Auth: the daemon's token as ``Authorization: Bearer`` (what OpenAI clients
send as their API key); without it the upgrade is refused with 401. Bad
client events get an ``error`` event and the session goes on, as with
OpenAI; a message over ``max_frame_bytes``, the idle timeout and a client
that does not read its events close the connection (1009, 1008, 1013) after
an ``error`` event.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from streamer.config import Config
from streamer.core.segmenter import SegmenterSettings
from streamer.core.wire import STREAM_ID, PcmDecoder
from streamer.errors import ProtocolError
from streamer.service.client_io import AudioFeed, choose_language, decode_g711, model_name
from streamer.service.ingest import IdleTimeout, IngestService, Liveness, ShuttingDown
from streamer.service.realtime_protocol import (
    ItemTracker,
    RealtimeError,
    SessionConfig,
    TurnDetection,
    error_event,
    new_id,
    parse_session_update,
    server_event,
    session_object,
)
from streamer.service.streams import StreamRunner
from streamer.sinks.fanout import Subscription, SubscriptionClosed

__all__ = ["REALTIME_PATH", "RealtimeService"]

log = logging.getLogger(__name__)

REALTIME_PATH = "/v1/realtime"
ENDPOINT = "realtime"
#: A commit or clear waiting for its segments' finals asks the stream this often (s).
SETTLE_POLL_S = 0.05
#: Server events queued for a client that does not read them; past this it is closed.
MAX_OUTBOX = 1000
#: The least audio a commit may hold (ms), as OpenAI's ``input_audio_buffer_commit_empty``.
MIN_COMMIT_MS = 100
CLIENT_EVENTS = (
    "session.update",
    "input_audio_buffer.append",
    "input_audio_buffer.commit",
    "input_audio_buffer.clear",
)
#: Client events of OpenAI's conversation sessions, which a transcription session lacks.
CONVERSATION_EVENTS = frozenset(
    {"response.create", "response.cancel", "conversation.item.create",
     "conversation.item.delete", "conversation.item.retrieve", "conversation.item.truncate",
     "output_audio_buffer.clear"}
)  # fmt: skip


class _Close(Exception):
    """Close the connection after an ``error`` event; ``reason`` labels the metrics."""

    def __init__(self, close_code: int, code: str, message: str, reason: str = "protocol") -> None:
        super().__init__(message)
        self.close_code, self.code, self.message, self.reason = close_code, code, message, reason


class RealtimeService:
    """Serves ``/v1/realtime`` through ``ingest`` (registered on its server)."""

    def __init__(self, ingest: IngestService, cfg: Config) -> None:
        self.ingest = ingest
        self.model = model_name(cfg.model.id)
        self.source_language = cfg.model.source_language  # "auto" or a code
        self.vad_threshold = cfg.vad.threshold
        self.endpoint_silence_ms = cfg.streaming.endpoint_silence_ms
        ingest.server.add_route(REALTIME_PATH, self._check, self._serve, name=ENDPOINT)

    def default_turn(self, sample_rate: int) -> TurnDetection:
        """``server_vad`` as the daemon's configuration sets it up."""
        pre_roll = SegmenterSettings().pre_roll  # (samples at the model's rate)
        return TurnDetection(
            threshold=self.vad_threshold,
            prefix_padding_ms=round(pre_roll * 1000 / sample_rate),
            silence_duration_ms=self.endpoint_silence_ms,
        )

    def _check(self, conn: ServerConnection, request: Request) -> Response | None:
        query = parse_qs(urlsplit(request.path).query)
        intent = query.get("intent", ["transcription"])
        stream = query.get("stream", [None])
        reason = None
        if intent != ["transcription"]:
            reason = "only transcription sessions are served: ?intent=transcription"
        elif len(stream) != 1 or (stream[0] is not None and not STREAM_ID.fullmatch(stream[0])):
            reason = "'stream' must match [A-Za-z0-9_.-]{1,64}"
        if reason is not None:
            self.ingest.server.rejected(ENDPOINT, "bad_request")
            return conn.respond(HTTPStatus.BAD_REQUEST, f"{reason}\n")
        return self.ingest.admit(conn, ENDPOINT, in_band_auth=False)

    async def _serve(self, conn: ServerConnection) -> None:
        assert conn.request is not None
        stream = parse_qs(urlsplit(conn.request.path).query).get("stream", [None])[0]
        with self.ingest.serving():
            await _Session(self, conn, stream).run()


class _Session:
    """One client connection: reads client events, feeds the stream, sends server events.

    Three tasks: the handler reads; ``_pump`` turns the stream's caption events
    into item events; ``_write`` sends the outbox in order. Every server event
    is queued synchronously where it is made, so they leave in causal order.
    """

    def __init__(self, service: RealtimeService, conn: ServerConnection, stream: str | None):
        self.ingest = ingest = service.ingest
        assert ingest.factory is not None  # admit() refused clients until attach()
        self.service = service
        self.conn = conn
        self.stream = stream
        self.id = new_id("sess")
        self.rate = ingest.factory.client.sample_rate
        self.default_turn = service.default_turn(self.rate)
        self.cfg = SessionConfig(turn_detection=self.default_turn, model=service.model)
        self.stream_turn: TurnDetection | None = None  # the stream's endpointing, once it runs
        self.tracker = ItemTracker(self.rate)
        self.runner: StreamRunner | None = None
        self.feed: AudioFeed | None = None
        self.sub: Subscription | None = None
        self.tasks: set[asyncio.Task[Any]] = set()
        self.settler: asyncio.Task[None] | None = None
        self.outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.overflow = False

    # -- lifetime ---------------------------------------------------------------------

    async def run(self) -> None:
        ingest, conn = self.ingest, self.conn
        live = Liveness(ingest.clock())
        keepalive = ingest.keepalive(conn, live)
        self._start(self._write(), "send")
        self._send(server_event("session.created", session=self._session()))
        code: int = CloseCode.NORMAL_CLOSURE
        try:
            await self._read(live)  # returns at shutdown
            code = CloseCode.GOING_AWAY
            await self._finish()
            await self._flush(ingest.server.drain_timeout)
            await conn.close(code, "server shutting down")
        except IdleTimeout:
            code = CloseCode.POLICY_VIOLATION
            ingest.server.rejected(ENDPOINT, "idle")
            seconds = ingest.limits.idle_timeout_s
            await self._fail(_Close(code, "idle_timeout", f"Nothing received for {seconds:g} s."))
        except _Close as exc:
            code = exc.close_code
            ingest.server.rejected(ENDPOINT, exc.reason)
            log.info("closing realtime client %s: %s", conn.remote_address, exc.message)
            await self._fail(exc)
        except ConnectionClosed as exc:
            frame = exc.sent or exc.rcvd
            code = int(frame.code) if frame is not None else int(CloseCode.ABNORMAL_CLOSURE)
        finally:
            if keepalive is not None:
                keepalive.cancel()
            for task in self.tasks:
                task.cancel()
            if self.sub is not None:
                ingest.unsubscribe(self.sub)
            if self.runner is not None:  # what it heard is still finalised for the other sinks
                ingest.stop_feeding(self.runner)
                ingest.finish_in_background(self.runner)
            if ingest.observer is not None:
                ingest.observer.client_stream_closed(int(code))

    def _start(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=f"realtime-{name}-{self.conn.id}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _read(self, live: Liveness) -> None:
        """Client events until shutdown; raises when the client leaves or must be closed."""
        limit = self.ingest.server.max_frame_bytes
        while True:
            try:
                message = await self.ingest.recv(self.conn, live)
            except ShuttingDown:
                return
            if len(message) > limit:
                raise _Close(
                    CloseCode.MESSAGE_TOO_BIG,
                    "event_too_large",
                    f"An event of {len(message)} bytes is over this server's limit of {limit}.",
                )
            event_id = None
            try:
                if isinstance(message, bytes):
                    raise RealtimeError(
                        "invalid_value",
                        "Binary messages are not part of the protocol: send JSON events "
                        "(input_audio_buffer.append carries base64 audio).",
                    )
                event = _json_event(message)
                event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
                await self._handle(event, live)
            except RealtimeError as exc:
                self._send(error_event(exc, event_id))

    async def _finish(self) -> None:
        """Shutdown: the stream ends; every item is completed and sent."""
        runner, feed = self.runner, self.feed
        if runner is None or feed is None or self.sub is None:
            return
        await feed.flush()
        self.ingest.stop_feeding(runner)
        if not await runner.wait_done(self.ingest.limits.finalize_timeout_s):
            log.warning("stream %s did not finalise in time", runner.stream)
        self.sub.close("end of stream")
        self._drain()
        self._send_all(self.tracker.finish())

    async def _fail(self, exc: _Close) -> None:
        self._send(error_event(RealtimeError(exc.code, exc.message)))
        await self._flush(1.0)
        reason = exc.message.encode()[:120].decode(errors="ignore")
        await self.conn.close(exc.close_code, reason)

    # -- client events ----------------------------------------------------------------

    async def _handle(self, event: dict[str, Any], live: Liveness) -> None:
        kind = event.get("type")
        if kind == "session.update":
            self._update(event)
        elif kind == "input_audio_buffer.append":
            _only(event, {"type", "event_id", "audio"})
            pcm = self._decode(event.get("audio"))
            if len(pcm):
                feed = self._feed()
                with live.held():
                    await feed.feed(pcm)
        elif kind in ("input_audio_buffer.commit", "input_audio_buffer.clear"):
            _only(event, {"type", "event_id"})
            at = self.runner.session.frontier if self.runner is not None else 0
            if kind == "input_audio_buffer.clear":
                self._send_all(self.tracker.clear(at))
            else:
                ms = self.tracker.uncommitted_ms(at)
                if ms < MIN_COMMIT_MS:
                    raise RealtimeError(
                        "input_audio_buffer_commit_empty",
                        "Error committing input audio buffer: buffer too small. Expected at "
                        f"least {MIN_COMMIT_MS}ms of audio, but buffer only has {ms:.2f}ms "
                        "of audio.",
                    )
                self._send_all(self.tracker.commit(at))
            if self.runner is not None:
                self.runner.finalize()  # the open segment ends here
                self._drain()
                if self.tracker.waiting and (self.settler is None or self.settler.done()):
                    self.settler = self._start(self._settle(), "settle")
        elif kind == "transcription_session.update":
            raise RealtimeError(
                "unsupported_value",
                "The beta API's 'transcription_session.update' is not supported: send "
                "'session.update' with session.type 'transcription' (the GA shape).",
                "type",
            )
        elif kind in CONVERSATION_EVENTS:
            raise RealtimeError(
                "unsupported_value",
                f"'{kind}' is not part of a transcription session: send "
                f"{', '.join(CLIENT_EVENTS)}.",
                "type",
            )
        else:
            supported = ", ".join(f"'{k}'" for k in CLIENT_EVENTS)
            message = f"Invalid value: {kind!r}. Supported values are: {supported}."
            raise RealtimeError("invalid_value", message, "type")

    def _update(self, event: dict[str, Any]) -> None:
        _only(event, {"type", "event_id", "session"})
        cfg = parse_session_update(event, self.cfg, self.default_turn, stream_turn=self.stream_turn)
        self._language(cfg.language)  # refused before it is applied
        self.cfg = cfg
        self.tracker.vad = cfg.turn_detection is not None
        self._send(server_event("session.updated", session=self._session()))

    def _language(self, language: str | None) -> str | None:
        try:
            return choose_language(language, self.ingest.policy, self.service.source_language)
        except ValueError as exc:
            raise RealtimeError(
                "unsupported_value", str(exc), "session.audio.input.transcription.language"
            ) from None

    def _decode(self, audio: object) -> Any:
        if not isinstance(audio, str):
            raise RealtimeError("invalid_type", "'audio' must be a base64 string.", "audio")
        try:
            data = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise RealtimeError("invalid_value", "'audio' is not valid base64.", "audio") from None
        if self.cfg.format != "audio/pcm":
            return decode_g711(data, "pcmu" if self.cfg.format == "audio/pcmu" else "pcma")
        try:
            return PcmDecoder("pcm_s16le", 1).decode(data)
        except ProtocolError:
            message = f"'audio' holds {len(data)} bytes: not whole PCM16 samples."
            raise RealtimeError("invalid_value", message, "audio") from None

    def _feed(self) -> AudioFeed:
        """The stream, started with the first audio (with the session as it is then)."""
        if self.feed is not None:
            return self.feed
        ingest = self.ingest
        factory = ingest.factory
        assert factory is not None
        stream = self.stream or ingest.stream_name("realtime")
        if stream in factory.runners:
            raise _Close(
                CloseCode.POLICY_VIOLATION, "stream_in_use", f"stream {stream!r} is in use",
                reason="bad_request",
            )  # fmt: skip
        turn = self.cfg.turn_detection or self.default_turn
        self.runner = ingest.open_stream(
            stream,
            language=self._language(self.cfg.language),
            segmenter=None if turn == self.default_turn else _endpointing(turn, self.rate),
        )
        self.stream_turn = turn
        self.sub = ingest.subscribe(stream, name=f"realtime {stream}")
        self.feed = ingest.audio_feed(self.runner, self.cfg.rate)
        self._start(self._pump(self.sub), "events")
        log.info("realtime stream %s started (%s, %d Hz) from %s",
                 stream, self.cfg.format, self.cfg.rate, self.conn.remote_address)  # fmt: skip
        return self.feed

    # -- server events ----------------------------------------------------------------

    async def _pump(self, sub: Subscription) -> None:
        async for event in sub:
            self._send_all(self.tracker.on_event(event))
            self._drain()

    async def _settle(self) -> None:
        """While a commit waits: ask the stream whether its segments are all final."""
        while self.tracker.waiting:
            await asyncio.sleep(SETTLE_POLL_S)
            self._drain()

    def _drain(self) -> None:
        """Events already published go through first; then waiting commits settle."""
        sub = self.sub
        if sub is None:
            return
        while True:
            try:
                event = sub.get_nowait()
            except (asyncio.QueueEmpty, SubscriptionClosed):
                break
            self._send_all(self.tracker.on_event(event))
        if self.tracker.waiting:
            self._send_all(self.tracker.settle(self._pending_before))

    def _pending_before(self, at: int) -> bool:
        """A segment of the stream that starts before sample ``at`` waits for its final."""
        assert self.runner is not None
        session = self.runner.session
        backlog = session.backlog  # from the start of the oldest segment still waiting
        return backlog > 0 and session.frontier - backlog < at

    def _session(self) -> dict[str, Any]:
        return session_object(self.cfg, self.id)

    def _send_all(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            self._send(event)

    def _send(self, event: dict[str, Any]) -> None:
        if self.overflow:
            return
        if self.outbox.qsize() >= MAX_OUTBOX:
            self.overflow = True
            log.warning("closing realtime client %s: %d events unread",
                        self.conn.remote_address, MAX_OUTBOX)  # fmt: skip
            self.ingest.server.rejected(ENDPOINT, "slow")
            self._start(self.conn.close(CloseCode.TRY_AGAIN_LATER, "slow client"), "close")
            return
        self.outbox.put_nowait(event)

    async def _write(self) -> None:
        while True:
            event = await self.outbox.get()
            try:
                await self.conn.send(json.dumps(event, ensure_ascii=False))
            except ConnectionClosed:
                return
            finally:
                self.outbox.task_done()

    async def _flush(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.outbox.join()


def _json_event(message: str) -> dict[str, Any]:
    try:
        event = json.loads(message)
    except (ValueError, RecursionError):
        raise RealtimeError("invalid_json", "The event is not valid JSON.") from None
    if not isinstance(event, dict):
        raise RealtimeError("invalid_type", "An event must be a JSON object.")
    return event


def _only(event: dict[str, Any], allowed: set[str]) -> None:
    for key in event:
        if key not in allowed:
            raise RealtimeError("unknown_parameter", f"Unknown parameter: '{key}'.", key)


Endpointing = Callable[[SegmenterSettings], SegmenterSettings]


def _endpointing(turn: TurnDetection, rate: int) -> Endpointing:
    """``server_vad`` settings as the stream's segmenter settings."""

    def apply(s: SegmenterSettings) -> SegmenterSettings:
        return dataclasses.replace(
            s,
            threshold=turn.threshold,
            endpoint_silence=round(turn.silence_duration_ms * rate / 1000),
            pre_roll=round(turn.prefix_padding_ms * rate / 1000),
        )

    return apply
