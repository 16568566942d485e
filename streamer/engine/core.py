"""The engine thread: the only thread that runs forward passes.

Requests come from any thread through ``submit``; results go back through the
callback given with each request, called on the engine thread (the async
facade hops to the loop). Every step, the pure :class:`Scheduler` decides which
waiting windows to admit and which sequences decode, and the
:class:`BatchRunner` executes that on the device: admitted windows are encoded
and prefilled in batches, then every running sequence decodes one token in
one batched pass (beam search: ``num_beams`` rows per window). Families the
runner cannot batch run each admitted window alone through ``Decoder.run``. With
``compile=True`` the runner decodes through the compiled static-cache step
(``static_decode.py``) where the model allows it.

Failures: CUDA out of memory fails that step's windows (their streams get an
error result for that window and go on); ``max_consecutive_oom`` failed steps
in a row, or any error that leaves the device unusable (a CUDA/accelerator
error), stop the engine and are reported through ``fatal``/``on_fatal``. Other
exceptions fail the step's windows and are logged with a traceback (a bug).

Targets the speech model decodes itself (``speech_targets``: a decoder that
picks its language by a token) are rows of the speech windows' own requests
(``DecodeRequest.target_rows``), batched by the runner like any row.

Translation (the cascade, ``[translation]``): with a ``translator``, text
translation requests (``submit_translation``) share the thread and the
steps: each step, after the speech windows, the :class:`TranslationWorker`
admits waiting requests (finals first, within its budgets) and decodes one
token for every running translation row.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from streamer.core.session import DecodeRequest, DecodeResult
from streamer.core.translation import TranslateRequest, TranslateResult
from streamer.engine.decoding import DecodeCancelled, Decoder
from streamer.engine.runner import BatchRunner
from streamer.engine.scheduler import Job, Scheduler, SchedulerLimits, StepPlan
from streamer.engine.translate_runner import TranslateCallback, TranslateLimits, TranslationWorker
from streamer.engine.translation import Translator

log = logging.getLogger(__name__)

ResultCallback = Callable[[DecodeResult], None]
_Inbox = tuple[DecodeRequest, ResultCallback] | tuple[TranslateRequest, TranslateCallback]
IDLE_WAIT_S = 1.0  # the heartbeat still beats this often when there is no work


@dataclass(slots=True)
class EngineStats:
    requests: int = 0
    failed: int = 0
    busy_seconds: float = 0.0
    bulk_seconds: float = 0.0  # of which steps that served only bulk (ahead-of-real-time) rows
    audio_seconds: float = 0.0
    steps: int = 0
    step_seconds: float = 0.0
    max_step_seconds: float = 0.0
    max_batch: int = 0
    batch_rows: int = 0  # sum over steps of sequences decoded in the step
    static_steps: int = 0  # decode passes of the static (``compile``) path
    compiled_shapes: int = 0  # its shape buckets compiled so far
    compile_seconds: float = 0.0  # wall time of their first (compiling) calls
    translate_seconds: float = 0.0  # of busy_seconds: translation admission and decode
    translate_requests: int = 0

    @property
    def real_time_factor(self) -> float:
        """Compute seconds per second of audio decoded (lower is faster)."""
        return self.busy_seconds / self.audio_seconds if self.audio_seconds else 0.0

    @property
    def mean_batch(self) -> float:
        return self.batch_rows / self.steps if self.steps else 0.0


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim = ctypes.CDLL(None).malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Return the heap memory freed so far to the system (glibc ``malloc_trim(0)``).

    Why: glibc keeps freed blocks in its heaps (one arena per thread that
    allocated: the engine, the VAD pool, ``to_thread`` workers, the loop).
    After a large free it raises its mmap threshold (up to 32 MiB), so the
    tensors of a burst's big batches come from those heaps, and once freed
    their pages stay resident: measured, RSS stayed 20-40 % above its
    pre-burst level after a 16-stream burst, until this call brought it back
    to within a few percent. It walks every arena, so the other threads'
    freed memory goes back too. Costs milliseconds; the engine calls it when
    it goes idle after work. False where there is no glibc (musl, macOS).
    """
    trim = _malloc_trim()
    return trim is not None and bool(trim(0))


