"""The engine's contract: a decode request from a session and the engine's answer.

Plain data of the pure core (DESIGN.md section 3): the session asks for a
window's decode after a prompt and forced tokens; the engine answers with the
new tokens, their bytes and, when asked, their alignment (AlignAtt peaks,
word-timestamp spans). Attention tensors never leave the engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from streamer.types import FloatArray

__all__ = ["DecodeRequest", "DecodeResult", "RequestKind"]

RequestKind = Literal["partial", "final"]


@dataclass(frozen=True, slots=True)
class DecodeRequest:
    """Decode ``audio`` (samples ``[start, end)``) after ``prompt`` + ``forced`` tokens."""

    stream: str
    request_id: int
    kind: RequestKind
    segment: int
    audio: FloatArray
    start: int
    end: int
    prompt: tuple[int, ...]
    forced: tuple[int, ...]
    max_new_tokens: int
    lang: str | None = None  # source language; None: the engine detects it
    task: str | None = None  # None: the model's configured task
    supersedes: int | None = None  # a request of this stream whose result is no longer wanted
    bulk: bool = False  # input arriving faster than real time: served after live streams
    # AlignAtt (> 0): stop at the first new token whose cross-attention peak lies in the
    # last ``alignatt_frames`` encoder frames of ``audio`` (that token is still returned).
    alignatt_frames: int = 0
    words: bool = False  # return each token's frame span (word timestamps)
    # A decoder that picks its output language by a token (an SED such as
    # xls-r-300m-en-to-15): decode into ``target`` (None: the model's configured one).
    target: str | None = None
    # More rows of the same window, one per extra target (``target`` set, own prompt,
    # forced tokens and cap): one encoder pass serves them all (``MultiTargetSession``).
    target_rows: tuple[DecodeRequest, ...] = ()


@dataclass(frozen=True, slots=True)
class DecodeResult:
    """The engine's answer: tokens generated after the forced prefix and their bytes."""

    request_id: int
    tokens: tuple[int, ...]
    pieces: tuple[bytes, ...]
    looped: bool = False
    lang: str | None = None
    error: str | None = None
    # Alignment (DESIGN.md section 3), in encoder frames of the window's audio:
    peaks: tuple[int, ...] = ()  # per token of ``tokens``: its attention peak frame
    spans: tuple[tuple[int, int], ...] = ()  # per forced + new token: (start, end) frames
    frame_samples: int = 0  # audio samples per encoder frame
    audio_frames: int = 0  # frames covering the window's audio
    targets: Mapping[str, DecodeResult] = field(default_factory=dict)  # per ``target_rows``
