"""What the engine does next step: which windows to admit, which sequences decode.

Pure Python (no tensors, no clock of its own: ``now`` is passed in), so the
policy is unit-tested without a model. The step shape follows vLLM /
nano-vllm: every step, newly admitted windows are encoded and their forced
prefix prefilled in batches, and every running sequence decodes one token in
one batched pass; sequences join and leave between steps.

Admission and overload:
- one sequence per stream runs at a time; later requests of that stream wait
  in order behind it (the session sends at most one partial at a time, and a
  final for each closed segment);
- a waiting partial is replaced by a newer partial of the same stream, and a
  request naming one it ``supersedes`` cancels that one (waiting: answered at
  once; running: dropped at the next step), so when the device falls behind
  partials get sparser instead of queues growing;
- at most ``max_running`` sequences decode together; each step admits at most
  ``max_admit`` windows, ``max_admit_samples`` of audio and
  ``max_prefill_tokens`` prefix tokens (at least one window when idle, so an
  oversized window still runs); finals go first, then the oldest;
- live before bulk: a request marked ``bulk`` (its stream's input arrives
  faster than real time: a fast file, a client sending as fast as it may) is
  admitted only while no live window waits or decodes (every step of a live
  decode stays one token, with no long encoder pass beside it), and while a
  live stream was heard within ``LIVE_GRACE_S`` at most one per step, so a
  live request never waits for more than one bulk window's encoder pass.
  Bulk rows already running keep decoding; bulk streams slow down through
  their own backpressure.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from streamer.core.session import DecodeRequest

__all__ = ["LIVE_GRACE_S", "Job", "Scheduler", "SchedulerLimits", "StepPlan"]

#: A live stream heard this recently (seconds) still counts as present: its next
#: window (one chunk away) must not find the engine busy with a batch of bulk ones.
LIVE_GRACE_S = 5.0


@dataclass(frozen=True, slots=True)
class SchedulerLimits:
    """Per-step budgets (the engine's batch shape)."""

    max_running: int = 32
    max_admit: int = 8
    max_admit_samples: int = 8 * 30 * 16000
    max_prefill_tokens: int = 4096

    def __post_init__(self) -> None:
        if min(self.max_running, self.max_admit, self.max_admit_samples) < 1:
            raise ValueError("scheduler limits must be >= 1")
        if self.max_prefill_tokens < 1:
            raise ValueError("max_prefill_tokens must be >= 1")


@dataclass(slots=True, eq=False)
class Job:
    """One request inside the engine: waiting, then running until it finishes."""

    req: DecodeRequest
    submitted: float
    tokens: list[int] = field(default_factory=list)
    prefix_len: int = 0
    lang: str | None = None
    looped: bool = False
    cancelled: bool = False
    running: bool = False
    align: Any = None  # decoding.Alignment when the attention is read
    start: list[int] = field(default_factory=list)  # the family's start tokens
    rows: list[Any] = field(default_factory=list)  # attention rows (n, T), see alignment.py

    @property
    def key(self) -> tuple[str, int]:
        return (self.req.stream, self.req.request_id)

    @property
    def prefix_estimate(self) -> int:
        """Prefix tokens before the start tokens are known (prompt + forced + a few),
        over the request's target rows too (each is prefilled)."""
        return sum(len(r.prompt) + len(r.forced) + 4 for r in (self.req, *self.req.target_rows))


@dataclass(frozen=True, slots=True)
class StepPlan:
    """``admit``: encode + prefill now; ``decode``: one token each; ``cancelled``: answer now."""

    admit: tuple[Job, ...] = ()
    decode: tuple[Job, ...] = ()
    cancelled: tuple[Job, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.admit or self.decode or self.cancelled)


class Scheduler:
    def __init__(self, limits: SchedulerLimits | None = None) -> None:
        self.limits = limits or SchedulerLimits()
        self._waiting: dict[str, deque[Job]] = {}
        self._running: dict[str, Job] = {}  # by stream: one at a time
        self._dropped: list[Job] = []  # cancelled while waiting: answered by the next plan
        self.superseded = 0
        self._live_until = float("-inf")  # a live request was submitted until then + grace

    # -- bookkeeping --------------------------------------------------------------

    @property
    def idle(self) -> bool:
        return not (self._waiting or self._running or self._dropped)

    @property
    def running(self) -> list[Job]:
        return list(self._running.values())

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    def submit(self, req: DecodeRequest, now: float) -> None:
        """Queue a request (superseding what it names and an older waiting partial)."""
        if req.supersedes is not None:
            self.cancel(req.stream, req.supersedes)
        queue = self._waiting.setdefault(req.stream, deque())
        if req.kind == "partial" and queue and queue[-1].req.kind == "partial":
            self._drop(queue.pop())
        queue.append(Job(req, now))
        if not req.bulk:
            self._live_until = now + LIVE_GRACE_S

    def cancel(self, stream: str, request_id: int) -> None:
        """A request whose result is no longer wanted (unknown ids are ignored)."""
        run = self._running.get(stream)
        if run is not None and run.req.request_id == request_id:
            run.cancelled = True
            return
        queue = self._waiting.get(stream)
        if not queue:
            return
        for job in list(queue):
            if job.req.request_id == request_id:
                queue.remove(job)
                self._drop(job)
        if not queue:
            del self._waiting[stream]

    def _drop(self, job: Job) -> None:
        job.cancelled = True
        self.superseded += 1
        self._dropped.append(job)

    def finish(self, job: Job) -> None:
        """A running job ended (done, cancelled or failed): its stream may admit the next."""
        if self._running.get(job.req.stream) is job:
            del self._running[job.req.stream]
        job.running = False

    def lag(self, now: float) -> dict[str, float]:
        """Seconds since each stream's oldest unfinished request was submitted."""
        out: dict[str, float] = {}
        for stream, job in self._running.items():
            out[stream] = now - job.submitted
        for stream, queue in self._waiting.items():
            if queue:
                out[stream] = max(out.get(stream, 0.0), now - queue[0].submitted)
        return out

    # -- the step ---------------------------------------------------------------------

    def plan(self, now: float | None = None) -> StepPlan:
        """Decide the next step; admitted jobs count as running from now on.

        ``now`` tells whether a live stream was heard lately (see ``LIVE_GRACE_S``);
        without it only live jobs waiting or running count.
        """
        cancelled = tuple(self._dropped)
        self._dropped.clear()
        for job in [j for j in self._running.values() if j.cancelled]:
            cancelled += (job,)
            self.finish(job)
        decode = tuple(self._running.values())
        limits = self.limits
        room = limits.max_running - len(decode)
        heads = [q[0] for stream, q in self._waiting.items() if stream not in self._running]
        heads.sort(key=lambda j: (j.req.bulk, j.req.kind != "final", j.submitted))
        live_now = any(not j.req.bulk for j in (*heads, *decode))
        live_lately = live_now or (now is not None and now < self._live_until)
        admit: list[Job] = []
        samples = tokens = 0
        for job in heads:
            if len(admit) >= min(room, limits.max_admit):
                break
            if job.req.bulk and (live_now or (live_lately and admit)):
                break  # no bulk encoder pass while a live window waits or decodes
            size, prefix = len(job.req.audio), job.prefix_estimate
            over = (
                samples + size > limits.max_admit_samples
                or tokens + prefix > limits.max_prefill_tokens
            )
            if over and (admit or decode):
                continue  # a smaller window may still fit this step
            admit.append(job)
            samples += size
            tokens += prefix
        for job in admit:
            queue = self._waiting[job.req.stream]
            queue.popleft()
            if not queue:
                del self._waiting[job.req.stream]
            job.running = True
            self._running[job.req.stream] = job
        return StepPlan(tuple(admit), decode, cancelled)
