"""What the client audio protocols share: ``/v1/stream``, OpenAI Realtime, Wyoming.

Each protocol adapter only translates its wire format; the path behind it is
one and the same, so every client gets the same limits and the same captions:

- :class:`AudioFeed`: client PCM (mono float32 at the client's rate) into a
  stream, resampled to the model's rate, in pieces of at most ``PIECE_S``,
  each paced by the ingest throttle (:class:`~streamer.core.wire.RateGuard`)
  before it is fed, so no protocol gets past ``max_audio_rate``.
- Decoders for the PCM forms the protocols carry besides ``/v1/stream``'s
  (:class:`~streamer.core.wire.PcmDecoder`): signed integers of 1-4 bytes
  (Wyoming) and G.711 μ-law/A-law (OpenAI Realtime).
- :func:`choose_language`: a client's language against ``client_languages``.
- :class:`Transcript`: the append-only text of one utterance made of one or
  more segments, which both protocols stream as "committed text as it grows".
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import PurePath
from typing import Protocol

import numpy as np

from streamer.audio.resample import StreamResampler
from streamer.core.wire import IngestPolicy, RateGuard
from streamer.errors import ProtocolError
from streamer.service.streams import StreamRunner
from streamer.types import AudioBlock, FloatArray, Hypothesis

__all__ = [
    "PIECE_S",
    "AudioFeed",
    "IngestObserver",
    "Transcript",
    "choose_language",
    "decode_g711",
    "decode_int_pcm",
    "model_name",
]

log = logging.getLogger(__name__)

#: The most audio (seconds) fed to a stream at once; longer frames are cut.
PIECE_S = 0.5
INVALID_PAYLOAD = 1007


class IngestObserver(Protocol):
    """What the metrics learn from client streams."""

    def audio_received(self, seconds: float) -> None: ...

    def throttled(self, seconds: float) -> None: ...

    def client_stream_closed(self, code: int) -> None: ...


class AudioFeed:
    """Feeds one client's audio into its stream, throttled and resampled.

    ``pause(seconds)`` waits out the throttle (it returns early at shutdown);
    while :meth:`feed` pauses or the stream holds its input back, the caller
    reads nothing more from the client, so TCP pushes back on the client.
    """

    def __init__(
        self,
        runner: StreamRunner,
        rate: int,
        *,
        max_audio_rate: float,
        burst_s: float,
        pause: Callable[[float], Awaitable[None]],
        clock: Callable[[], float],
        observer: IngestObserver | None = None,
    ) -> None:
        self.runner = runner
        self.rate = rate
        self.resampler = StreamResampler(rate, runner.engine.sample_rate)
        self.guard = RateGuard(max_audio_rate, burst_s, clock())
        self.pause = pause
        self.clock = clock
        self.observer = observer
        self.piece = max(1, round(PIECE_S * rate))
        self.position = 0  # samples at the model's rate fed so far

    async def feed(self, pcm: FloatArray) -> None:
        """Mono float32 at the client's rate; returns once every piece is fed."""
        if self.observer is not None:
            self.observer.audio_received(len(pcm) / self.rate)
        for i in range(0, len(pcm), self.piece):
            part = pcm[i : i + self.piece]
            wait = self.guard.admit(len(part) / self.rate, self.clock())
            if wait > 0:
                if self.observer is not None:
                    self.observer.throttled(wait)
                await self.pause(wait)
            await self._feed_model_rate(self.resampler.process(part))

    async def flush(self) -> None:
        """The resampler's tail: call once, after the client's last audio."""
        await self._feed_model_rate(self.resampler.flush())

    async def _feed_model_rate(self, samples: FloatArray) -> None:
        if not len(samples):
            return
        block = AudioBlock(
            self.runner.stream, self.position, samples, self.resampler.to_rate, self.clock()
        )
        self.position += len(samples)
        await self.runner.feed(block)


