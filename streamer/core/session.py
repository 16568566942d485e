"""One stream's streaming state: audio window, endpointing, stabilisation.

A ``StreamSession`` is sans-I/O (the style of websockets' ``protocol.py``):
the adapter feeds it with ``receive_*`` calls and drains
``requests_to_send()`` (decode work for the engine) and ``events_received()``
(caption events for the sinks). It never blocks, never reads a clock and never
touches a model, so a microphone, a file and a WebSocket client all drive the
very same object, and tests drive it with plain lists.

Per segment (DESIGN.md section 3): the window is ``[left context | segment]``;
every ``chunk`` samples of new audio a partial decode is requested, forced
with the tokens committed so far; LocalAgreement commits what consecutive
hypotheses agree on; at an endpoint, at ``max_segment`` or at end of stream
the segment is decoded once more (same forced prefix) and emitted as a final.
At most one request per stream is in flight; a final is never dropped, a
partial is simply not requested while the engine is busy (partials get
sparser instead of queues growing). When a segment closes while a partial is
still being decoded, its final is sent at once, marked as superseding that
partial (``supersedes``), so the engine can abandon the stale work instead of
making the final wait for it.

Falling behind: a stream has one decode in flight at a time, so when the
engine is slower than the audio, closed segments wait for their final. With
``catch_up`` on, segments waiting behind the next final are decoded together
with it (up to ``max_segment`` of audio): one decode instead of several, so a
stream with many short utterances catches up. None of those later segments
was ever shown (no partial is requested while a final is pending), so their
numbers are given back and segment numbering stays gapless. ``backlog`` is
the audio not yet finalised; the adapter stops taking audio while it exceeds
``max_backlog`` (a file or a client is read more slowly; a microphone drops
blocks, counted by the capture).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from streamer.core.requests import DecodeRequest as DecodeRequest
from streamer.core.requests import DecodeResult as DecodeResult
from streamer.core.requests import RequestKind as RequestKind
from streamer.core.segmenter import Segmenter, SegmenterSettings, SpeechEnded, SpeechStarted
from streamer.core.stabilizer import AlignAtt, LocalAgreement
from streamer.core.text import complete_utf8, render, word_boundaries
from streamer.core.window import AudioBuffer
from streamer.core.words import words_of
from streamer.types import FloatArray, Hypothesis, Word


@dataclass(frozen=True, slots=True)
class SessionSettings:
    """Streaming parameters in samples (the adapter converts from config units)."""

    sample_rate: int = 16000
    chunk: int = 16000  # new audio between partial decodes
    first_chunk: int = 0  # speech before a segment's first partial decode (0: ``chunk``)
    left_context: int = 0
    max_segment: int = 15 * 16000
    max_window: int = 30 * 16000
    agreement_n: int = 2
    max_tokens_per_second: float = 8.0
    min_tokens: int = 8
    prompt_max_tokens: int = 64
    partials: bool = True  # False: finals only (offline transcription)
    vad: bool = True  # False: every sample counts as speech
    tail_pad: int = 3200  # silence kept after the last speech sample in a final's window
    segmenter: SegmenterSettings = field(default_factory=SegmenterSettings)
    lang: str | None = None
    task: str | None = None  # "transcribe" | "translate"; None: the model's configured task
    catch_up: bool = True  # decode waiting segments together (False: one final per segment)
    max_backlog: int = 30 * 16000  # audio not yet finalised before the adapter holds back
    # No partial while nothing but silence arrived since the segment's last one (its
    # window would be the same speech with more silence after it): the pass is skipped
    # until speech resumes. Only possible when ``chunk`` is shorter than the segmenter's
    # ``endpoint_silence`` (a longer silence ends the segment); finals are unaffected.
    skip_silent_partials: bool = True
    policy: Literal["local_agreement", "alignatt"] = "local_agreement"
    alignatt_frames: int = 25  # AlignAtt: the newest encoder frames a committed token avoids
    alignatt_agreement: int = 1  # AlignAtt: hypotheses that must agree before a commit
    partial_holdback_words: int = 0  # tentative words left out of partials (from the end)
    word_timestamps: bool = True  # finals and committed partial text carry ``words``
    # A prompted final with some, but fewer tokens than this per second of segment
    # audio is decoded once more without the prompt (0: never).
    short_final_rate: float = 0.5

    def max_new_tokens(self, window_samples: int, forced: int) -> int:
        seconds = window_samples / self.sample_rate
        cap = self.min_tokens + math.ceil(seconds * self.max_tokens_per_second)
        return max(1, cap - forced)


SourceEventKind = Literal["source_lost", "source_restored"]


@dataclass(slots=True)
class TargetTrack:
    """One extra target's stabilisation of a segment (see ``MultiTargetSession``):
    the fields of ``_Segment`` that differ per output language."""

    agreement: LocalAgreement | AlignAtt
    committed_pieces: list[bytes] = field(default_factory=list)
    words: tuple[Word, ...] = ()
    shown: bool = False


@dataclass(slots=True)
class _Segment:
    index: int
    start: int
    agreement: LocalAgreement | AlignAtt
    ctx_start: int
    last_decode_end: int
    committed_pieces: list[bytes] = field(default_factory=list)
    end: int | None = None  # last speech sample (exclusive) once closed
    window_end: int | None = None  # end of the final decode's window
    lang: str | None = None
    shown: bool = False  # a partial of it was emitted
    heard: int = -1  # the segmenter's last speech end when its last partial was requested
    words: tuple[Word, ...] = ()  # timed words of the committed text (latest partial)
    retried: bool = False  # its final was decoded again without the prompt
    targets: dict[str, TargetTrack] = field(default_factory=dict)  # MultiTargetSession


class StreamSession:
    """Sans-I/O streaming state of one stream."""

    def __init__(
        self, stream: str, settings: SessionSettings, *, seq_after: int = 0, first_segment: int = 0
    ) -> None:
        """``seq_after``/``first_segment`` continue the numbering of an earlier session
        of the same stream id, so subscribers that drop duplicates by ``seq`` keep
        receiving when a client reconnects."""
        self.stream = stream
        self.s = settings
        self.buffer = AudioBuffer()
        self.segmenter = Segmenter(settings.segmenter)
        self._open: _Segment | None = None
        self._closing: deque[_Segment] = deque()  # closed, waiting for their final
        self._in_flight: dict[int, tuple[DecodeRequest, _Segment]] = {}
        self._abandoned: set[int] = set()  # superseded partials still in flight
        self._requests: list[DecodeRequest] = []
        self._events: list[Hypothesis] = []
        self._next_request = 0
        self._next_segment = first_segment
        self._seq = seq_after
        self._ended = False
        self._history: deque[int] = deque(maxlen=max(settings.prompt_max_tokens, 1))
        self._frame_remainder = 0  # samples not yet covered by synthetic VAD frames
        self.failed_windows = 0
        self.merged_segments = 0  # segments folded into an earlier final (catching up)

    # ------------------------------------------------------------------ input
    def receive_audio(self, samples: FloatArray) -> None:
        """Append mono float32 audio at ``settings.sample_rate``."""
        if self._ended:
            raise RuntimeError("audio after end of stream")
        self.buffer.append(samples)
        if not self.s.vad:
            self._frame_remainder += len(samples)
            frames = self._frame_remainder // self.s.segmenter.frame_samples
            self._frame_remainder -= frames * self.s.segmenter.frame_samples
            self._feed_probs([1.0] * frames)
        self._schedule()

    def receive_speech(self, probs: FloatArray | list[float]) -> None:
        """Speech probabilities of the next frames (``segmenter.frame_samples`` each)."""
        if not self.s.vad:
            return
        self._feed_probs(list(np.asarray(probs, dtype=np.float64)))
        self._schedule()

    def receive_end(self) -> None:
        """End of stream: the open segment is closed and finalised."""
        if self._ended:
            return
        self._ended = True
        self._enforce_max_segment()
        if self._open is not None and self._open.start >= self.buffer.end:
            # A segment cut at exactly max_segment as the stream ended holds no audio:
            # nothing to decode (an empty window), and it never showed anything, so it
            # gives its number back.
            self._open = None
            self._next_segment -= 1
        if self._open is not None:
            self._close_open(self.buffer.end, self.buffer.end)
        self._schedule()

    def request_final(self) -> None:
        """Finalise the current segment now (an explicit finalize request)."""
        if self._open is not None:
            self._cut_open(self.frontier)
            self._schedule()

    def receive_source_state(self, kind: SourceEventKind, detail: str) -> None:
        """The capture source went away or came back: tell the subscribers.

        A loss also closes the open segment (its final follows once decoded);
        the event carries the stream position and the next ``seq``.
        """
        if kind == "source_lost":
            self.request_final()
        at = self.buffer.end / self.s.sample_rate
        self._events.append(
            Hypothesis(
                kind=kind,
                stream=self.stream,
                segment=self._next_segment,
                seq=self._next_seq(),
                text=detail,
                start=at,
                end=at,
            )
        )

    def receive_result(self, result: DecodeResult) -> None:
        if result.request_id not in self._in_flight:
            raise ValueError(f"unexpected result for request {result.request_id}")
        req, seg = self._in_flight.pop(result.request_id)
        if result.request_id in self._abandoned:
            self._abandoned.discard(result.request_id)
            self._schedule()
            return
        if result.lang:
            seg.lang = result.lang
        if result.error is not None:
            self.failed_windows += 1
        if req.kind == "partial":
            if result.error is None:
                self._apply_partial(seg, req, result)
        elif self._cut_short(seg, req, result):
            # Whisper conditioned on the previous text sometimes ends a long
            # segment after a word or two (measured on the joined FLEURS
            # streams: 7.4 s of speech gave " The"); without the prompt it
            # decodes the segment. One retry, same window and forced tokens.
            seg.retried = True
            self._make_request(seg, "final", req.end, prompt=())
        else:
            self._emit_final(seg, result, req)
        self._schedule()

    def _cut_short(self, seg: _Segment, req: DecodeRequest, result: DecodeResult) -> bool:
        """A prompted final that stopped far too early for its speech (``short_final_rate``)."""
        if seg.retried or not req.prompt or result.error or result.looped:
            return False
        if len(self._closing) > 1:
            return False  # behind: other finals wait, no time for a second pass
        if len(result.tokens) >= req.max_new_tokens or seg.end is None:
            return False
        seconds = (seg.end - seg.start) / self.s.sample_rate
        tokens = len(req.forced) + len(result.tokens)
        # Nothing at all is the model hearing no speech: a retry would invite a
        # hallucination. A word or two for many seconds of speech is the failure.
        return 0 < tokens < self.s.short_final_rate * seconds

    # ----------------------------------------------------------------- output
    def requests_to_send(self) -> list[DecodeRequest]:
        out, self._requests = self._requests, []
        return out

    def events_received(self) -> list[Hypothesis]:
        out, self._events = self._events, []
        return out

    @property
    def ended(self) -> bool:
        """No more audio will come (``receive_end`` was called)."""
        return self._ended

    @property
    def done(self) -> bool:
        """Ended, and every segment's final has been emitted."""
        return (
            self._ended
            and self._open is None
            and not self._closing
            and not self._in_flight
            and not self._requests
        )

    @property
    def busy(self) -> bool:
        return bool(self._in_flight)

    @property
    def backlog(self) -> int:
        """Samples from the start of the oldest segment still waiting for its final."""
        if not self._closing:
            return 0
        return max(0, self.frontier - self._closing[0].start)

    @property
    def behind(self) -> bool:
        """More audio waits for finals than ``max_backlog``: hold the input back."""
        return self.backlog > self.s.max_backlog

    @property
    def frontier(self) -> int:
        """Samples whose speech/non-speech status is known."""
        if self._ended:
            return self.buffer.end
        return min(self.segmenter.position, self.buffer.end)

    # --------------------------------------------------------------- internals
    def _feed_probs(self, probs: list[float]) -> None:
        for ev in self.segmenter.feed(probs):
            if isinstance(ev, SpeechStarted):
                self._start_segment(ev.start)
            elif isinstance(ev, SpeechEnded) and self._open is not None:
                window_end = min(ev.end + self.s.tail_pad, ev.silence_end, self.buffer.end)
                self._close_open(ev.end, window_end)
        self._enforce_max_segment()

    def _start_segment(self, start: int) -> None:
        start = max(start, self.buffer.start)
        ctx = max(start - self.s.left_context, self.buffer.start)
        seg = _Segment(
            index=self._next_segment,
            start=start,
            agreement=self._new_agreement(),
            ctx_start=ctx,
            last_decode_end=start,
            lang=self.s.lang,
        )
        self._next_segment += 1
        self._open = seg

    def _new_agreement(self) -> LocalAgreement | AlignAtt:
        if self.s.policy == "alignatt":
            return AlignAtt(self.s.alignatt_frames, self.s.alignatt_agreement)
        return LocalAgreement(self.s.agreement_n)

    def _close_open(self, end: int, window_end: int) -> None:
        seg = self._open
        assert seg is not None
        self._open = None
        seg.end = max(end, seg.start)
        # Never shrink below audio whose tokens may already be committed.
        seg.window_end = max(window_end, seg.end, seg.last_decode_end)
        self.segmenter.set_floor(seg.window_end)
        self._closing.append(seg)

    def _cut_open(self, at: int) -> None:
        """Close the open segment at ``at``; speech that goes on is a new segment."""
        self._close_open(at, at)
        self.segmenter.cut(at)
        if at < self.frontier if self._ended else self.segmenter.in_segment:
            self._start_segment(at)

    def _enforce_max_segment(self) -> None:
        """Cut segments at exactly ``max_segment``, however far the frontier jumped."""
        while self._open is not None and self.frontier - self._open.start >= self.s.max_segment:
            seg = self._open
            self._cut_open(max(seg.start + self.s.max_segment, seg.last_decode_end))

    def _window(self, seg: _Segment, end: int) -> tuple[int, int]:
        start = max(seg.ctx_start, end - self.s.max_window, self.buffer.start)
        return start, end

    def _make_request(
        self,
        seg: _Segment,
        kind: RequestKind,
        end: int,
        supersedes: int | None = None,
        prompt: tuple[int, ...] | None = None,
    ) -> DecodeRequest:
        start, end = self._window(seg, end)
        forced = seg.agreement.committed
        req = DecodeRequest(
            stream=self.stream,
            request_id=self._next_request,
            kind=kind,
            segment=seg.index,
            audio=self.buffer.slice(start, end),
            start=start,
            end=end,
            prompt=(tuple(self._history) if self.s.prompt_max_tokens > 0 else ())
            if prompt is None
            else prompt,
            forced=forced,
            max_new_tokens=self.s.max_new_tokens(end - start, len(forced)),
            lang=seg.lang,
            task=self.s.task,
            supersedes=supersedes,
            alignatt_frames=self.s.alignatt_frames
            if kind == "partial" and self.s.policy == "alignatt"
            else 0,
            words=self.s.word_timestamps,
        )
        req = self._with_rows(req, seg, prompted=prompt is None)
        self._next_request += 1
        self._in_flight[req.request_id] = (req, seg)
        self._requests.append(req)
        return req

    def _with_rows(self, req: DecodeRequest, seg: _Segment, prompted: bool) -> DecodeRequest:
        """``req`` with more rows for the same window (``MultiTargetSession``: one per
        target); ``prompted``: the request carries the stream's history as its prompt."""
        return req

    def _schedule(self) -> None:
        live = [rid for rid in self._in_flight if rid not in self._abandoned]
        if live and self._closing:
            # Only a partial can be live here (finals go first); its segment has
            # closed, so its result is moot: abandon it and send the final now.
            (rid,) = live
            req, _ = self._in_flight[rid]
            if req.kind == "partial":
                self._abandoned.add(rid)
                self._request_final(supersedes=rid)
        elif not live:
            if self._closing:
                self._request_final()
            elif (
                self._open is not None
                and self.s.partials
                and self.frontier - self._open.last_decode_end >= self._hop(self._open)
                and self._speech_since_partial(self._open)
            ):
                self._open.last_decode_end = self.frontier
                self._open.heard = self.segmenter.last_speech_end
                self._make_request(self._open, "partial", self.frontier)
        self._trim()

    def _hop(self, seg: _Segment) -> int:
        """Audio before the next partial: ``first_chunk`` for a segment's first one."""
        if seg.last_decode_end == seg.start and self.s.first_chunk > 0:
            return self.s.first_chunk
        return self.s.chunk

    def _speech_since_partial(self, seg: _Segment) -> bool:
        """Speech arrived since ``seg``'s last partial (see ``skip_silent_partials``)."""
        return not self.s.skip_silent_partials or self.segmenter.last_speech_end > seg.heard

    def _request_final(self, supersedes: int | None = None) -> None:
        seg = self._closing[0]
        if self.s.catch_up:
            self._merge_waiting(seg)
        assert seg.window_end is not None
        self._make_request(seg, "final", seg.window_end, supersedes=supersedes)

    def _merge_waiting(self, head: _Segment) -> None:
        """Fold segments closed behind ``head`` into its final (the stream is behind)."""
        merged = 0
        while len(self._closing) > 1:
            nxt = self._closing[1]
            assert nxt.window_end is not None and nxt.end is not None
            if nxt.window_end - head.start > self.s.max_segment:
                break
            if (nxt.lang is not None and nxt.lang != head.lang) or nxt.shown:
                break  # (a segment behind a pending final is never shown: no partials then)
            del self._closing[1]
            head.end, head.window_end = nxt.end, nxt.window_end
            merged += 1
        if not merged:
            return
        self.merged_segments += merged
        # The folded segments never emitted anything: later ones take their numbers.
        for seg in list(self._closing)[1:] + ([self._open] if self._open else []):
            seg.index -= merged
        self._next_segment -= merged

    def _trim(self) -> None:
        segs = list(self._closing)
        if self._open is not None:
            segs.append(self._open)
        if segs:
            keep = min(s.ctx_start for s in segs)
        else:
            s = self.s
            reach = s.left_context + s.segmenter.pre_roll + s.segmenter.min_speech
            keep = self.frontier - reach - 2 * s.segmenter.frame_samples
        self.buffer.trim(keep)

    def _apply_partial(self, seg: _Segment, req: DecodeRequest, result: DecodeResult) -> None:
        if seg is not self._open:
            return  # the segment closed meanwhile: its final supersedes this partial
        self._stabilise(seg, seg, req, result, None)

    def _stabilise(
        self,
        seg: _Segment,
        track: _Segment | TargetTrack,
        req: DecodeRequest,
        result: DecodeResult,
        target: str | None,
    ) -> None:
        """Commit what ``track``'s hypotheses agree on and emit its partial (``target``:
        the language of a ``TargetTrack``, None for the source)."""
        if len(result.pieces) != len(result.tokens):
            raise ValueError("a result needs one byte piece per token")
        forced = len(track.committed_pieces)
        boundaries = word_boundaries(list(result.pieces))
        if result.looped:
            # The decoder was cut in a loop: show what came before it, but let
            # neither this hypothesis nor the ones before it commit anything.
            track.agreement.forget_tails(result.tokens)
            newly: tuple[int, ...] = ()
        elif isinstance(track.agreement, AlignAtt):
            newly = track.agreement.update(
                result.tokens, boundaries, result.peaks, result.audio_frames
            )
        else:
            newly = track.agreement.update(result.tokens, boundaries)
        track.committed_pieces.extend(result.pieces[: len(newly)])
        shown = len(newly) + len(track.agreement.tentative)
        tentative = b"".join(held_back(result.pieces[len(newly) : shown],
                                       self.s.partial_holdback_words))  # fmt: skip
        committed_text, tentative_text = render(b"".join(track.committed_pieces), tentative)
        if result.spans:
            track.words = self._words(req, track.committed_pieces, result, forced + len(newly))
        text = committed_text + tentative_text
        if not text.strip():
            return
        track.shown = True
        self._events.append(
            Hypothesis(
                kind="partial",
                stream=self.stream,
                segment=seg.index,
                seq=self._next_seq(),
                text=text,
                committed=committed_text,
                tentative=tentative_text,
                start=seg.start / self.s.sample_rate,
                end=req.end / self.s.sample_rate,
                lang=seg.lang,
                words=track.words,
                target=target,
            )
        )

    def _words(
        self, req: DecodeRequest, pieces: list[bytes], result: DecodeResult, count: int
    ) -> tuple[Word, ...]:
        """Timed words of the first ``count`` tokens (forced first) of ``result``."""
        return words_of(
            pieces[:count],
            result.spans[:count],
            offset=req.start,
            frame_samples=result.frame_samples,
            sample_rate=self.s.sample_rate,
            limit=req.end,
        )

    def _emit_final(self, seg: _Segment, result: DecodeResult, req: DecodeRequest) -> None:
        popped = self._closing.popleft()
        assert popped is seg
        self._final_event(seg, seg, result, req, self._history, None)

    def _final_event(
        self,
        seg: _Segment,
        track: _Segment | TargetTrack,
        result: DecodeResult,
        req: DecodeRequest,
        history: deque[int],
        target: str | None,
    ) -> None:
        """``track``'s final (``target`` as in ``_stabilise``); its tokens join ``history``."""
        pieces = track.committed_pieces + ([] if result.error else list(result.pieces))
        tokens = list(track.agreement.committed) + ([] if result.error else list(result.tokens))
        words = track.words
        if result.spans and not result.error:
            words = self._words(req, pieces, result, len(pieces))
        text, _ = complete_utf8(b"".join(pieces))
        text = text.strip()
        history.extend(tokens)
        if not text and not track.shown:
            return
        # An empty final after partials retracts them: the speech came to nothing.
        assert seg.end is not None
        self._events.append(
            Hypothesis(
                kind="final",
                stream=self.stream,
                segment=seg.index,
                seq=self._next_seq(),
                text=text,
                start=seg.start / self.s.sample_rate,
                end=seg.end / self.s.sample_rate,
                lang=seg.lang,
                words=words,
                target=target,
            )
        )

    @property
    def last_seq(self) -> int:
        return self._seq

    def next_seq(self) -> int:
        """Number an event made beside the session (a translation target's) in this
        stream's ``seq`` sequence, so subscribers dropping repeats by ``seq`` keep it."""
        return self._next_seq()

    @property
    def next_segment(self) -> int:
        return self._next_segment

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq


def held_back(pieces: tuple[bytes, ...] | list[bytes], words: int) -> list[bytes]:
    """``pieces`` without their last ``words`` words (``partial_holdback_words``)."""
    pieces = list(pieces)
    if words <= 0 or not pieces:
        return pieces
    bounds = word_boundaries(pieces)
    starts = [j for j in range(len(pieces)) if bounds[j]]
    return pieces[: starts[-words]] if len(starts) >= words else []
