"""Endpointing from per-frame speech probabilities.

The segmenter is fed the voice-activity detector's speech probability for
consecutive frames of ``frame_samples`` samples and tells where speech
segments start and end, in absolute samples. Hysteresis (a lower threshold to
leave speech than to enter it) keeps it from flapping on weak syllables; a
segment is only confirmed after ``min_speech`` samples of speech, so clicks
and single noisy frames never start decoding.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SegmenterSettings:
    frame_samples: int = 512
    threshold: float = 0.5
    min_speech: int = 4000  # samples of speech before a segment is confirmed
    endpoint_silence: int = 9600  # samples of silence that end a segment
    pre_roll: int = 4800  # samples kept before the first speech frame

    @property
    def exit_threshold(self) -> float:
        return max(0.01, self.threshold - 0.15)


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    start: int  # first sample of the segment (with pre-roll)


@dataclass(frozen=True, slots=True)
class SpeechEnded:
    end: int  # sample after the last speech frame
    silence_end: int  # where the endpointing silence was observed up to


SegmenterEvent = SpeechStarted | SpeechEnded


class Segmenter:
    """Pure state machine: frames in, segment boundaries out."""

    def __init__(self, settings: SegmenterSettings, floor: int = 0) -> None:
        self.s = settings
        self.position = 0  # samples covered by the probabilities received so far
        self._floor = floor  # a segment never starts before this sample
        self._candidate: int | None = None  # first speech frame of an unconfirmed run
        self._speech_run = 0
        self.in_segment = False
        self._last_speech_end = 0
        self._silence = 0

    def set_floor(self, sample: int) -> None:
        """Forbid segments to start before ``sample`` (the end of the last one)."""
        self._floor = max(self._floor, sample)

    def feed(self, probs: Iterable[float]) -> list[SegmenterEvent]:
        events: list[SegmenterEvent] = []
        fs = self.s.frame_samples
        for p in probs:
            frame_start = self.position
            self.position += fs
            if not self.in_segment:
                if p >= self.s.threshold:
                    if self._candidate is None:
                        self._candidate = frame_start
                        self._speech_run = 0
                    self._speech_run += fs
                    if self._speech_run >= self.s.min_speech:
                        start = max(self._floor, self._candidate - self.s.pre_roll, 0)
                        self.in_segment = True
                        self._last_speech_end = self.position
                        self._silence = 0
                        self._candidate = None
                        events.append(SpeechStarted(start))
                elif p < self.s.exit_threshold:
                    self._candidate = None
                    self._speech_run = 0
            else:
                if p >= self.s.exit_threshold:
                    self._last_speech_end = self.position
                    self._silence = 0
                else:
                    self._silence += fs
                    if self._silence >= self.s.endpoint_silence:
                        self.in_segment = False
                        events.append(SpeechEnded(self._last_speech_end, self.position))
        return events

    def cut(self, at: int) -> None:
        """A segment was closed at ``at`` (max length): speech continuing is a new segment."""
        self.set_floor(at)
        if self.in_segment:
            self._last_speech_end = max(self._last_speech_end, at)

    @property
    def last_speech_end(self) -> int:
        return self._last_speech_end
