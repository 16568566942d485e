"""A Wyoming ASR server: Home Assistant's protocol for local speech services.

Off by default (``[wyoming] enabled``). Plain TCP; each event is a JSON
header line (``type``, optional ``data``, ``data_length``, ``payload_length``),
then ``data_length`` bytes of JSON merged into ``data``, then the payload.

- ``describe`` → ``info``: one ASR program with the daemon's model, the
  languages a client may ask for, ``supports_transcript_streaming: true``.
- ``transcribe {language}``, ``audio-start {rate, width, channels}``,
  ``audio-chunk``…, ``audio-stop`` → ``transcript-start`` (at
  ``audio-start``), ``transcript-chunk`` with the committed text as it grows
  (while the audio streams), and after ``audio-stop`` the last chunk,
  ``transcript`` (the final text) and ``transcript-stop``. Clients that do not
  stream ignore the chunks and read ``transcript``.
- ``ping`` → ``pong``; other events are ignored, as Wyoming servers do.

Each request is a client stream (``wyoming-N``) of
:class:`~streamer.service.ingest.IngestService`, like a ``/v1/stream`` client:
the same slots, admission, throttle, idle timeout and shutdown, and its
captions reach every other sink. Any rate (8-192 kHz), width (1-4 bytes,
signed) and channel count (1-8, averaged) is accepted and resampled.

Wyoming has no authentication: the server binds to loopback by default and
the daemon warns when it does not. A header line that is not a JSON event,
an oversized line, data or payload close only that connection, with a log
line; a request the server cannot serve gets an ``error`` event first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from streamer import __version__
from streamer.config import Config
from streamer.errors import ProtocolError, StreamerError
from streamer.service.client_io import AudioFeed, Transcript, choose_language, decode_int_pcm
from streamer.service.client_io import model_name as display_name
from streamer.service.ingest import IngestService
from streamer.service.streams import StreamRunner
from streamer.sinks.access import Throttle
from streamer.sinks.fanout import Subscription

__all__ = ["PROTOCOL_VERSION", "WyomingEvent", "WyomingServer", "encode_event", "read_event"]

log = logging.getLogger(__name__)

ENDPOINT = "wyoming"
#: The Wyoming version whose events this server speaks (sent in every header).
PROTOCOL_VERSION = "1.8.0"
#: Longest header line, and longest JSON data section (bytes).
MAX_HEADER_BYTES = 64 * 1024
MAX_DATA_BYTES = 64 * 1024
#: Open connections at most (requests are also bounded by ``max_streams``).
MAX_CONNECTIONS = 64
#: Bytes written but not yet taken by the client before it is dropped as too slow.
MAX_WRITE_BUFFER = 1 << 20
MIN_RATE, MAX_RATE = 8000, 192000
MAX_CHANNELS = 8


class FramingError(Exception):
    """The bytes are not a Wyoming event: the connection is closed."""


@dataclass(frozen=True, slots=True)
class WyomingEvent:
    type: str
    data: dict[str, Any] = field(default_factory=dict)
    payload: bytes = b""


def encode_event(kind: str, data: dict[str, Any] | None = None, payload: bytes = b"") -> bytes:
    """One event on the wire, as the ``wyoming`` package writes it."""
    header: dict[str, Any] = {"type": kind, "version": PROTOCOL_VERSION}
    body = json.dumps(data, ensure_ascii=False).encode() if data else b""
    if body:
        header["data_length"] = len(body)
    if payload:
        header["payload_length"] = len(payload)
    return json.dumps(header, ensure_ascii=False).encode() + b"\n" + body + payload


def _length(header: dict[str, Any], key: str, limit: int) -> int:
    value = header.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise FramingError(f"{key} must be a non-negative integer, got {value!r}")
    if value > limit:
        raise FramingError(f"{key} {value} is over the limit of {limit} bytes")
    return value


async def read_event(reader: asyncio.StreamReader, max_payload: int) -> WyomingEvent | None:
    """The next event; None at the end of the stream (also mid-event: the peer left)."""
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError:
            return None
        except asyncio.LimitOverrunError:
            raise FramingError(f"header line over {MAX_HEADER_BYTES} bytes") from None
        if line.strip():
            break
    try:
        header = json.loads(line)
    except (ValueError, RecursionError):
        raise FramingError("header line is not JSON") from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise FramingError("header is not a JSON object with a string 'type'")
    data = header.get("data") or {}
    if not isinstance(data, dict):
        raise FramingError("'data' is not a JSON object")
    data_length = _length(header, "data_length", MAX_DATA_BYTES)
    payload_length = _length(header, "payload_length", max_payload)
    try:
        if data_length:
            extra = json.loads(await reader.readexactly(data_length))
            if not isinstance(extra, dict):
                raise FramingError("the data section is not a JSON object")
            data = {**data, **extra}
        payload = await reader.readexactly(payload_length) if payload_length else b""
    except asyncio.IncompleteReadError:
        return None
    except (ValueError, RecursionError):
        raise FramingError("the data section is not JSON") from None
    return WyomingEvent(header["type"], data, payload)


class WyomingServer:
    """The TCP listener; each connection is served by a :class:`_Connection`."""

    def __init__(self, ingest: IngestService, cfg: Config) -> None:
        self.ingest = ingest
        self.host = cfg.wyoming.host
        self._port = cfg.wyoming.port
        self.model = display_name(cfg.model.id)
        self.source_language = cfg.model.source_language
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._refused_log = Throttle()

    @property
    def port(self) -> int:
        """The bound port (the real one when 0 was asked for)."""
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(
                self._connected, self.host, self._port, limit=MAX_HEADER_BYTES
            )
        except OSError as exc:
            raise StreamerError(
                f"cannot listen on {self.host}:{self._port} (wyoming): {exc.strerror or exc}"
            ) from exc
        log.info("wyoming ASR server on tcp://%s:%d", self.host, self.port)

    async def close(self, timeout: float = 5.0) -> None:
        """Stop listening and drop the connections left (their requests ended already)."""
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._server.wait_closed()
        self._server = None

    def languages(self) -> list[str]:
        """What ``transcribe {language}`` may name (all of the model's when it detects)."""
        policy = self.ingest.policy.languages
        factory = self.ingest.factory
        model = factory.client.languages if factory is not None else frozenset()
        if "auto" in {self.source_language, *policy} and model:
            return sorted(model)
        return sorted({self.source_language, *policy} - {"auto"})

    def info(self) -> dict[str, Any]:
        attribution = {"name": "streamer", "url": ""}
        model = {
            "name": self.model,
            "attribution": attribution,
            "installed": True,
            "description": f"{self.model} (streaming)",
            "version": None,
            "languages": self.languages(),
        }
        program = {
            "name": "streamer",
            "attribution": attribution,
            "installed": True,
            "description": "streamer: streaming speech recognition and translation",
            "version": __version__,
            "models": [model],
            "supports_transcript_streaming": True,
        }
        empty: list[Any] = []
        return {"asr": [program], "tts": empty, "handle": empty, "intent": empty,
                "wake": empty, "mic": empty, "snd": empty}  # fmt: skip

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if len(self._writers) >= MAX_CONNECTIONS or self.ingest.stopping:
            if self._refused_log.ready() is not None:
                log.warning("wyoming: refusing %s: %d connections open", peer, len(self._writers))
            writer.transport.abort()
            return
        self._writers.add(writer)
        try:
            with self.ingest.serving():
                await _Connection(self, reader, writer, peer).run()
        except Exception:
            log.exception("wyoming connection from %s failed", peer)
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()


class _Refused(Exception):
    """The request cannot be served: an ``error`` event, then the connection closes."""

    def __init__(self, text: str, code: str) -> None:
        super().__init__(text)
        self.text, self.code = text, code


@dataclass(slots=True)
class _Request:
    """One ``transcribe`` … ``audio-stop``: its stream and what was sent of its text."""

    language: str | None
    runner: StreamRunner | None = None
    sub: Subscription | None = None
    feed: AudioFeed | None = None
    fmt: tuple[int, int, int] = (0, 0, 0)  # rate, width, channels
    transcript: Transcript = field(default_factory=Transcript)
    lang: str | None = None  # of the captions (detected when the stream detects)
    pump: asyncio.Task[None] | None = None


class _Connection:
    def __init__(
        self,
        server: WyomingServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: object,
    ) -> None:
        self.server = server
        self.ingest = server.ingest
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.request: _Request | None = None

    async def run(self) -> None:
        try:
            while True:
                event = await self._next()
                if event is None:
                    return
                await self._handle(event)
        except FramingError as exc:
            self.ingest.server.rejected(ENDPOINT, "protocol")
            log.warning("wyoming: closing the connection from %s: %s", self.peer, exc)
        except _Refused as exc:
            log.info("wyoming: refused a request from %s: %s", self.peer, exc.text)
            self._write("error", {"text": exc.text, "code": exc.code})
            with contextlib.suppress(ConnectionError, TimeoutError):
                async with asyncio.timeout(1.0):
                    await self.writer.drain()
        except ConnectionError:
            pass
        finally:
            self._abandon()

    async def _next(self) -> WyomingEvent | None:
        """The next event; None when the client left, the idle timeout or shutdown came.

        At shutdown (or idle) a request in progress is finished first: the
        client gets the transcript of the audio taken.
        """
        done: set[asyncio.Future[Any]] = set()
        if not self.ingest.stopping:  # (a client sending without pause must not delay it)
            read = asyncio.ensure_future(
                read_event(self.reader, self.ingest.server.max_frame_bytes)
            )
            stop = asyncio.ensure_future(self.ingest.wait_stopping())
            try:
                done, _ = await asyncio.wait(
                    (read, stop),
                    timeout=self.ingest.limits.idle_timeout_s,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                stop.cancel()
                if not read.done():
                    read.cancel()
            if read in done:
                return read.result()
        if not self.ingest.stopping:
            self.ingest.server.rejected(ENDPOINT, "idle")
            log.info("wyoming: closing the idle connection from %s", self.peer)
        if self.request is not None and self.request.runner is not None:
            await self._stop()
        return None

    async def _handle(self, event: WyomingEvent) -> None:
        kind, data = event.type, event.data
        if kind == "describe":
            self._write("info", self.server.info())
        elif kind == "ping":
            self._write("pong", {"text": data.get("text")})
        elif kind == "transcribe":
            if self.request is not None and self.request.runner is not None:
                raise _Refused("transcribe during a request (audio-stop first)", "bad-order")
            self.request = _Request(language=self._language(data.get("language")))
        elif kind == "audio-start":
            await self._start(data)
        elif kind == "audio-chunk":
            await self._chunk(event)
        elif kind == "audio-stop":
            if self.request is not None and self.request.runner is not None:
                await self._stop()
        else:
            log.debug("wyoming: ignoring a %r event from %s", kind, self.peer)
        await self._drain()

    def _language(self, requested: object) -> str | None:
        if requested is not None and not isinstance(requested, str):
            raise _Refused("'language' must be a string", "bad-language")
        try:
            return choose_language(requested, self.ingest.policy, self.server.source_language)
        except ValueError as exc:
            raise _Refused(str(exc), "unsupported-language") from None

    async def _start(self, data: dict[str, Any]) -> None:
        ingest = self.ingest
        if self.request is not None and self.request.runner is not None:
            raise _Refused("audio-start during a request (audio-stop first)", "bad-order")
        request = self.request or _Request(language=None)  # no transcribe: the defaults
        self.request = request
        if ingest.factory is None:
            raise _Refused("the model is still loading", "not-ready")
        if ingest.stopping:
            raise _Refused("the server is shutting down", "shutting-down")
        request.fmt = _format(data)
        refusal = ingest.refusal(ENDPOINT)
        if refusal is not None:
            raise _Refused(refusal, "busy")
        stream = ingest.stream_name("wyoming")
        ingest.hold_slot(self)
        request.runner = runner = ingest.open_stream(stream, language=request.language)
        request.sub = sub = ingest.subscribe(stream, name=f"wyoming {stream}")
        request.feed = ingest.audio_feed(runner, request.fmt[0])
        lang = request.language or (None if self.server.source_language == "auto" else
                                    self.server.source_language)  # fmt: skip
        self._write("transcript-start", {"language": lang} if lang else None)
        request.pump = asyncio.create_task(self._pump(request, sub), name=f"wyoming-{stream}")
        log.info("wyoming stream %s started (%d Hz, %d bytes, %d channel(s)) from %s",
                 stream, *request.fmt, self.peer)  # fmt: skip

    async def _chunk(self, event: WyomingEvent) -> None:
        request = self.request
        if request is None or request.feed is None:
            log.debug("wyoming: audio-chunk before audio-start from %s ignored", self.peer)
            return
        fmt = _format(event.data, request.fmt)
        if fmt != request.fmt:
            raise _Refused(f"audio format changed within a request: {fmt} after {request.fmt}",
                           "bad-format")  # fmt: skip
        try:
            pcm = decode_int_pcm(event.payload, fmt[1], fmt[2])
        except ProtocolError as exc:
            raise _Refused(str(exc), "bad-audio") from None
        await request.feed.feed(pcm)

    async def _stop(self) -> None:
        """The request's audio is complete: finals, the transcript, transcript-stop."""
        request, self.request = self.request, None
        assert request is not None and request.runner is not None and request.feed is not None
        runner = request.runner
        try:
            await request.feed.flush()
            self.ingest.stop_feeding(runner)
            if not await runner.wait_done(self.ingest.limits.finalize_timeout_s):
                log.warning("stream %s did not finalise in time", runner.stream)
            assert request.sub is not None and request.pump is not None
            request.sub.close("end of stream")
            await request.pump  # every event of the stream went through
            tail = request.transcript.close()
            if tail:
                self._write("transcript-chunk", {"text": tail})
            data = {"text": request.transcript.final_text}
            if request.lang:
                data["language"] = request.lang
            self._write("transcript", data)
            self._write("transcript-stop")
        finally:
            self._end(request)

    async def _pump(self, request: _Request, sub: Subscription) -> None:
        async for event in sub:
            request.lang = event.lang or request.lang
            delta = request.transcript.add(event)
            if delta:
                self._write("transcript-chunk", {"text": delta})

    def _end(self, request: _Request) -> None:
        if request.pump is not None:
            request.pump.cancel()
        if request.sub is not None:
            self.ingest.unsubscribe(request.sub)
        if request.runner is not None:  # what it heard is still finalised for the other sinks
            self.ingest.stop_feeding(request.runner)
            self.ingest.finish_in_background(request.runner)
        self.ingest.release_slot(self)

    def _abandon(self) -> None:
        if self.request is not None:
            self._end(self.request)
            self.request = None

    def _write(self, kind: str, data: dict[str, Any] | None = None) -> None:
        """Send now (in order); a client that leaves too much unread is dropped."""
        if self.writer.is_closing():
            return
        if self.writer.transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            log.warning("wyoming: dropping %s: it does not read its events", self.peer)
            self.ingest.server.rejected(ENDPOINT, "slow")
            self.writer.transport.abort()
            return
        self.writer.write(encode_event(kind, data))

    async def _drain(self) -> None:
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()


def _format(
    data: dict[str, Any], default: tuple[int, int, int] | None = None
) -> tuple[int, int, int]:
    """(rate, width, channels) of an audio event, checked."""
    values = []
    for key, lo, hi, index in (("rate", MIN_RATE, MAX_RATE, 0), ("width", 1, 4, 1),
                               ("channels", 1, MAX_CHANNELS, 2)):  # fmt: skip
        value = data.get(key, None if default is None else default[index])
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise _Refused(f"audio {key} must be an integer in {lo}..{hi}, got {value!r}",
                           "bad-format")  # fmt: skip
        values.append(value)
    return values[0], values[1], values[2]
