"""Subtitle files: SRT and WebVTT cues, timed by word timestamps where finals have them."""

from __future__ import annotations

import io
import itertools

import pytest

from streamer.sinks.subtitles import (
    MAX_CUE_CHARS,
    MAX_CUE_S,
    cues_of,
    format_srt_time,
    format_vtt_time,
    write_srt,
    write_vtt,
)
from streamer.types import Hypothesis, Word

from .test_jsonl import final, partial


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "00:00:00,000"),
        (4.2, "00:00:04,200"),
        (59.9996, "00:01:00,000"),
        (3725.0404, "01:02:05,040"),
        (-0.3, "00:00:00,000"),
        (36000.5, "10:00:00,500"),
    ],
)
def test_srt_time(seconds: float, text: str) -> None:
    assert format_srt_time(seconds) == text


def test_write_srt_numbers_finals_from_one() -> None:
    out = io.StringIO()
    events = [
        final(0, "Hello there.", start=0.0, end=4.2),
        partial(1),  # ignored
        final(2, "   ", start=4.2, end=5.0),  # blank: no cue
        final(3, "Two\n\nlines", start=61.25, end=63.5),
    ]
    assert write_srt(events, out) == 2
    assert out.getvalue() == (
        "1\n00:00:00,000 --> 00:00:04,200\nHello there.\n\n"
        "2\n00:01:01,250 --> 00:01:03,500\nTwo\nlines\n\n"
    )


def test_vtt_time_and_escaping() -> None:
    assert format_vtt_time(3725.0404) == "01:02:05.040"
    out = io.StringIO()
    events = [final(0, "a < b & c --> d", start=1.0, end=2.5), partial(1)]
    assert write_vtt(events, out) == 1
    assert out.getvalue() == "WEBVTT\n\n00:00:01.000 --> 00:00:02.500\na &lt; b &amp; c -&gt; d\n\n"
    empty = io.StringIO()
    assert write_vtt([], empty) == 0 and empty.getvalue() == "WEBVTT\n\n"


def timed(text: str, start: float, step: float) -> tuple[Word, ...]:
    return tuple(
        Word(" " + w, start + i * step, start + (i + 1) * step) for i, w in enumerate(text.split())
    )


def test_cues_start_and_end_with_the_words() -> None:
    words = timed("Hello there.", 1.3, 0.4)
    cues = cues_of([final(0, "Hello there.", start=0.9, end=3.5, words=words)])
    assert [(c.start, c.end, c.text) for c in cues] == [(1.3, pytest.approx(2.1), "Hello there.")]
    out = io.StringIO()
    write_srt([final(0, "Hello there.", start=0.9, end=3.5, words=words)], out)
    assert out.getvalue() == "1\n00:00:01,300 --> 00:00:02,100\nHello there.\n\n"


def test_long_finals_split_at_word_boundaries() -> None:
    text = " ".join(f"word{i:02d}" for i in range(40))  # 279 characters
    words = timed(text, 10.0, 0.3)  # 12 s of speech
    cues = cues_of([final(0, text, start=9.8, end=22.5, words=words)])
    assert len(cues) > 2
    assert " ".join(c.text for c in cues) == text
    for c in cues:
        assert len(c.text) <= MAX_CUE_CHARS and c.end - c.start <= MAX_CUE_S + 1e-9
    assert all(a.end <= b.start + 1e-9 for a, b in itertools.pairwise(cues))


def test_words_that_do_not_spell_the_text_fall_back_to_the_segment() -> None:
    event = final(0, "Hello there.", start=0.9, end=3.5, words=timed("Hello", 1.0, 0.5))
    assert [(c.start, c.end) for c in cues_of([event])] == [(0.9, 3.5)]
    plain: Hypothesis = final(1, "No words.", start=4.0, end=5.0)
    assert [(c.start, c.end, c.text) for c in cues_of([plain])] == [(4.0, 5.0, "No words.")]
