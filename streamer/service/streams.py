"""The asyncio driver of one stream: source blocks in, caption events out.

``StreamRunner`` is the thin adapter around the sans-I/O ``StreamSession``:
it runs the voice-activity detector off the loop, feeds the session, sends
its decode requests to the engine, hands results back, and publishes the
session's events with their latency (wall time since the audio they cover
arrived). It is the same for a microphone, a file and a WebSocket client.

With translation targets (``TranslationTrack``), every source event also goes
to the track; its translation requests go to the engine and its target events
are published in the stream's ``seq`` sequence, with their latency measured
from the arrival of the audio their source event covers.

VAD runs in a small shared pool, half a second of audio per call, so a stream
handed a long block cannot delay the others' blocks (see ``score_speech``).

Backpressure: while the session is ``behind`` (more audio waiting for finals
than ``max_backlog``), ``feed`` does not return. A file is then read more
slowly, a WebSocket client's frames wait in TCP buffers, and a microphone's
capture queue fills and drops blocks (counted and logged there; the gap
becomes silence here), so memory stays bounded when the device is too slow.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import logging
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import numpy as np

from streamer.audio.vad import FrameVad, score_speech
from streamer.core.session import DecodeResult, SourceEventKind, StreamSession
from streamer.core.translation import TranslateResult, TranslationTrack
from streamer.types import AudioBlock, Hypothesis

if TYPE_CHECKING:  # the engine (torch, transformers) loads only when a daemon starts one
    from streamer.engine.client import EngineClient

log = logging.getLogger(__name__)

Publish = Callable[[Hypothesis], None]
MAX_GAP_S = 30
#: A stream whose input is this far (seconds) ahead of real time is "bulk": the
#: engine serves live streams first (``Scheduler``). Paced sources and
#: microphones stay within a block of real time; fast files and clients
#: sending as fast as they may run ahead.
BULK_AHEAD_S = 3.0
#: Source events whose arrival time is kept for their translations' latency.
MAX_TRANSLATED_EVENTS = 256


class StreamRunner:
    def __init__(
        self,
        session: StreamSession,
        engine: EngineClient,
        publish: Publish,
        vad: FrameVad | None,
        clock: Callable[[], float] = time.monotonic,
        translation: TranslationTrack | None = None,
    ) -> None:
        self.session = session
        self.translation = translation
        self._translating: set[asyncio.Future[TranslateResult]] = set()
        # (segment, end) of published source events -> wall time their audio arrived
        self._source_arrivals: OrderedDict[tuple[int, float], float] = OrderedDict()
        self.engine = engine
        self.publish = publish
        self.vad = vad
        self.clock = clock
        self._arrivals: deque[tuple[int, float]] = deque()  # (block end sample, arrival)
        self._done = asyncio.Event()
        self._pending: set[asyncio.Future[DecodeResult]] = set()
        self._caught_up = asyncio.Event()
        self._caught_up.set()
        self._holding = True  # False once shutdown asked feed() never to wait again
        self.held_seconds = 0.0  # wall time ``feed`` waited for the engine to catch up
        self._began: float | None = None  # wall time the stream's first sample was spoken

    @property
    def stream(self) -> str:
        return self.session.stream

    async def feed(self, block: AudioBlock) -> None:
        """Give the session one block of audio (with its speech probabilities).

        Samples are the clock: a gap before ``block.start`` (a capture device
        dropped blocks) is filled with silence, capped at ``MAX_GAP_S``, and a
        block overlapping audio already received is cut.
        """
        samples = block.samples
        expected = self.session.buffer.end
        if block.start > expected:
            rate = self.session.s.sample_rate
            gap = min(block.start - expected, MAX_GAP_S * rate)
            samples = np.concatenate([np.zeros(gap, dtype=np.float32), samples])
        elif block.start < expected:
            samples = samples[expected - block.start :]
        if not len(samples):
            return
        if self.session.ended:
            # A caller's bug, not the client's: say so once per block, never raise.
            log.error("stream %s: %d samples after its end were dropped", self.stream, len(samples))
            return
        arrival = block.arrival if block.arrival is not None else self.clock()
        if self._began is None:
            self._began = arrival - len(samples) / self.session.s.sample_rate
        self._arrivals.append((expected + len(samples), arrival))
        probs = None
        if self.vad is not None:
            probs = await score_speech(self.vad, samples)
        if self.session.ended:  # ended while the VAD ran (see stop_holding)
            log.error("stream %s: audio fed past its end was dropped", self.stream)
            return
        self.session.receive_audio(samples)
        if probs is not None:
            self.session.receive_speech(probs)
        self._pump()
        if not self._caught_up.is_set():
            held = self.clock()
            log.debug("stream %s: %.1f s of audio wait for finals; holding input back",
                      self.stream, self.backlog_seconds)  # fmt: skip
            await self._caught_up.wait()
            self.held_seconds += self.clock() - held

    @property
    def ahead_seconds(self) -> float:
        """How far the input runs ahead of real time (0 for a live source)."""
        if self._began is None:
            return 0.0
        received = self.session.buffer.end / self.session.s.sample_rate
        return max(0.0, received - (self.clock() - self._began))

    @property
    def backlog_seconds(self) -> float:
        """Audio not yet finalised (the stream's lag behind its input)."""
        return self.session.backlog / self.session.s.sample_rate

    def stop_holding(self) -> None:
        """Shutdown: ``feed`` returns without waiting for the engine to catch up.

        The audio already taken is still finalised (the caller ends the stream
        once its last ``feed`` returned); only the backpressure wait is skipped.
        """
        self._holding = False
        self._caught_up.set()

    def finalize(self) -> None:
        """Explicit finalize request: close the current segment now."""
        self.session.request_final()
        self._pump()

    def source_state(self, state: str, detail: str) -> None:
        """A microphone was lost ("lost") or came back ("restored")."""
        kind: SourceEventKind = "source_lost" if state == "lost" else "source_restored"
        self.session.receive_source_state(kind, detail)
        self._pump()

    def end(self) -> None:
        self.session.receive_end()
        self._pump()

    async def run(self, blocks: AsyncIterator[AudioBlock]) -> None:
        """Consume a source to its end, then finalise the stream."""
        try:
            async for block in blocks:
                await self.feed(block)
        finally:
            self.end()

    async def wait_done(self, timeout: float | None = None) -> bool:
        """Wait until every final of the ended stream was published."""
        try:
            await asyncio.wait_for(self._done.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _pump(self) -> None:
        # A failed submit's error result may schedule the next request at once
        # (a segment's final): keep sending until the session has nothing new.
        while requests := self.session.requests_to_send():
            bulk = self.ahead_seconds > BULK_AHEAD_S
            for req in requests:
                if bulk:
                    req = dataclasses.replace(req, bulk=True)
                try:
                    fut = self.engine.submit(req)
                except RuntimeError as exc:  # engine stopped: fail the window, keep going
                    log.error("stream %s: %s", self.stream, exc)
                    result = DecodeResult(req.request_id, (), (), error=str(exc))
                    self.session.receive_result(result)
                    continue
                self._pending.add(fut)
                fut.add_done_callback(self._on_result)
        now = self.clock()
        for event in self.session.events_received():
            event = dataclasses.replace(event, latency_ms=self._latency_ms(event, now))
            self.publish(event)
            if self.translation is not None:
                self._translate(event, now)
        self._forget_arrivals()
        if self.translation is not None:
            self._pump_translation()
        if self.session.behind and self._holding:  # (never once done: no final waits then)
            self._caught_up.clear()
        else:
            self._caught_up.set()
        if self.session.done and (self.translation is None or self.translation.idle):
            self._done.set()

    def _translate(self, event: Hypothesis, now: float) -> None:
        """Hand a published source event to the track, remembering when its audio arrived."""
        assert self.translation is not None
        if event.kind in ("partial", "final") and event.latency_ms is not None:
            arrivals = self._source_arrivals
            arrivals[(event.segment, event.end)] = now - event.latency_ms / 1000.0
            while len(arrivals) > MAX_TRANSLATED_EVENTS:
                arrivals.popitem(last=False)
        self.translation.receive_source(event)

    def _pump_translation(self) -> None:
        """Send the track's requests to the engine; publish its target events."""
        track = self.translation
        assert track is not None
        while requests := track.requests_to_send():
            bulk = self.ahead_seconds > BULK_AHEAD_S
            for req in requests:
                if bulk:
                    req = dataclasses.replace(req, bulk=True)
                try:
                    fut = self.engine.translate(req)
                except RuntimeError as exc:  # engine stopped: the request fails
                    log.error("stream %s: %s", self.stream, exc)
                    track.receive_result(TranslateResult(req.request_id, error=str(exc)))
                    continue
                self._translating.add(fut)
                fut.add_done_callback(self._on_translation)
        now = self.clock()
        for event in track.events_received():
            arrival = self._source_arrivals.get((event.segment, event.end))
            latency = None if arrival is None else max(0.0, (now - arrival) * 1000.0)
            seq = self.session.next_seq()
            self.publish(dataclasses.replace(event, seq=seq, latency_ms=latency))

    def _on_translation(self, fut: asyncio.Future[TranslateResult]) -> None:
        self._translating.discard(fut)
        if fut.cancelled() or self.translation is None:
            return
        self.translation.receive_result(fut.result())
        self._pump_translation()
        if self.session.done and self.translation.idle:
            self._done.set()

    def _on_result(self, fut: asyncio.Future[DecodeResult]) -> None:
        self._pending.discard(fut)
        if fut.cancelled():
            return
        self.session.receive_result(fut.result())
        self._pump()

    def _latency_ms(self, event: Hypothesis, now: float) -> float | None:
        """Wall time since the block holding the event's last sample arrived."""
        end_sample = round(event.end * self.session.s.sample_rate)
        i = bisect.bisect_left(self._arrivals, end_sample, key=lambda a: a[0])
        if i >= len(self._arrivals):
            return None
        return max(0.0, (now - self._arrivals[i][1]) * 1000.0)

    def _forget_arrivals(self) -> None:
        keep_from = self.session.buffer.start
        while len(self._arrivals) > 1 and self._arrivals[0][0] <= keep_from:
            self._arrivals.popleft()
