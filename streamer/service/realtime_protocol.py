"""OpenAI Realtime transcription sessions, without the socket: events in, events out.

:func:`parse_session_update` checks a ``session.update`` (GA shape:
``session: {type: "transcription", audio: {input: {format, transcription,
turn_detection, noise_reduction}}, include}``) against what this server can
do and returns the new :class:`SessionConfig`; anything it cannot honour is a
:class:`RealtimeError`, which the adapter sends as an ``error`` event in the
protocol's shape (the session stays open, as OpenAI's does).

:class:`ItemTracker` maps streamer's caption events onto the protocol's
conversation items. Streamer transcribes while the audio arrives, so an
item's ``...transcription.delta`` events carry its committed text as it grows
(append-only; tentative text is never sent) and may come before the item is
``committed``; ``...transcription.completed`` carries the final transcript.

- ``turn_detection: server_vad`` (the default): every segment that streamer's
  voice-activity endpointing closes is an item: ``speech_started`` with its
  first text, then at its final ``speech_stopped``, ``committed``, the last
  delta and ``completed``.
- ``turn_detection: null``: the client's ``input_audio_buffer.commit`` ends
  an item, which holds every segment that started before the commit point.
  The commit closes the open segment at once; the item completes when every
  such segment has its final (the adapter asks the stream, see
  :meth:`ItemTracker.settle`).
- ``input_audio_buffer.clear`` drops the uncommitted item: nothing more is
  sent for it (the other sinks still get its captions: the audio was heard).

A commit also ends the current item with ``server_vad``. Segments are
attributed by where they start; when the engine is far behind, a segment may
be decoded together with the next one (catching up), whose text then joins
the earlier item.
"""

from __future__ import annotations

import re
import secrets
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from streamer.service.client_io import Transcript
from streamer.types import Hypothesis

__all__ = [
    "FORMATS",
    "ItemTracker",
    "RealtimeError",
    "SessionConfig",
    "TurnDetection",
    "error_event",
    "new_id",
    "parse_session_update",
    "server_event",
    "session_object",
]

#: Audio formats of ``audio.input.format.type``: bytes per sample, fixed rate (0: any).
FORMATS: Mapping[str, tuple[int, int]] = {
    "audio/pcm": (2, 0),
    "audio/pcmu": (1, 8000),
    "audio/pcma": (1, 8000),
}
#: The beta API's format strings, still sent by some clients.
_BETA_FORMATS = {"pcm16": "audio/pcm", "g711_ulaw": "audio/pcmu", "g711_alaw": "audio/pcma"}
DEFAULT_RATE = 24000
MIN_RATE, MAX_RATE = 8000, 192000
_LANG = re.compile(r"[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*")


def new_id(prefix: str) -> str:
    """An id in OpenAI's style (``event_…``, ``item_…``, ``sess_…``)."""
    return f"{prefix}_{secrets.token_hex(10)}"


