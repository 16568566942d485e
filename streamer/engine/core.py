"""The engine thread: the only thread that runs forward passes.

Requests come from any thread through ``submit``; each stream has at most one
request in flight (the session guarantees it), so the queue is bounded by the
number of streams. Results go back through the callback given with the
request, called on the engine thread (the async facade hops to the loop).
A failure on one window (CUDA out of memory, a bad input) fails that window
only; an error that leaves the device unusable stops the engine and is
reported through ``fatal``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from streamer.core.session import DecodeRequest, DecodeResult
from streamer.engine.decoding import DecodeCancelled, Decoder

log = logging.getLogger(__name__)

ResultCallback = Callable[[DecodeResult], None]


@dataclass(slots=True)
class EngineStats:
    requests: int = 0
    failed: int = 0
    busy_seconds: float = 0.0
    audio_seconds: float = 0.0

    @property
    def real_time_factor(self) -> float:
        """Compute seconds per second of audio decoded (lower is faster)."""
        return self.busy_seconds / self.audio_seconds if self.audio_seconds else 0.0


def _is_fatal(exc: BaseException) -> bool:
    accel = getattr(torch, "AcceleratorError", None)
    if accel is not None and isinstance(exc, accel):
        return True
    return isinstance(exc, RuntimeError) and "CUDA error" in str(exc)


class Engine:
    def __init__(self, decoder: Decoder, *, max_consecutive_oom: int = 5) -> None:
        self.decoder = decoder
        self.sample_rate = decoder.m.sample_rate
        self._queue: queue.SimpleQueue[tuple[DecodeRequest, ResultCallback] | None] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.stats = EngineStats()
        self.heartbeat = time.monotonic()
        self.fatal: BaseException | None = None
        self.on_fatal: Callable[[BaseException], None] | None = None
        self._max_oom = max_consecutive_oom
        self._oom_run = 0
        self._stopping = False
        self._cancelled: set[tuple[str, int]] = set()  # superseded (stream, request id)
        self.cancelled_requests = 0

    def start(self) -> None:
        self._thread.start()

    @property
    def languages(self) -> frozenset[str]:
        """Source languages a stream may pick ("auto" = detect); empty: fixed by the model."""
        m = self.decoder.m
        if m.family != "whisper" or not m.lang_to_id:
            return frozenset()
        return frozenset(m.lang_to_id) | {"auto"}

    @property
    def tasks(self) -> frozenset[str]:
        """Tasks a stream may pick; empty when the model has a single one."""
        m = self.decoder.m
        if m.family != "whisper":
            return frozenset()
        return frozenset(m.task_to_id) & {"transcribe", "translate"}

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.fatal is None

    def submit(self, req: DecodeRequest, callback: ResultCallback) -> None:
        if self.fatal is not None:
            raise RuntimeError(f"engine stopped: {self.fatal}")
        if req.supersedes is not None:
            self._cancelled.add((req.stream, req.supersedes))
        self._queue.put((req, callback))

    def stop(self, timeout: float = 10.0) -> bool:
        """Finish queued work, then end the thread; True when it ended in time."""
        self._stopping = True
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            try:
                item = self._queue.get(timeout=1.0)
            except queue.Empty:
                self.heartbeat = time.monotonic()
                continue
            self.heartbeat = time.monotonic()
            if item is None:
                return
            req, callback = item
            result = self._execute(req)
            try:
                callback(result)
            except Exception:  # a sink-side bug must not kill the engine
                log.exception("result callback failed for stream %s", req.stream)
            if self.fatal is not None:
                self._fail_pending()
                return

    def _execute(self, req: DecodeRequest) -> DecodeResult:
        t0 = time.monotonic()
        key = (req.stream, req.request_id)
        try:
            result = self.decoder.run(req, lambda: key in self._cancelled)
            self._oom_run = 0
        except DecodeCancelled:
            self.cancelled_requests += 1
            return DecodeResult(req.request_id, (), (), error="cancelled")
        except torch.OutOfMemoryError:
            self._oom_run += 1
            self.stats.failed += 1
            log.error("out of memory decoding stream %s; window skipped", req.stream)
            if self._oom_run >= self._max_oom:
                self.fatal = RuntimeError(f"{self._oom_run} consecutive out-of-memory errors")
                self._report_fatal()
            return DecodeResult(req.request_id, (), (), error="out of memory")
        except Exception as exc:
            self.stats.failed += 1
            if _is_fatal(exc):
                self.fatal = exc
                self._report_fatal()
            else:
                log.exception("decoding failed for stream %s", req.stream)
            return DecodeResult(req.request_id, (), (), error=f"{type(exc).__name__}: {exc}")
        finally:
            self._cancelled.discard(key)
            self.stats.busy_seconds += time.monotonic() - t0
            self.heartbeat = time.monotonic()
        self.stats.requests += 1
        self.stats.audio_seconds += len(req.audio) / self.sample_rate
        return result

    def _report_fatal(self) -> None:
        log.critical("engine stopped: %s", self.fatal)
        if self.on_fatal is not None and self.fatal is not None:
            self.on_fatal(self.fatal)

    def _fail_pending(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                req, callback = item
                callback(DecodeResult(req.request_id, (), (), error="engine stopped"))