def _is_fatal(exc: BaseException) -> bool:
    accel = getattr(torch, "AcceleratorError", None)
    if accel is not None and isinstance(exc, accel):
        return True
    return isinstance(exc, RuntimeError) and "CUDA error" in str(exc)


class EngineFailure(RuntimeError):
    """Why the engine stopped, in one line (a service log line, a systemd STATUS).

    CUDA errors carry several lines of debugging advice; the original
    exception is kept as ``__cause__``.
    """

    @classmethod
    def from_error(cls, exc: BaseException, message: str = "") -> EngineFailure:
        lines = str(exc).strip().splitlines()
        detail = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
        failure = cls(f"{message} ({detail})" if message else detail)
        failure.__cause__ = exc
        return failure


class Engine:
    def __init__(
        self,
        decoder: Decoder,
        *,
        max_consecutive_oom: int = 5,
        limits: SchedulerLimits | None = None,
        compile: bool = False,
        translator: Translator | None = None,
        translate_limits: TranslateLimits | None = None,
        speech_targets: tuple[str, ...] = (),
    ) -> None:
        """``speech_targets``: targets the speech model decodes itself (one row each per
        window, ``streamer.engine.targets``) instead of a ``translator``."""
        self.decoder = decoder
        self.speech_targets = speech_targets
        self.sample_rate = decoder.m.sample_rate
        self.scheduler = Scheduler(limits)
        self.runner = BatchRunner(
            decoder, compile=compile, max_rows=self.scheduler.limits.max_running
        )
        self.translation = (
            TranslationWorker(translator, translate_limits) if translator is not None else None
        )
        self._inbox: queue.SimpleQueue[_Inbox | None] = queue.SimpleQueue()
        self._callbacks: dict[tuple[str, int], ResultCallback] = {}
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.stats = EngineStats()
        self.heartbeat = time.monotonic()
        self.fatal: BaseException | None = None
        self.on_fatal: Callable[[BaseException], None] | None = None
        self._max_oom = max_consecutive_oom
        self._oom_run = 0
        self._stopping = False
        # Superseded (stream, request id) pairs, added from any thread so a window
        # decoded alone can stop mid-decode; removed when that request ends.
        self._cancelled: set[tuple[str, int]] = set()
        self._lag: dict[str, float] = {}
        self.cancelled_requests = 0
        self._worked = False  # a step ran since memory was last given back
        self.memory_releases = 0  # times the idle engine gave freed memory back

    def start(self) -> None:
        self._thread.start()

    @property
    def languages(self) -> frozenset[str]:
        """Source languages a stream may pick ("auto" = detect); empty: fixed by the model."""
        m = self.decoder.m
        if not m.whisper_prompt or not m.lang_to_id:
            return frozenset()
        return frozenset(m.lang_to_id) | {"auto"}

    @property
    def tasks(self) -> frozenset[str]:
        """Tasks a stream may pick; empty when the model has a single one."""
        m = self.decoder.m
        if not m.whisper_prompt:
            return frozenset()
        return frozenset(m.task_to_id) & {"transcribe", "translate"}

    @property
    def memory_given_back(self) -> bool:
        """No step ran since the idle engine last gave freed memory back."""
        return not self._worked

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.fatal is None

    def lag(self) -> dict[str, float]:
        """Per stream: seconds its oldest unfinished request had waited at the last step."""
        return dict(self._lag)

    def submit(self, req: DecodeRequest, callback: ResultCallback) -> None:
        if self.fatal is not None:
            raise RuntimeError(f"engine stopped: {self.fatal}")
        if req.supersedes is not None:
            self._cancelled.add((req.stream, req.supersedes))
        self._inbox.put((req, callback))

    def submit_translation(self, req: TranslateRequest, callback: TranslateCallback) -> None:
        """Queue a text translation (the cascade); the callback runs on the engine thread."""
        if self.translation is None:
            raise RuntimeError("this engine has no translation model")
        if self.fatal is not None:
            raise RuntimeError(f"engine stopped: {self.fatal}")
        self._inbox.put((req, callback))

    @property
    def targets(self) -> tuple[str, ...]:
        """Translation targets: the cascade's, or those the speech model decodes itself."""
        if self.translation is not None:
            return self.translation.translator.targets
        return self.speech_targets

    @property
    def _idle(self) -> bool:
        return self.scheduler.idle and (self.translation is None or self.translation.idle)

    def stop(self, timeout: float = 10.0) -> bool:
        """Finish queued work, then end the thread; True when it ended in time."""
        self._stopping = True
        self._inbox.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- the thread ----------------------------------------------------------------

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        stopping = False
        while True:
            if self.fatal is not None:
                self._fail_pending()
                return
            if self._idle:  # nothing to do: wait for work, beating
                try:
                    item = self._inbox.get(timeout=IDLE_WAIT_S)
                except queue.Empty:
                    self.heartbeat = time.monotonic()
                    if self._worked:  # idle for IDLE_WAIT_S after work: give memory back
                        self._worked = False
                        self._release_memory()
                    continue
                stopping |= self._take(item, time.monotonic())
            stopping |= self._drain_inbox()
            self.heartbeat = time.monotonic()
            if self._idle:
                if stopping:
                    return
                continue
            self._step()

    def _take(self, item: _Inbox | None, now: float) -> bool:
        """Hand one submitted request to the scheduler; True for the stop sentinel."""
        if item is None:
            return True
        if isinstance(item[0], TranslateRequest):
            assert self.translation is not None
            self.translation.submit(item[0], item[1], now)
            return False
        req, callback = item
        self._callbacks[(req.stream, req.request_id)] = callback
        self.scheduler.submit(req, now)
        return False

    def _drain_inbox(self) -> bool:
        """Move every submitted request into the scheduler; True when stop was asked."""
        stop = False
        now = time.monotonic()
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return stop
            stop |= self._take(item, now)

    def _step(self) -> None:
        t0 = time.monotonic()
        self._worked = True
        plan = self.scheduler.plan(t0)
        for job in plan.cancelled:
            self.cancelled_requests += 1
            self._fail(job, "cancelled")
        for job in plan.admit:
            self.stats.audio_seconds += len(job.req.audio) / self.sample_rate
        rows = len(plan.decode) + len(plan.admit)
        try:
            self.runner.drop(plan.cancelled)  # device work too: its errors count as the step's
            if self.runner.batchable:
                self._batched(plan)
            else:
                self._alone(plan)
            self._oom_run = 0
        except torch.OutOfMemoryError as exc:
            self._fail_step(plan, "out of memory", exc)
        except Exception as exc:
            self._fail_step(plan, f"{type(exc).__name__}: {exc}", exc)
        spent = time.monotonic() - t0
        stats = self.stats
        stats.busy_seconds += spent
        if all(job.req.bulk for job in (*plan.admit, *plan.decode)):
            stats.bulk_seconds += spent  # spare capacity a live stream would take first
        stats.steps += 1
        stats.step_seconds += spent
        stats.max_step_seconds = max(stats.max_step_seconds, spent)
        stats.max_batch = max(stats.max_batch, rows)
        stats.batch_rows += rows
        if self.translation is not None and not self.translation.idle:
            self._translate_step()
        static = self.runner.static
        if static is not None:
            stats.static_steps = static.steps
            stats.compiled_shapes = len(static.compile_seconds)
            stats.compile_seconds = sum(static.compile_seconds.values())
        self._lag = self.scheduler.lag(time.monotonic())
        self.heartbeat = time.monotonic()

    def _translate_step(self) -> None:
        """The translation rows' share of the step (after the speech windows)."""
        worker = self.translation
        assert worker is not None
        t0 = time.monotonic()
        try:
            with torch.inference_mode():
                answers = worker.step()
        except Exception as exc:  # its requests fail; the speech rows go on
            oom = isinstance(exc, torch.OutOfMemoryError)
            answers = worker.fail_all("out of memory" if oom else f"{type(exc).__name__}: {exc}")
            if not oom and _is_fatal(exc):
                self.fatal = EngineFailure.from_error(exc)
                self._report_fatal()
            elif not oom:
                log.error("translation failed for %d request(s)", len(answers), exc_info=exc)
        spent = time.monotonic() - t0
        self.stats.busy_seconds += spent
        self.stats.translate_seconds += spent
        for callback, result in answers:
            self.stats.translate_requests += 1
            self._answer_translation(callback, result)

    def _answer_translation(self, callback: TranslateCallback, result: TranslateResult) -> None:
        try:
            callback(result)
        except Exception:  # a sink-side bug must not kill the engine
            log.exception("translation callback failed for request %d", result.request_id)

    def _release_memory(self) -> None:
        """The engine went idle after work: return freed memory to the system.

        See :func:`release_freed_memory`; on CUDA, the caching allocator's
        unused blocks too (a burst's big batches would otherwise stay reserved).
        """
        trimmed = release_freed_memory()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # a no-op until CUDA was initialised
        self.memory_releases += 1
        log.debug("engine idle: freed memory given back (malloc_trim: %s)", trimmed)

    def _batched(self, plan: StepPlan) -> None:
        with torch.inference_mode():
            done = self.runner.admit(list(plan.admit))
            done += self.runner.step()
        for job, result in done:
            self.stats.requests += 1
            self._answer(job, result)

    def _alone(self, plan: StepPlan) -> None:
        """Families the runner cannot batch: each admitted window decoded on its own."""
        for job in plan.admit:
            try:
                result = self.decoder.run(job.req, self._cancel_check(job))
            except DecodeCancelled:
                self.cancelled_requests += 1
                result = DecodeResult(job.req.request_id, (), (), error="cancelled")
            else:
                self.stats.requests += 1
            self._answer(job, result)

    def _cancel_check(self, job: Job) -> Callable[[], bool]:
        key = job.key
        return lambda: job.cancelled or key in self._cancelled

    def _fail_step(self, plan: StepPlan, error: str, exc: BaseException) -> None:
        """The step raised: its windows fail (running rows too: their cache is suspect)."""
        jobs = {id(j): j for j in (*plan.admit, *plan.decode, *self.runner.clear())}
        oom = isinstance(exc, torch.OutOfMemoryError)
        if oom:
            self._oom_run += 1
        for job in jobs.values():
            if job.running:  # not answered earlier in this step
                self.stats.failed += 1
                if oom:
                    log.error("out of memory decoding stream %s; window skipped", job.req.stream)
                self._fail(job, error)
        if oom and self._oom_run >= self._max_oom:
            self.fatal = EngineFailure.from_error(
                exc, f"{self._oom_run} consecutive out-of-memory errors"
            )
            self._report_fatal()
        elif not oom and _is_fatal(exc):
            self.fatal = EngineFailure.from_error(exc)
            self._report_fatal()
        elif not oom:
            log.error("decoding failed for %d window(s)", len(jobs), exc_info=exc)
        if oom and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _answer(self, job: Job, result: DecodeResult) -> None:
        self.scheduler.finish(job)
        key = job.key
        self._cancelled.discard(key)
        if job.req.supersedes is not None:
            self._cancelled.discard((job.req.stream, job.req.supersedes))
        callback = self._callbacks.pop(key, None)
        if callback is None:
            return
        try:
            callback(result)
        except Exception:  # a sink-side bug must not kill the engine
            log.exception("result callback failed for stream %s", job.req.stream)

    def _report_fatal(self) -> None:
        log.critical("engine stopped: %s", self.fatal)
        if self.on_fatal is not None and self.fatal is not None:
            self.on_fatal(self.fatal)

    def _fail_pending(self) -> None:
        """After a fatal error: every queued or running request gets an error result."""
        self._drain_inbox()
        for job in self.runner.clear():
            self._fail(job, "engine stopped")
        while not self.scheduler.idle:
            plan = self.scheduler.plan()
            for job in (*plan.cancelled, *plan.decode, *plan.admit):
                self._fail(job, "engine stopped")
        if self.translation is not None:
            for callback, result in self.translation.fail_all("engine stopped"):
                self._answer_translation(callback, result)

    def _fail(self, job: Job, error: str) -> None:
        self._answer(job, DecodeResult(job.req.request_id, (), (), error=error))