class RealtimeError(Exception):
    """A client event this server refuses; sent as an ``error`` event."""

    def __init__(
        self, code: str, message: str, param: str | None = None, kind: str = "invalid_request_error"
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.kind = kind


def server_event(kind: str, **fields: Any) -> dict[str, Any]:
    return {"type": kind, "event_id": new_id("event"), **fields}


def error_event(exc: RealtimeError, client_event_id: str | None = None) -> dict[str, Any]:
    """The protocol's ``error`` event; ``error.event_id`` names the client event at fault."""
    error = {
        "type": exc.kind,
        "code": exc.code,
        "message": exc.message,
        "param": exc.param,
        "event_id": client_event_id,
    }
    return server_event("error", error=error)


@dataclass(frozen=True, slots=True)
class TurnDetection:
    """``server_vad`` settings, mapped onto streamer's endpointing for the stream."""

    threshold: float
    prefix_padding_ms: int
    silence_duration_ms: int


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """The effective session: what ``session.created``/``updated`` report."""

    turn_detection: TurnDetection | None
    format: str = "audio/pcm"
    rate: int = DEFAULT_RATE
    model: str | None = None
    language: str | None = None

    @property
    def sample_bytes(self) -> int:
        return FORMATS[self.format][0]


def session_object(cfg: SessionConfig, session_id: str) -> dict[str, Any]:
    """The session as the protocol shows it (GA transcription session)."""
    fmt: dict[str, Any] = {"type": cfg.format}
    if cfg.format == "audio/pcm":
        fmt["rate"] = cfg.rate
    turn: dict[str, Any] | None = None
    if cfg.turn_detection is not None:
        t = cfg.turn_detection
        turn = {
            "type": "server_vad",
            "threshold": t.threshold,
            "prefix_padding_ms": t.prefix_padding_ms,
            "silence_duration_ms": t.silence_duration_ms,
            "idle_timeout_ms": None,
        }
    transcription = {"model": cfg.model, "language": cfg.language, "prompt": ""}
    return {
        "type": "transcription",
        "object": "realtime.transcription_session",
        "id": session_id,
        "audio": {
            "input": {
                "format": fmt,
                "noise_reduction": None,
                "transcription": transcription,
                "turn_detection": turn,
            }
        },
        "include": None,
    }


# -- session.update ----------------------------------------------------------------------

_IGNORED_SESSION_KEYS = frozenset({"id", "object", "expires_at"})  # echoed back by some clients
_UNSUPPORTED_TRANSCRIPTION = ("delay", "keywords", "languages")


def _unknown(path: str) -> RealtimeError:
    return RealtimeError("unknown_parameter", f"Unknown parameter: '{path}'.", path)


def _unsupported(path: str, what: str) -> RealtimeError:
    return RealtimeError("unsupported_parameter", f"{what} is not supported by this server.", path)


def _object(value: object, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RealtimeError("invalid_type", f"Invalid type for '{path}': expected an object.", path)
    return value


def _keys(obj: dict[str, Any], path: str, allowed: frozenset[str] | set[str]) -> None:
    for key in obj:
        if key not in allowed:
            raise _unknown(f"{path}.{key}")


def _number(obj: dict[str, Any], key: str, path: str, lo: float, hi: float) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RealtimeError(
            "invalid_type", f"Invalid type for '{path}.{key}': expected a number.", f"{path}.{key}"
        )
    if not lo <= value <= hi:
        raise RealtimeError(
            "invalid_value",
            f"Invalid value for '{path}.{key}': {value} is outside {lo:g}..{hi:g}.",
            f"{path}.{key}",
        )
    return float(value)


def parse_session_update(
    event: dict[str, Any],
    current: SessionConfig,
    default_turn: TurnDetection,
    *,
    stream_turn: TurnDetection | None = None,
) -> SessionConfig:
    """The session after ``event`` (a ``session.update``); fields left out keep their values.

    ``stream_turn``: audio was appended, so the stream exists, with this
    endpointing; it and the stream's format and language can no longer change
    (only whether ``server_vad`` or the client ends items).
    """
    started = stream_turn is not None
    session = _object(event.get("session"), "session")
    _keys(session, "session", {"type", "audio", "include", *_IGNORED_SESSION_KEYS})
    kind = session.get("type")
    if kind != "transcription":
        raise RealtimeError(
            "unsupported_value" if isinstance(kind, str) else "missing_required_parameter",
            f"Only transcription sessions are served: 'session.type' must be 'transcription', "
            f"got {kind!r}.",
            "session.type",
        )
    if session.get("include"):
        raise _unsupported("session.include", "'include' (logprobs)")
    cfg = current
    audio = _object(session.get("audio", {}), "session.audio")
    _keys(audio, "session.audio", {"input"})
    inp = _object(audio.get("input", {}), "session.audio.input")
    path = "session.audio.input"
    _keys(inp, path, {"format", "transcription", "turn_detection", "noise_reduction"})
    if inp.get("noise_reduction") is not None:
        raise _unsupported(f"{path}.noise_reduction", "Noise reduction (send null)")
    if "format" in inp:
        cfg = _parse_format(inp["format"], cfg, f"{path}.format")
    if "transcription" in inp and inp["transcription"] is not None:
        cfg = _parse_transcription(inp["transcription"], cfg, f"{path}.transcription")
    if "turn_detection" in inp:
        base = cfg.turn_detection or stream_turn or default_turn
        turn = _parse_turn(inp["turn_detection"], base, f"{path}.turn_detection")
        if turn is not None and stream_turn is not None and turn != stream_turn:
            raise RealtimeError(
                "invalid_value",
                "turn_detection settings cannot change once audio was appended "
                "(only its type: server_vad or null).",
                f"{path}.turn_detection",
            )
        cfg = replace(cfg, turn_detection=turn)
    if started and (cfg.format, cfg.rate, cfg.language) != (
        current.format,
        current.rate,
        current.language,
    ):
        raise RealtimeError(
            "invalid_value",
            "The audio format and language cannot change once audio was appended.",
            path,
        )
    return cfg


def _parse_format(value: object, cfg: SessionConfig, path: str) -> SessionConfig:
    if isinstance(value, str):  # the beta API's form
        if value not in _BETA_FORMATS:
            raise RealtimeError(
                "invalid_value",
                f"Invalid value: '{value}'. Supported values are: {', '.join(_BETA_FORMATS)}.",
                path,
            )
        kind = _BETA_FORMATS[value]
        return replace(cfg, format=kind, rate=FORMATS[kind][1] or DEFAULT_RATE)
    fmt = _object(value, path)
    _keys(fmt, path, {"type", "rate"})
    kind = fmt.get("type", "audio/pcm")
    if kind not in FORMATS:
        raise RealtimeError(
            "invalid_value",
            f"Invalid value: '{kind}'. Supported values are: {', '.join(FORMATS)}.",
            f"{path}.type",
        )
    fixed = FORMATS[kind][1]
    rate = fmt.get("rate")
    if rate is None:
        rate = fixed or DEFAULT_RATE
    elif isinstance(rate, bool) or not isinstance(rate, int):
        raise RealtimeError(
            "invalid_type", f"Invalid type for '{path}.rate': expected an integer.", f"{path}.rate"
        )
    elif fixed and rate != fixed:
        raise RealtimeError(
            "invalid_value", f"{kind} is always {fixed} Hz, got rate {rate}.", f"{path}.rate"
        )
    elif not MIN_RATE <= rate <= MAX_RATE:
        raise RealtimeError(
            "invalid_value",
            f"Invalid value for '{path}.rate': {rate} is outside {MIN_RATE}..{MAX_RATE} Hz.",
            f"{path}.rate",
        )
    return replace(cfg, format=str(kind), rate=int(rate))


def _parse_transcription(value: object, cfg: SessionConfig, path: str) -> SessionConfig:
    tr = _object(value, path)
    _keys(tr, path, {"model", "language", "prompt", *_UNSUPPORTED_TRANSCRIPTION})
    for key in _UNSUPPORTED_TRANSCRIPTION:
        if tr.get(key) is not None:
            raise _unsupported(f"{path}.{key}", f"'{key}'")
    if tr.get("prompt"):
        raise _unsupported(f"{path}.prompt", "A transcription prompt")
    model = tr.get("model", cfg.model)
    if model is not None and not isinstance(model, str):
        raise RealtimeError(
            "invalid_type", f"Invalid type for '{path}.model': expected a string.", f"{path}.model"
        )
    language = tr.get("language", cfg.language)
    if language is not None and (not isinstance(language, str) or not _LANG.fullmatch(language)):
        raise RealtimeError(
            "invalid_value",
            f"Invalid value for '{path}.language': expected an ISO-639-1 code such as 'en'.",
            f"{path}.language",
        )
    return replace(cfg, model=model, language=language)


def _parse_turn(value: object, default: TurnDetection, path: str) -> TurnDetection | None:
    if value is None:
        return None
    turn = _object(value, path)
    _keys(
        turn,
        path,
        {"type", "threshold", "prefix_padding_ms", "silence_duration_ms", "idle_timeout_ms",
         "create_response", "interrupt_response", "eagerness"},
    )  # fmt: skip
    kind = turn.get("type", "server_vad")
    if kind != "server_vad":
        raise RealtimeError(
            "unsupported_value",
            f"turn_detection type {kind!r} is not supported: use 'server_vad' or null.",
            f"{path}.type",
        )
    if turn.get("idle_timeout_ms") is not None:
        raise _unsupported(f"{path}.idle_timeout_ms", "'idle_timeout_ms'")
    if turn.get("eagerness") is not None:
        raise _unsupported(f"{path}.eagerness", "'eagerness' (semantic_vad only)")
    threshold = _number(turn, "threshold", path, 0.01, 0.99)
    padding = _number(turn, "prefix_padding_ms", path, 0, 5000)
    silence = _number(turn, "silence_duration_ms", path, 100, 10000)
    return TurnDetection(
        threshold=default.threshold if threshold is None else threshold,
        prefix_padding_ms=default.prefix_padding_ms if padding is None else round(padding),
        silence_duration_ms=default.silence_duration_ms if silence is None else round(silence),
    )


# -- items -------------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Item:
    id: str
    transcript: Transcript = field(default_factory=Transcript)
    boundary: int | None = None  # committed or cleared by the client: ends at this sample
    discard: bool = False  # cleared: nothing more is sent for it
    start: float | None = None  # stream seconds of its first segment
    seconds: float = 0.0  # committed by the client: the audio it covers (usage)


class ItemTracker:
    """Caption events of one stream → the Realtime item events of its client.

    Pure (no clock, no socket). Positions are samples of the stream at
    ``rate`` (the model's). ``vad``: whether streamer's endpointing ends items
    (``server_vad``) or only the client's commits do (``turn_detection: null``).
    """

    def __init__(self, rate: int, *, vad: bool = True) -> None:
        self.rate = rate
        self.vad = vad
        self._current: _Item | None = None
        self._waiting: deque[_Item] = deque()  # committed/cleared, segments still to come
        self._previous: str | None = None  # the last committed item's id
        self.last_cut = 0  # where the uncommitted audio begins

    @property
    def waiting(self) -> bool:
        """A commit or clear waits for segments that started before it."""
        return bool(self._waiting)

    def uncommitted_ms(self, at: int) -> float:
        return max(0, at - self.last_cut) * 1000 / self.rate

    def on_event(self, event: Hypothesis) -> list[dict[str, Any]]:
        """A partial or final of the stream (in publication order)."""
        if event.kind not in ("partial", "final"):
            return []
        out: list[dict[str, Any]] = []
        at = round(event.start * self.rate)
        while self._waiting and at >= (self._waiting[0].boundary or 0):
            out += self._complete(self._waiting.popleft())  # later audio: it has all its segments
        if self._waiting:
            item = self._waiting[0]
        elif self._current is not None:
            item = self._current
        else:
            item = self._current = _Item(new_id("item"))
            if self.vad:
                ms = round(event.start * 1000)
                out.append(
                    server_event(
                        "input_audio_buffer.speech_started", audio_start_ms=ms, item_id=item.id
                    )
                )
        if item.discard:
            return out
        if item.start is None:
            item.start = event.start
        delta = item.transcript.add(event)
        turn_ends = event.kind == "final" and self.vad and item is self._current
        if turn_ends:
            self._current = None
            self.last_cut = max(self.last_cut, round(event.end * self.rate))
            ms = round(event.end * 1000)
            out.append(
                server_event("input_audio_buffer.speech_stopped", audio_end_ms=ms, item_id=item.id)
            )
            out.append(self._committed(item))
        if delta:
            out.append(self._delta(item, delta))
        if turn_ends:
            out += self._complete(item, seconds=event.end - item.start)
        return out

    def commit(self, at: int) -> list[dict[str, Any]]:
        """The client committed the audio up to sample ``at`` (the stream's cut point)."""
        item = self._current or _Item(new_id("item"))
        self._current = None
        item.boundary = at
        item.seconds = max(0, at - self.last_cut) / self.rate
        self.last_cut = max(self.last_cut, at)
        self._waiting.append(item)
        return [self._committed(item)]

    def clear(self, at: int) -> list[dict[str, Any]]:
        """The client dropped the audio up to ``at``: its item is never committed."""
        item = self._current or _Item(new_id("item"))
        self._current = None
        item.boundary, item.discard = at, True
        self.last_cut = max(self.last_cut, at)
        self._waiting.append(item)
        return [server_event("input_audio_buffer.cleared")]

    def settle(self, pending_before: Callable[[int], bool]) -> list[dict[str, Any]]:
        """Complete the committed items none of whose segments still waits for its final.

        ``pending_before(at)``: a segment starting before sample ``at`` has no final yet.
        Call after every event published so far went through :meth:`on_event`.
        """
        out: list[dict[str, Any]] = []
        while self._waiting and not pending_before(self._waiting[0].boundary or 0):
            out += self._complete(self._waiting.popleft())
        return out

    def finish(self) -> list[dict[str, Any]]:
        """The stream ended and all its events went through: complete what is left.

        The open item (text the client did not commit) is committed first.
        """
        out: list[dict[str, Any]] = []
        while self._waiting:
            out += self._complete(self._waiting.popleft())
        item, self._current = self._current, None
        if item is not None:  # (an item exists once an event of it came)
            out.append(self._committed(item))
            out += self._complete(item)
        return out

    # -- events ----------------------------------------------------------------------

    def _committed(self, item: _Item) -> dict[str, Any]:
        event = server_event(
            "input_audio_buffer.committed", previous_item_id=self._previous, item_id=item.id
        )
        self._previous = item.id
        return event

    def _delta(self, item: _Item, text: str) -> dict[str, Any]:
        return server_event(
            "conversation.item.input_audio_transcription.delta",
            item_id=item.id,
            content_index=0,
            delta=text,
        )

    def _complete(self, item: _Item, seconds: float | None = None) -> list[dict[str, Any]]:
        if item.discard:
            return []
        out = []
        tail = item.transcript.close()
        if tail:
            out.append(self._delta(item, tail))
        if seconds is None:
            seconds = item.seconds
        usage = {"type": "duration", "seconds": round(max(0.0, seconds), 3)}
        out.append(
            server_event(
                "conversation.item.input_audio_transcription.completed",
                item_id=item.id,
                content_index=0,
                transcript=item.transcript.final_text,
                usage=usage,
            )
        )
        return out
