"""Computation-aware replay of audio through the sans-I/O ``StreamSession``.

Why it exists: latency figures taken from a live asyncio run depend on
scheduling noise and on whatever else the machine is doing; quality figures
from an offline decode say nothing about when captions appear. Here the
session is driven by a discrete-event simulation in simulated real time, with
each VAD and decoder call's compute time measured on the real machine and
charged to the simulated clock (SimulEval's computation-aware mode), so the
figures are deterministic given those measured times:

- audio arrives in blocks of ``block`` samples at t = block_end_sample / sr,
  like a live input (a paced ``FileSource`` releases a block at its start);
- VAD: each block's VAD call is timed; the VAD is its own serial worker (as in
  the daemon, where it runs in a thread beside the engine): the block is fed
  to the session at ``max(arrival, vad_free) + vad_time``;
- decoding: when the session issues a request at simulated time t, the
  decoder runs at once and its wall duration d is measured; the result is
  delivered at ``max(t, engine_free) + d`` (one engine, one stream);
- a request that supersedes one still running at t (a final sent while a
  stale partial decodes) stops that one at t, as the engine abandons it
  between tokens: the rest of its compute is not charged (the granularity of
  one decoder pass is ignored);
- events the session emits are stamped with the simulated time of the step
  that produced them; the stream ends right after its last block is fed.

Used by ``tools/evaluate.py``; the metrics over the stamped events are in
``tools/metrics.py``.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tools import metrics

if TYPE_CHECKING:
    from streamer.audio.vad import FrameVad
    from streamer.core.session import DecodeRequest, DecodeResult, SessionSettings

log = logging.getLogger("evaluate.simulation")

Clock = Callable[[], float]
Decode = Callable[["DecodeRequest"], "DecodeResult"]


@dataclass(slots=True)
class StreamRun:
    """What one simulated stream produced, with its compute bill."""

    events: list[metrics.TimedEvent]
    clock: metrics.BlockClock
    decode_s: float = 0.0
    vad_s: float = 0.0
    partial_requests: int = 0
    final_requests: int = 0
    failed_windows: int = 0
    done_at: float = 0.0  # simulated time of the last step

    @property
    def duration_s(self) -> float:
        return self.clock.total / self.clock.sample_rate

    @property
    def finals(self) -> list[metrics.TimedEvent]:
        return [e for e in self.events if e.kind == "final"]


def simulate(
    audio: np.ndarray[Any, Any],
    settings: SessionSettings,
    decode: Decode,
    vad: FrameVad | None,
    block: int,
    clock: Clock = time.perf_counter,
) -> StreamRun:
    """Replay ``audio`` through a ``StreamSession`` in simulated, computation-aware time."""
    from streamer.core.session import DecodeResult, StreamSession

    sr = settings.sample_rate
    audio = np.asarray(audio, dtype=np.float32)
    total = len(audio)
    session = StreamSession("eval", settings)
    run = StreamRun(events=[], clock=metrics.BlockClock(block, total, sr))
    order = itertools.count()
    queue: list[tuple[float, int, str, Any]] = []
    for start in range(0, total, block):
        end = min(start + block, total)
        heapq.heappush(queue, (end / sr, next(order), "arrive", (start, end)))
    vad_free = 0.0
    engine_free = 0.0
    running: dict[int, tuple[float, float]] = {}  # request id -> simulated (start, end)

    def pump(now: float) -> None:
        nonlocal engine_free
        for req in session.requests_to_send():
            stale = running.get(req.supersedes) if req.supersedes is not None else None
            if stale is not None and stale[1] > now:
                run.decode_s -= stale[1] - max(now, stale[0])
                engine_free = max(now, stale[0])
            if req.kind == "partial":
                run.partial_requests += 1
            else:
                run.final_requests += 1
            t0 = clock()
            try:
                result = decode(req)
            except Exception as exc:  # the engine turns a failed window into an error result
                log.error("decode failed: %s: %s", type(exc).__name__, exc)
                result = DecodeResult(req.request_id, (), (), error=f"{type(exc).__name__}: {exc}")
            took = clock() - t0
            run.decode_s += took
            begin = max(now, engine_free)
            engine_free = begin + took
            running[req.request_id] = (begin, engine_free)
            heapq.heappush(queue, (engine_free, next(order), "result", result))
        for ev in session.events_received():
            run.events.append(
                metrics.TimedEvent(
                    kind=ev.kind,
                    segment=ev.segment,
                    text=ev.text,
                    start=ev.start,
                    end=ev.end,
                    time=now,
                    committed=ev.committed,
                )
            )
        run.done_at = now

    if total == 0:
        session.receive_end()
        pump(0.0)
    while queue:
        now, _, kind, payload = heapq.heappop(queue)
        if kind == "arrive":
            start, end = payload
            samples = audio[start:end]
            probs = None
            took = 0.0
            if vad is not None:
                t0 = clock()
                probs = vad.process(samples)
                took = clock() - t0
                run.vad_s += took
            vad_free = max(now, vad_free) + took
            heapq.heappush(queue, (vad_free, next(order), "feed", (samples, probs, end == total)))
            continue
        if kind == "feed":
            samples, probs, last = payload
            session.receive_audio(samples)
            if probs is not None:
                session.receive_speech(probs)
            if last:
                session.receive_end()
        else:
            session.receive_result(payload)
        pump(now)
    if not session.done:
        raise RuntimeError("simulation ended with the session not done")
    run.failed_windows = session.failed_windows
    return run
