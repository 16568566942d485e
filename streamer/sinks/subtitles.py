"""Subtitle files from finals: SubRip (``.srt``) and WebVTT (``.vtt``).

Cue timing: a final's ``start``/``end`` span its whole segment, VAD pre-roll
and trailing silence included. Finals with word timestamps (``words``) are
cut into cues at word boundaries instead, each at most ``MAX_CUE_CHARS``
characters and ``MAX_CUE_S`` seconds long (common subtitle guidelines: two
lines of about 42 characters, a few seconds on screen), and each cue runs
from its first word's start to its last word's end, so captions appear with
the speech rather than with the segment. Finals without words keep one cue
spanning their segment.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TextIO

from streamer.types import Hypothesis, Word

__all__ = [
    "MAX_CUE_CHARS",
    "MAX_CUE_S",
    "Cue",
    "cues_of",
    "format_srt_time",
    "format_vtt_time",
    "write_srt",
    "write_vtt",
]

MAX_CUE_CHARS = 84
MAX_CUE_S = 7.0


@dataclass(frozen=True, slots=True)
class Cue:
    start: float
    end: float
    text: str


def _clean(text: str) -> str:
    """One cue's text: no blank lines (they would end the cue early)."""
    lines = [line.strip() for line in text.strip().splitlines()]
    return "\n".join(line for line in lines if line)


def _word_cues(words: tuple[Word, ...]) -> list[Cue]:
    cues: list[Cue] = []
    group: list[Word] = []

    def flush() -> None:
        text = _clean("".join(w.word for w in group))
        if text:
            cues.append(Cue(group[0].start, max(group[-1].end, group[0].start), text))
        group.clear()

    for word in words:
        if group:
            chars = len("".join(w.word for w in group).strip()) + len(word.word)
            if chars > MAX_CUE_CHARS or word.end - group[0].start > MAX_CUE_S:
                flush()
        group.append(word)
    if group:
        flush()
    return cues


def cues_of(finals: Iterable[Hypothesis]) -> list[Cue]:
    """The cues of the finals (partials and blank finals skipped), in order."""
    out: list[Cue] = []
    for event in finals:
        if event.kind != "final":
            continue
        text = _clean(event.text)
        if not text:
            continue
        words = _word_cues(event.words) if event.words else []
        if words and _clean(" ".join(c.text for c in words)).split() == text.split():
            out.extend(words)
        else:  # no words, or they do not spell the text: one cue for the segment
            out.append(Cue(event.start, max(event.end, event.start), text))
    return out


def _clock(seconds: float, sep: str) -> str:
    total_ms = max(0, round(seconds * 1000))
    hours, rest = divmod(total_ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, ms = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{sep}{ms:03d}"


def format_srt_time(seconds: float) -> str:
    """``HH:MM:SS,mmm`` (SubRip), rounded to the millisecond; negatives clamp to 0."""
    return _clock(seconds, ",")


def format_vtt_time(seconds: float) -> str:
    """``HH:MM:SS.mmm`` (WebVTT)."""
    return _clock(seconds, ".")


def write_srt(finals: Iterable[Hypothesis], out: TextIO) -> int:
    """Write the finals' cues numbered from 1; returns the number of cues."""
    cues = cues_of(finals)
    for n, cue in enumerate(cues, 1):
        start, end = format_srt_time(cue.start), format_srt_time(cue.end)
        out.write(f"{n}\n{start} --> {end}\n{cue.text}\n\n")
    return len(cues)


def _vtt_text(text: str) -> str:
    """Cue text escaped for WebVTT (``&``, ``<``, ``>``; ``-->`` may not appear)."""
    escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return escaped.replace("--&gt;", "-&gt;")


def write_vtt(finals: Iterable[Hypothesis], out: TextIO) -> int:
    """Write a WebVTT file of the finals' cues; returns the number of cues."""
    cues = cues_of(finals)
    out.write("WEBVTT\n\n")
    for cue in cues:
        start, end = format_vtt_time(cue.start), format_vtt_time(cue.end)
        out.write(f"{start} --> {end}\n{_vtt_text(cue.text)}\n\n")
    return len(cues)