def decode_int_pcm(data: bytes, width: int, channels: int) -> FloatArray:
    """Little-endian signed integer PCM, ``width`` bytes a sample, interleaved → mono float32.

    8-bit samples are signed, as Wyoming's own converter (``audioop``) reads them.
    """
    if width not in (1, 2, 3, 4):
        raise ValueError(f"sample width {width} not in 1..4")
    frame = width * channels
    if len(data) % frame:
        raise ProtocolError(
            f"audio of {len(data)} bytes is not a whole number of {frame}-byte frames "
            f"({width}-byte samples, {channels} channel(s))",
            INVALID_PAYLOAD,
        )
    if width == 3:
        b = np.frombuffer(data, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        ints = (b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8 >> 8  # sign-extend 24 bits
    else:
        ints = np.frombuffer(data, dtype=f"<i{width}")
    pcm = (ints / float(1 << (8 * width - 1))).astype(np.float32)
    if channels > 1:
        pcm = pcm.reshape(-1, channels).mean(axis=1, dtype=np.float32)
    return pcm


def _g711_tables() -> dict[str, FloatArray]:
    """Decoding tables of ITU-T G.711 (as Sun's reference ``g711.c``), scaled to [-1, 1)."""
    code = np.arange(256, dtype=np.int32)
    u = ~code & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    ulaw = np.where(u & 0x80, 0x84 - t, t - 0x84)
    a = code ^ 0x55
    seg = (a & 0x70) >> 4
    mant = (a & 0x0F) << 4
    mag = np.where(seg == 0, mant + 8, (mant + 0x108) << np.maximum(seg - 1, 0))
    alaw = np.where(a & 0x80, mag, -mag)
    return {
        "pcmu": (ulaw / 32768.0).astype(np.float32),
        "pcma": (alaw / 32768.0).astype(np.float32),
    }


_G711 = _g711_tables()


def decode_g711(data: bytes, law: str) -> FloatArray:
    """G.711 bytes (``law``: "pcmu" μ-law or "pcma" A-law), one per sample → float32."""
    return _G711[law][np.frombuffer(data, dtype=np.uint8)]


def choose_language(requested: str | None, policy: IngestPolicy, configured: str) -> str | None:
    """The source language a client asked for, as ``StreamFactory.create`` takes it.

    None (or the configured language itself) keeps the server's; a region
    (``en-US``) counts as its language. Anything else must be listed in
    ``websocket.client_languages``; otherwise ValueError says what is allowed.
    """
    if not requested:
        return None
    lang = requested.strip().lower().replace("_", "-").split("-", 1)[0]
    if lang == configured:
        return None
    if lang in policy.languages:
        return lang
    allowed = ", ".join(sorted({configured, *policy.languages}))
    raise ValueError(
        f"language {requested!r} is not allowed (allowed: {allowed}; "
        "the server's websocket.client_languages lists what clients may choose)"
    )


def model_name(model_id: str) -> str:
    """How clients see the configured model: a hub id as it is, a local folder by its name."""
    if model_id.startswith(("/", "~", ".")):
        return PurePath(model_id).name or model_id
    return model_id


class Transcript:
    """The text of one utterance as it grows: finals joined, then the committed part
    of the segment in progress.

    Only committed text counts (tentative text may still change), and each
    segment's committed text only grows until its final, which starts with it:
    so the text only grows too, and :meth:`add` returns what was appended. A
    final that does not start with what was already sent (it never should) stops
    the deltas; :attr:`final_text` is right regardless.
    """

    def __init__(self) -> None:
        self._finals: list[str] = []
        self._live = ""  # committed text of the segment in progress
        self.sent = ""  # what add() has returned so far, concatenated
        self._diverged = False

    @property
    def text(self) -> str:
        return " ".join(t for t in (*self._finals, self._live) if t)

    @property
    def final_text(self) -> str:
        """The finals so far, joined: the transcript once every segment is final."""
        return " ".join(t for t in self._finals if t)

    def add(self, event: Hypothesis) -> str:
        """Take a partial or final of this utterance; returns the text newly appended."""
        if event.kind == "partial":
            self._live = event.committed.rstrip()  # a trailing space may yet be stripped
        elif event.kind == "final":
            self._finals.append(event.text)
            self._live = ""
        else:
            return ""
        return self._advance()

    def close(self) -> str:
        """The utterance is over: its text is its finals; returns what that appends."""
        self._live = ""
        return self._advance()

    def _advance(self) -> str:
        full = self.text
        if self._diverged:
            return ""
        if not full.startswith(self.sent):
            self._diverged = True
            log.debug("text %r does not extend what was sent (%r): no more deltas", full, self.sent)
            return ""
        delta, self.sent = full[len(self.sent) :], full
        return delta
