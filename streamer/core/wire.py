"""The client audio protocol of ``/v1/stream``, without the sockets.

Everything a client sends is checked here: the JSON ``start`` message, the
control messages after it and the binary PCM frames. A violation raises
:class:`~streamer.errors.ProtocolError` whose ``close_code`` is the WebSocket
close code the adapter answers with (README "WebSocket protocol"):

- 1003: data of the wrong kind (audio before ``start``, text where audio is expected)
- 1007: payload that cannot be decoded (bad JSON, truncated PCM, non-finite floats)
- 1008: a well-formed message the server refuses (unknown field, bad value, option
  not allowed)

A ``start`` may carry ``resume`` (:class:`Resume`): a client that lost its
connection continues its stream, possibly on another daemon. Both numbers are
the client's word, so they are bounded here and the server only lets them
push numbering up (README "Resuming a stream").

:class:`RateGuard` is the pure arithmetic of the ingest throttle: the adapter
passes the clock in.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from streamer.errors import ProtocolError

__all__ = [
    "ENCODINGS",
    "IngestPolicy",
    "PcmDecoder",
    "RateGuard",
    "Resume",
    "StartMessage",
    "parse_auth",
    "parse_control",
    "parse_start",
]

#: Bytes per sample of each PCM encoding clients may send.
ENCODINGS = {"pcm_s16le": 2, "pcm_f32le": 4}
MIN_RATE, MAX_RATE = 8000, 192000
MAX_CHANNELS = 8
STREAM_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_TOKEN = 4096
#: ``resume.seq`` at most: numbers stay exact in JavaScript (2**53) with room
#: for 2**32 more events after it.
MAX_RESUME_SEQ = 2**53 - 2**32
#: ``resume.offset`` at most, in seconds (about 31 years of audio).
MAX_RESUME_OFFSET_S = 1e9

UNSUPPORTED = 1003
INVALID_PAYLOAD = 1007
POLICY = 1008

_START_FIELDS = frozenset(
    {"type", "stream", "sample_rate", "encoding", "channels", "language", "task", "token",
     "partials", "resume", "targets"}
)  # fmt: skip
#: Most translation targets one stream may ask for.
MAX_TARGETS = 16


@dataclass(frozen=True, slots=True)
class IngestPolicy:
    """What a client may choose: empty sets mean the server's configuration is fixed."""

    languages: frozenset[str] = frozenset()
    tasks: frozenset[str] = frozenset()
    targets: frozenset[str] = frozenset()  # translation targets (``websocket.client_targets``)


@dataclass(frozen=True, slots=True)
class Resume:
    """Where a reconnecting client's stream goes on: after event ``seq``, at
    ``offset`` seconds of stream audio (the end of the last final it got)."""

    seq: int
    offset: float

    def to_wire(self) -> dict[str, Any]:
        return {"seq": self.seq, "offset": self.offset}


@dataclass(frozen=True, slots=True)
class StartMessage:
    """A validated ``start``; ``stream`` None lets the server pick an id."""

    stream: str | None
    sample_rate: int
    encoding: str
    channels: int
    language: str | None = None
    task: str | None = None
    token: str | None = None
    partials: bool = True
    resume: Resume | None = None
    targets: tuple[str, ...] | None = None  # None: the server's [translation] targets

    def ready(
        self, model_sample_rate: int, stream: str, resume: Resume | None = None
    ) -> dict[str, Any]:
        """The server's acknowledgement, sent before the client's first audio frame;
        ``resume``: where the resumed stream actually goes on (seq, offset)."""
        reply: dict[str, Any] = {
            "type": "ready",
            "v": 1,
            "stream": stream,
            "sample_rate": self.sample_rate,
            "encoding": self.encoding,
            "channels": self.channels,
            "model_sample_rate": model_sample_rate,
        }
        if self.language is not None:
            reply["language"] = self.language
        if self.task is not None:
            reply["task"] = self.task
        if resume is not None:
            reply["resume"] = resume.to_wire()
        return reply


def _json_object(text: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise ProtocolError(f"{what} is not valid JSON", INVALID_PAYLOAD) from None
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be a JSON object", POLICY)
    return value


def _int_field(msg: dict[str, Any], key: str, default: int | None = None) -> int:
    value = msg.get(key, default)
    if value is None:
        raise ProtocolError(f"start: {key!r} is required", POLICY)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"start: {key!r} must be an integer, got {value!r}", POLICY)
    return value


def _choice(msg: dict[str, Any], key: str, allowed: frozenset[str]) -> str | None:
    value = msg.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ProtocolError(f"start: {key!r} must be a string", POLICY)
    if not allowed:
        raise ProtocolError(f"start: this server does not let clients choose {key!r}", POLICY)
    if value not in allowed:
        listed = ", ".join(sorted(allowed))
        raise ProtocolError(f"start: {key} {value!r} is not allowed (allowed: {listed})", POLICY)
    return value


def _resume(msg: dict[str, Any], stream: str | None) -> Resume | None:
    """``resume``: ``{"seq": int, "offset": seconds}``, both required and bounded."""
    value = msg.get("resume")
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"seq", "offset"}:
        raise ProtocolError('start: \'resume\' must be {"seq": N, "offset": S}', POLICY)
    if stream is None:
        raise ProtocolError("start: 'resume' needs the 'stream' it continues", POLICY)
    seq, offset = value["seq"], value["offset"]
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= MAX_RESUME_SEQ:
        raise ProtocolError(f"start: resume.seq must be an integer in 0..{MAX_RESUME_SEQ}",
                            POLICY)  # fmt: skip
    if (
        isinstance(offset, bool)
        or not isinstance(offset, int | float)
        or not math.isfinite(offset)
        or not 0 <= offset <= MAX_RESUME_OFFSET_S
    ):
        raise ProtocolError(
            f"start: resume.offset must be seconds in 0..{MAX_RESUME_OFFSET_S:g}", POLICY
        )
    return Resume(seq, float(offset))


def _targets(msg: dict[str, Any], allowed: frozenset[str]) -> tuple[str, ...] | None:
    """``targets``: a list of translation targets the server allows (``[]``: none)."""
    value = msg.get("targets")
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise ProtocolError("start: 'targets' must be a list of language codes", POLICY)
    if len(value) > MAX_TARGETS:
        raise ProtocolError(f"start: at most {MAX_TARGETS} targets", POLICY)
    if value and not allowed:
        raise ProtocolError("start: this server does not let clients choose 'targets'", POLICY)
    for target in value:
        if target not in allowed:
            listed = ", ".join(sorted(allowed))
            raise ProtocolError(f"start: target {target!r} is not allowed (allowed: {listed})",
                                POLICY)  # fmt: skip
    return tuple(dict.fromkeys(value))


def parse_start(text: str, policy: IngestPolicy) -> StartMessage:
    """Validate the first message of ``/v1/stream``."""
    msg = _json_object(text, "start message")
    kind = msg.get("type")
    if kind != "start":
        raise ProtocolError(f"expected a 'start' message first, got type {kind!r}", POLICY)
    unknown = sorted(set(msg) - _START_FIELDS)
    if unknown:
        raise ProtocolError(f"start: unknown field {unknown[0]!r}", POLICY)
    stream = msg.get("stream")
    if stream is not None and (not isinstance(stream, str) or not STREAM_ID.fullmatch(stream)):
        raise ProtocolError("start: 'stream' must match [A-Za-z0-9_.-]{1,64}", POLICY)
    rate = _int_field(msg, "sample_rate")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise ProtocolError(f"start: sample_rate {rate} outside {MIN_RATE}..{MAX_RATE} Hz", POLICY)
    encoding = msg.get("encoding", "pcm_s16le")
    if encoding not in ENCODINGS:
        raise ProtocolError(
            f"start: encoding {encoding!r} not supported (expected {', '.join(ENCODINGS)})",
            POLICY,
        )
    channels = _int_field(msg, "channels", 1)
    if not 1 <= channels <= MAX_CHANNELS:
        raise ProtocolError(f"start: channels {channels} outside 1..{MAX_CHANNELS}", POLICY)
    token = msg.get("token")
    if token is not None and (not isinstance(token, str) or len(token) > MAX_TOKEN):
        raise ProtocolError("start: 'token' must be a string", POLICY)
    partials = msg.get("partials", True)
    if not isinstance(partials, bool):
        raise ProtocolError("start: 'partials' must be true or false", POLICY)
    return StartMessage(
        stream=stream,
        sample_rate=rate,
        encoding=str(encoding),
        channels=channels,
        language=_choice(msg, "language", policy.languages),
        task=_choice(msg, "task", policy.tasks),
        token=token,
        partials=partials,
        resume=_resume(msg, stream),
        targets=_targets(msg, policy.targets),
    )


def parse_control(text: str) -> str:
    """A text message after ``start``: returns its type (only ``stop`` today)."""
    stripped = text.lstrip()
    if not stripped.startswith("{"):
        raise ProtocolError("expected binary audio frames or a JSON control message", UNSUPPORTED)
    msg = _json_object(text, "control message")
    kind = msg.get("type")
    if kind != "stop":
        raise ProtocolError(f"unknown control message type {kind!r} (expected 'stop')", POLICY)
    if set(msg) != {"type"}:
        raise ProtocolError(f"stop: unknown field {sorted(set(msg) - {'type'})[0]!r}", POLICY)
    return "stop"


def parse_auth(text: str) -> str:
    """The first message of a browser caption client: ``{"type":"auth","token":…}``."""
    msg = _json_object(text, "auth message")
    token = msg.get("token")
    if msg.get("type") != "auth" or set(msg) != {"type", "token"}:
        raise ProtocolError('expected {"type":"auth","token":…} first', POLICY)
    if not isinstance(token, str) or len(token) > MAX_TOKEN:
        raise ProtocolError("auth: 'token' must be a string", POLICY)
    return token


class PcmDecoder:
    """Little-endian interleaved PCM bytes → mono float32 in [-1, 1]."""

    def __init__(self, encoding: str, channels: int) -> None:
        if encoding not in ENCODINGS:
            raise ValueError(f"unknown encoding {encoding!r}")
        self.encoding = encoding
        self.channels = channels
        self.frame_bytes = ENCODINGS[encoding] * channels

    def decode(self, data: bytes) -> npt.NDArray[np.float32]:
        if len(data) % self.frame_bytes:
            raise ProtocolError(
                f"audio frame of {len(data)} bytes is not a whole number of "
                f"{self.frame_bytes}-byte samples ({self.encoding}, {self.channels} channel(s))",
                INVALID_PAYLOAD,
            )
        if self.encoding == "pcm_s16le":
            pcm = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
        else:
            pcm = np.frombuffer(data, dtype="<f4").astype(np.float32)
            if not np.isfinite(pcm).all():
                raise ProtocolError("audio frame holds NaN or infinite samples", INVALID_PAYLOAD)
            np.clip(pcm, -1.0, 1.0, out=pcm)
        if self.channels > 1:
            pcm = pcm.reshape(-1, self.channels).mean(axis=1, dtype=np.float32)
        return pcm


class RateGuard:
    """Lets a client send audio at most ``factor`` × real time after a burst.

    A client may be ahead of real time by ``burst_s`` seconds of audio; past
    that, :meth:`admit` says how long to wait before reading more, which
    throttles it through TCP backpressure instead of growing our buffers.
    """

    def __init__(self, factor: float, burst_s: float, start: float) -> None:
        if factor <= 0 or burst_s < 0:
            raise ValueError("factor must be > 0 and burst_s >= 0")
        self.factor = factor
        self.burst_s = burst_s
        self.start = start
        self.received_s = 0.0

    def admit(self, seconds: float, now: float) -> float:
        """Count ``seconds`` of audio received at ``now``; returns the wait before the next."""
        self.received_s += seconds
        allowed = self.burst_s + self.factor * max(0.0, now - self.start)
        excess = self.received_s - allowed
        return excess / self.factor if excess > 0 and math.isfinite(excess) else 0.0
