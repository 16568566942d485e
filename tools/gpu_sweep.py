"""The GPU check's sweep: how many real-time streams one GPU sustains, per model, compile off/on.

``tools/gpu_check.sh`` runs it after the ``gpu``-marked tests; it can run alone:

    .venv/bin/python tools/gpu_sweep.py --out-dir results          # CUDA, 9-minute budget
    .venv/bin/python tools/gpu_sweep.py --quick --out-dir /tmp/gc  # CPU, tiny model, seconds

For each model (Whisper base in fp16, the random-weight base-size SED in
bf16) and each ``[engine] compile`` setting (off, then on), one daemon
(``App``, no configured sources, serving) loads the model once; then for each
N in 1, 50, 200, 500, 1000, 2000 a *stage* attaches N real-time streams to it
(``app.factory``, the way ``/v1/stream`` clients attach: the daemon's VAD,
sessions, stabiliser and batching engine), lets them warm up, measures them,
then ends them. A sweep stops at the first N whose p95 final latency in the
measured window exceeds ``--max-p95`` (1 s), or that had no final or a failed
window; the Ns after it are "not run".

Per stage (stream audio, real time):
  * warm-up: ``--warmup-s`` (3 s: every stream's first windows are out, the
    engine's batches have formed); with compile on it goes on until no new
    shape bucket was compiled for ``--compile-quiet-s`` while the engine steps
    (capped at ``--compile-warmup-max-s``), so compile stalls are a start-up
    cost reported apart (``compile_s``), not latency;
  * measured: ``--seconds`` (20 s). Why 20 s: the clips are 3-11 s sentences
    with 0.8 s pauses, so in 20 s every stream ends 2-5 segments (finals) and
    windows reach their longest (an 11 s sentence + left context); the
    rotations and start phases below put streams in every part of a sentence
    at any moment, so the window is a steady state, and 20 s keeps a stage
    near half a minute, which the 9-minute budget needs;
  * events count when emitted inside the measured window; at its end the
    stage's streams stop (their last finals are drained, not counted).

Audio: the six test clips are decoded once (``benchmark.clips``), brought to
one level (-23 dBFS RMS: as recorded they span -67 to -14 dBFS and the energy
VAD misses the quietest), and joined with 0.8 s pauses; stream i replays
rotation i mod 6 of them from one shared read-only array (blocks are
views, 100 ms each, paced by sample count like ``FileSource``), starting
(i x 0.618) mod 1 s late so that requests spread over the 1 s chunk instead
of arriving in lockstep. Nothing is decoded or copied per stream, so N = 2000
costs the host what the daemon itself costs.

VAD: the energy backend. Silero scores every 32 ms frame with a small network
on the CPU: 2000 streams are 62,000 calls a second, more than the host's cores
can do, so Silero would be the bottleneck, not the GPU. The energy detector
is a numpy RMS per block through the daemon's own VAD pool and endpointing;
the clips are clean speech with silent pauses, so both detectors close
segments at the same places (final latency floor 0.61 s with either, measured
on CPU). What is left on the host is the daemon's per-block work (VAD pool
hop, session, windows): each stage reports the host CPU it used
(``host_cpu``, cores), the event loop's lateness (``loop_lag``) and the
engine thread's busy share, so a host-bound N is told from a GPU-bound one.
Durable seq reservations are turned off for the sweep (2000 streams starting
at once would be 2000 fsyncs on the loop).

Engine settings for a GPU (``--set`` overrides them, the JSON records them):
up to 256 rows per decode step, 32 windows (640 s of audio) admitted per
step. The random SED would stop at random (EOS, the loop guard): its decode
length is fixed at the cap, 8 + 4 tokens per second of window (EOS
suppressed, loop guard off), as DESIGN 6 asks.

Time budget: the check must end within ``--budget-s`` (540 s) of
``--started-at`` (the shell's start: the tests' time counts). The four sweeps
run one after the other; each gets an equal share of the time left when it
starts (what one leaves rolls on to the next). Before each stage its cost is
estimated (warm-up + measured + drain, from the sweep's previous stage; a
compile sweep's first stage assumes the compile warm-up cap) and the stage
and the rest of its sweep are skipped when it would end past the share, and
said so in the table. A warm-up that would run past the global deadline is
cut short and the stage reported as skipped. ``MARGIN_S`` stays free for the
last shutdown and the report.

Output: ``gpu-<model>.json`` per model (every stage's figures) and
``gpu-check.json`` (device, tests, budget, the table), then the table on
stdout. Exit 0; 1 when a sweep failed to run (error in the JSON); 3 when no
CUDA device can be used (a CPU-only torch is said so plainly).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import json
import logging
import math
import platform
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make the `tools` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools import benchmark

if TYPE_CHECKING:
    from streamer.config import Config
    from streamer.engine.decoding import Decoder
    from streamer.service.app import App
    from streamer.service.streams import StreamRunner
    from streamer.types import Hypothesis

log = logging.getLogger("gpu_sweep")

RATE = benchmark.RATE
STREAMS = (1, 50, 200, 500, 1000, 2000)
BUDGET_S = 540.0  # the whole check: 9 minutes
MARGIN_S = 20.0  # kept free at the end: the last shutdown, the JSON, the table
STARTUP_EST_S = 30.0  # a model's first load (CUDA start, Whisper's conversion) until measured
TICK_S = 0.1  # the control loop's period (its lateness is the loop lag)
HOST_LAG_S = 0.1  # a loop lag p95 above this: the host is the bottleneck
NO_GPU_EXIT = 3
LEVEL_DB = -23.0  # every clip's RMS level in the sweep's audio
PHASE = 0.6180339887  # stream i starts (i * PHASE) mod 1 s late: spread, never in lockstep

#: The daemon's settings for the sweep (see the module docstring); --set adds more.
SWEEP_SETS = (
    "vad.backend=energy",
    "engine.max_running=256",
    "engine.max_admit=32",
    "engine.max_admit_audio_s=640",
    "engine.max_prefill_tokens=16384",
)


@dataclass(frozen=True)
class ModelRun:
    name: str  # what benchmark.resolve_model takes (a hub id, a folder, sed-base-random)
    label: str
    dtype: str
    sets: tuple[str, ...] = ()
    fixed_length: bool = False  # random weights: EOS suppressed, loop guard off


GPU_MODELS = (
    ModelRun("builtin:whisper-base", "whisper-base", "float16"),
    ModelRun(
        "sed-base-random",
        "sed-base-random",
        "bfloat16",
        ("streaming.max_tokens_per_second=4",),
        fixed_length=True,
    ),
)


@dataclass(frozen=True)
class Timing:
    seconds: float = 20.0  # measured stream audio per stage
    warmup_s: float = 3.0
    compile_quiet_s: float = 3.0
    compile_warmup_max_s: float = 60.0
    drain_max_s: float = 10.0
    block_ms: int = 100


@dataclass
class Estimate:
    """What the next stage of a sweep should cost, learnt from the ones before it."""

    warmup_s: float
    drain_s: float = 3.0

    def stage(self, timing: Timing) -> float:
        return self.warmup_s + timing.seconds + self.drain_s


def first_estimate(timing: Timing, compile_on: bool) -> Estimate:
    return Estimate(timing.compile_warmup_max_s if compile_on else timing.warmup_s)


def share_end(now: float, deadline: float, sweeps_left: int) -> float:
    """The end of a sweep's share: an equal part of the time left (leftovers roll on)."""
    return now + max(0.0, deadline - now) / max(1, sweeps_left)


def sustained(stage: dict[str, Any], max_p95: float) -> bool:
    """The stop rule: a final measured, its p95 within ``max_p95``, no failed window."""
    p95 = stage["final_latency_s"]["p95"]
    return p95 is not None and p95 <= max_p95 and not stage["failed_windows"]


def bottleneck(stage: dict[str, Any]) -> str:
    """Which side held a stage back: "host" (the event loop ran late: the daemon's Python
    per-block work), "engine" (its thread busy 80 % of the time or more), or "-"."""
    lag = stage["loop_lag_s"]["p95"]
    if lag is not None and lag > HOST_LAG_S:
        return "host"
    return "engine" if stage["engine_busy"] >= 0.8 else "-"


# -- audio --------------------------------------------------------------------------------


def leveled(clip: np.ndarray, rms_db: float = LEVEL_DB, peak: float = 0.9) -> np.ndarray:
    """``clip`` scaled to ``rms_db`` dBFS RMS (its peak kept under ``peak``)."""
    rms = float(np.sqrt(np.mean(np.square(clip, dtype=np.float64))))
    if rms == 0.0:
        return clip
    gain = min(10 ** (rms_db / 20) / rms, peak / float(np.abs(clip).max()))
    return (clip * gain).astype(np.float32)


class SharedSpeech:
    """The clips decoded once; rotation r of them as one read-only array shared by streams.

    Each clip is brought to the same level first: they range from -67 to
    -14 dBFS RMS, and the energy VAD (speech from -45 dBFS up) misses the
    quietest two as they are.
    """

    def __init__(self, seconds: float) -> None:
        clips = [leveled(c) for c in benchmark.clips()]
        pause = np.zeros(int(0.8 * RATE), dtype=np.float32)
        self.rotations = []
        for r in range(len(clips)):
            order = clips[r:] + clips[:r]
            reps = math.ceil(seconds * RATE / sum(len(c) + len(pause) for c in order))
            audio = np.concatenate([x for _ in range(reps) for c in order for x in (c, pause)])
            audio = audio[: int(seconds * RATE)]
            audio.flags.writeable = False
            self.rotations.append(audio)

    def for_stream(self, i: int) -> np.ndarray:
        return self.rotations[i % len(self.rotations)]


def phase(i: int) -> float:
    return (i * PHASE) % 1.0


class PacedArraySource:
    """One stream replaying a shared array in real time, ``block_ms`` per block.

    Block k is released at ``start_at + start_k / rate`` (deadlines from the
    sample count, as ``FileSource`` paces), stamped with that arrival; its
    samples are a view of the shared array.
    """

    def __init__(
        self, audio: np.ndarray, stream: str, rate: int, block_ms: int, start_at: float
    ) -> None:
        self.audio, self.stream, self.rate = audio, stream, rate
        self.block = max(1, round(rate * block_ms / 1000))
        self.start_at = start_at

    async def blocks(self) -> AsyncIterator[Any]:
        from streamer.types import AudioBlock

        start = 0
        while start < len(self.audio):
            due = self.start_at + start / self.rate
            now = time.monotonic()
            await asyncio.sleep(due - now if due > now else 0)
            samples = self.audio[start : start + self.block]
            yield AudioBlock(
                stream=self.stream,
                start=start,
                samples=samples,
                sample_rate=self.rate,
                arrival=min(time.monotonic(), due),
            )
            start += len(samples)


# -- one sweep: a daemon, N streams at a time ---------------------------------------------


@dataclass
class Recorder:
    """Every event the daemon publishes: (wall time, stream, kind, latency s)."""

    events: list[tuple[float, str, str, float | None]] = field(default_factory=list)

    def install(self, app: App) -> None:
        publish = app.fanout.publish

        def record(event: Hypothesis) -> None:
            latency = None if event.latency_ms is None else event.latency_ms / 1000
            self.events.append((time.monotonic(), event.stream, event.kind, latency))
            publish(event)

        app.fanout.publish = record  # type: ignore[method-assign]

    def window(self, prefix: str, t0: float, t1: float, kind: str) -> list[float]:
        return [
            lat
            for t, stream, k, lat in self.events
            if k == kind and lat is not None and t0 <= t <= t1 and stream.startswith(prefix)
        ]


def sweep_config(
    base: Config, model: str, device: str, dtype: str, compile_on: bool, state_dir: str
) -> Config:
    """The daemon's config for a sweep: no sources, no sinks, serving until stopped."""
    return dataclasses.replace(
        base,
        model=dataclasses.replace(
            base.model,
            id=model,
            device=device,
            dtype=dtype,
            source_language="en",
            target_language="en",
        ),
        engine=dataclasses.replace(base.engine, compile=compile_on),
        sources=(),
        websocket=dataclasses.replace(base.websocket, enabled=False),
        console=dataclasses.replace(base.console, enabled=False),
        service=dataclasses.replace(base.service, keep_serving=True, state_dir=state_dir),
    )


def fix_decode_length(decoder: Decoder) -> None:
    """Random weights never emit EOS on purpose: decode to the length cap every time."""
    import torch

    decoder.loop_guard = False
    eos = torch.tensor([decoder.m.eos_token_id], device=decoder.m.device)
    decoder._suppress = torch.cat([decoder._suppress, eos])


def cuda_in_use(device: str) -> bool:
    import torch

    return device.startswith("cuda") and torch.cuda.is_available()


def _snapshot(app: App) -> dict[str, float]:
    assert app.engine is not None and app.factory is not None
    s = app.engine.stats
    return {
        "busy": s.busy_seconds,
        "steps": s.steps,
        "rows": s.batch_rows,
        "failed": s.failed,
        "static_steps": s.static_steps,
        "compiled": s.compiled_shapes,
        "compile_s": s.compile_seconds,
        "cpu": time.process_time(),
        "held": app.factory.held_seconds(),
    }


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Mute loggers while a stage is cut off (every stream would log the stopped engine)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


class Sweep:
    """One daemon (one model, one compile setting) and its stages."""

    def __init__(
        self, app: App, recorder: Recorder, audio: SharedSpeech, timing: Timing, device: str
    ) -> None:
        self.app, self.recorder, self.audio, self.timing = app, recorder, audio, timing
        self.device = device
        self.compile_on = app.cfg.engine.compile
        self._runners: list[StreamRunner] = []

    async def stage(self, n: int, deadline: float, drain_est: float) -> dict[str, Any]:
        """N streams: warm up, measure ``timing.seconds``, stop them (not drained here)."""
        app, timing = self.app, self.timing
        engine, factory = app.engine, app.factory
        assert engine is not None and factory is not None
        if cuda_in_use(self.device):
            import torch

            torch.cuda.reset_peak_memory_stats()
        prefix = f"n{n}-"
        t0 = time.monotonic()
        started = self._snapshot_compile()
        runners: list[StreamRunner] = []
        tasks: list[asyncio.Task[None]] = []
        for i in range(n):
            name = f"{prefix}s{i}"
            runner = factory.create(name)
            source = PacedArraySource(
                self.audio.for_stream(i), name, RATE, timing.block_ms, t0 + phase(i)
            )
            runners.append(runner)
            tasks.append(asyncio.create_task(runner.run(source.blocks()), name=f"source-{name}"))
        warm = await self._warm_up(t0, deadline, drain_est)
        w0 = time.monotonic()
        before = _snapshot(app)
        lateness: list[float] = []
        lags: list[float] = []
        backlogs: list[float] = []
        while time.monotonic() < w0 + timing.seconds and warm != "budget":
            t = time.monotonic()
            await asyncio.sleep(TICK_S)
            lateness.append(time.monotonic() - t - TICK_S)
            lags.append(max(engine.lag().values(), default=0.0))
            backlogs.append(max((r.backlog_seconds for r in runners), default=0.0))
        w1 = time.monotonic()
        after = _snapshot(app)
        crashed = [t for t in tasks if t.done() and not t.cancelled() and t.exception()]
        for task in crashed[:1]:
            log.error("stream %s failed", task.get_name(), exc_info=task.exception())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        d = {k: after[k] - before[k] for k in after}
        window = max(w1 - w0, 1e-9)
        finals = self.recorder.window(prefix, w0, w1, "final")
        partials = self.recorder.window(prefix, w0, w1, "partial")
        out: dict[str, Any] = {
            "streams": n,
            "warmup_s": round(w0 - t0, 2),
            "warmup_end": warm,  # "time" | "compiles settled" | "cap" | "budget"
            "measured_s": round(w1 - w0, 2),
            "final_latency_s": benchmark.summarize(finals),
            "partial_latency_s": benchmark.summarize(partials),
            "finals": len(finals),
            "partials": len(partials),
            # engine-thread seconds per second of stream audio (the capacity figure)
            "compute_per_stream_second": round(d["busy"] / (n * window), 5),
            "engine_busy": round(d["busy"] / window, 3),
            "steps": int(d["steps"]),
            "mean_batch": round(d["rows"] / d["steps"], 2) if d["steps"] else None,
            "mean_step_ms": round(1000 * d["busy"] / d["steps"], 2) if d["steps"] else None,
            "failed_windows": int(d["failed"]),
            "crashed_streams": len(crashed),
            "input_held_s": round(d["held"], 3),
            "host_cpu": round(d["cpu"] / window, 2),  # process CPU seconds per second: cores
            "loop_lag_s": benchmark.summarize(lateness),
            "max_engine_lag_s": round(max(lags, default=0.0), 3),
            "max_backlog_s": round(max(backlogs, default=0.0), 3),
            "static_steps": int(d["static_steps"]),
            "compiled_shapes": int(after["compiled"] - started[0]),
            "compile_s": round(after["compile_s"] - started[1], 2),
        }
        out["bottleneck"] = bottleneck(out)
        out.update(self._memory())
        self._runners = runners
        return out

    def _snapshot_compile(self) -> tuple[float, float]:
        assert self.app.engine is not None
        s = self.app.engine.stats
        return s.compiled_shapes, s.compile_seconds

    async def _warm_up(self, t0: float, deadline: float, drain_est: float) -> str:
        """Wait out the warm-up; compile on: until compiles settled while the engine steps."""
        engine, timing = self.app.engine, self.timing
        assert engine is not None
        shapes, changed = engine.stats.compiled_shapes, t0
        cap = timing.compile_warmup_max_s if self.compile_on else timing.warmup_s
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            if engine.stats.compiled_shapes != shapes:
                shapes, changed = engine.stats.compiled_shapes, now
            if now + timing.seconds + drain_est > deadline:
                return "budget"
            if now - t0 < timing.warmup_s:
                continue
            if not self.compile_on:
                return "time"
            stepping = now - engine.heartbeat < 2.0  # a long compile holds the heartbeat back
            if now - changed >= timing.compile_quiet_s and stepping:
                return "compiles settled"
            if now - t0 >= cap:
                return "cap"

    def _memory(self) -> dict[str, Any]:
        if not cuda_in_use(self.device):
            return {"gpu_peak_mib": None}
        import torch

        return {
            "gpu_peak_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
            "gpu_peak_reserved_mib": round(torch.cuda.max_memory_reserved() / 2**20, 1),
        }

    async def drain(self) -> float:
        """Let the stopped streams' last finals out (bounded), then forget them."""
        factory = self.app.factory
        assert factory is not None
        t0 = time.monotonic()
        waits = [r.wait_done(self.timing.drain_max_s) for r in self._runners]
        await asyncio.gather(*waits)
        for r in self._runners:
            factory.release(r.stream)
        self._runners = []
        return time.monotonic() - t0


async def wait_ready(app: App, task: asyncio.Task[int], timeout: float) -> None:
    """Until the daemon runs its engine; raises what its start raised."""
    t0 = time.monotonic()
    while not app.ready:
        if task.done():
            task.result()  # raises the start's error
            raise RuntimeError(f"the daemon exited during start (code {task.result()})")
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"the daemon did not start within {timeout:.0f} s")
        await asyncio.sleep(0.05)


async def stop_app(app: App, task: asyncio.Task[int], abort: bool) -> None:
    """End the daemon; ``abort``: fail its queued work at once (an overloaded stage)."""
    from streamer.engine.core import EngineFailure

    with _quiet("streamer"):
        if abort and app.engine is not None:
            app.engine.fatal = EngineFailure("gpu sweep: stage over")  # the thread stops now
        app.request_stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 60)


async def run_sweep(
    spec: ModelRun,
    model: str,
    compile_on: bool,
    args: argparse.Namespace,
    audio: SharedSpeech,
    until: float,
    deadline: float,
    startup_est: float,
) -> dict[str, Any]:
    """One model, one compile setting: the stages in order, the stop rule, the budget."""
    from streamer.config import load_config
    from streamer.service.app import App

    timing: Timing = args.timing
    sets = [*SWEEP_SETS, *spec.sets, *args.set]
    out: dict[str, Any] = {"compile": compile_on, "settings": sets, "stages": {}, "error": None}
    out["stopped_at"] = out["skipped_from"] = out["skip_reason"] = None
    est = first_estimate(timing, compile_on)
    need, left = startup_est + est.stage(timing), until - time.monotonic()
    if need > left:  # not even the model load and one stage fit the share
        out["skipped_from"] = args.streams[0]
        out["skip_reason"] = f"budget: start + a stage need ~{need:.0f} s, {left:.0f} s left"
        out["wall_s"] = 0.0
        return out
    with tempfile.TemporaryDirectory(prefix="gpu-sweep-state-") as state:
        cfg = sweep_config(load_config([], sets), model, args.device, spec.dtype, compile_on, state)
        app = App(cfg, keep_serving=True)
        recorder = Recorder()
        recorder.install(app)
        t0 = time.monotonic()
        task = asyncio.create_task(app.run(), name="gpu-sweep-daemon")
        abort = False
        try:
            await wait_ready(app, task, timeout=max(60.0, deadline - t0))
            out["startup_s"] = round(time.monotonic() - t0, 2)
            assert app.engine is not None and app.factory is not None
            app.factory.seqs = None  # no durable seq (see the module docstring)
            if spec.fixed_length:
                fix_decode_length(app.engine.decoder)
            sweep = Sweep(app, recorder, audio, timing, args.device)
            for n in args.streams:
                need = est.stage(timing)
                left = until - time.monotonic()
                if need > left:
                    out["skipped_from"] = n
                    out["skip_reason"] = f"budget: a stage needs ~{need:.0f} s, {left:.0f} s left"
                    break
                stage = await sweep.stage(n, deadline, est.drain_s)
                out["stages"][str(n)] = stage
                ok = sustained(stage, args.max_p95) and stage["warmup_end"] != "budget"
                stage["sustained"] = ok
                print(_progress(spec, compile_on, stage), flush=True)
                if stage["warmup_end"] == "budget":
                    out["skipped_from"] = n
                    out["skip_reason"] = "budget: the warm-up ran into the deadline"
                    abort = True
                    break
                if not ok:
                    out["stopped_at"] = n
                    abort = True
                    break
                est.warmup_s = max(timing.warmup_s, stage["warmup_s"])
                est.drain_s = stage["drain_s"] = round(await sweep.drain(), 2)
        except Exception as exc:  # a sweep that cannot run is reported, the others go on
            log.exception("%s compile=%s failed", spec.label, compile_on)
            out["error"] = f"{type(exc).__name__}: {exc}"
            abort = True
        finally:
            await stop_app(app, task, abort)
        out["wall_s"] = round(time.monotonic() - t0, 2)
    return out


def _progress(spec: ModelRun, compile_on: bool, stage: dict[str, Any]) -> str:
    f = stage["final_latency_s"]
    return (
        f"{spec.label} compile={'on' if compile_on else 'off'} N={stage['streams']}: "
        f"final p95 {f['p95']} s, engine busy {stage['engine_busy']}, "
        f"warm-up {stage['warmup_s']} s ({stage['warmup_end']})"
    )


def cleanup(device: str, compiled: bool) -> None:
    """Between sweeps: drop the last model, its compiled graphs and cached GPU memory."""
    import torch

    if compiled:  # dynamo's caches hold the old model (and count toward recompile limits)
        torch._dynamo.reset()
    gc.collect()
    if cuda_in_use(device):
        torch.cuda.empty_cache()


@contextlib.contextmanager
def stub_compile() -> Iterator[None]:
    """--quick: ``torch.compile`` returns the function (the static path runs eagerly)."""
    import torch

    real = torch.compile
    torch.compile = lambda fn=None, **kwargs: fn  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.compile = real


# -- device ---------------------------------------------------------------------------------


def probe(device: str) -> dict[str, Any]:
    """Torch's view of the device; ``usable`` False with a plain ``problem`` when it is not."""
    import torch

    info: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device": device,
        "usable": True,
        "problem": None,
    }
    if not device.startswith("cuda"):
        info["name"] = f"CPU ({platform.processor() or platform.machine()})"
        return info
    if torch.version.cuda is None:
        info["usable"] = False
        info["problem"] = (
            f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None): "
            f"this check needs the CUDA build of torch {torch.__version__.split('+')[0]} "
            "(README, 'GPU check')"
        )
        return info
    if not torch.cuda.is_available():
        info["usable"] = False
        info["problem"] = (
            f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device: "
            "check the driver (nvidia-smi) and CUDA_VISIBLE_DEVICES"
        )
        return info
    props = torch.cuda.get_device_properties(torch.device(device))
    info.update(
        name=props.name,
        capability=f"{props.major}.{props.minor}",
        memory_gib=round(props.total_memory / 2**30, 1),
        devices=torch.cuda.device_count(),
    )
    return info


def describe(info: dict[str, Any]) -> str:
    head = f"torch {info['torch']} (CUDA build: {info['cuda_build'] or 'none'})"
    if not info["usable"]:
        return f"{head}: {info['problem']}"
    if "capability" in info:
        return (
            f"{head}: {info['device']} = {info['name']}, compute capability "
            f"{info['capability']}, {info['memory_gib']} GiB, {info['devices']} device(s)"
        )
    return f"{head}: {info['name']}, no GPU used"


# -- the table ------------------------------------------------------------------------------

COLUMNS = (
    ("model", 24),
    ("compile", 7),
    ("N", 5),
    ("final p50/p95 s", 15),
    ("partial p50/p95 s", 17),
    ("compute/stream-s", 16),
    ("batch", 6),
    ("GPU peak MiB", 12),
    ("busy", 5),
    ("host CPU", 8),
    ("loop lag p95", 12),
    ("result", 0),
)


def _pair(summary: dict[str, Any]) -> str:
    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    return f"{f(summary['p50'])}/{f(summary['p95'])}"


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def table_rows(
    report: dict[str, Any], streams: Sequence[int], max_p95: float
) -> list[dict[str, str]]:
    """One row per model, compile setting and N: measured, stopped, skipped or failed."""
    rows: list[dict[str, str]] = []
    for m in report["models"]:
        label = f"{m['label']} {m['dtype']}"
        for key, sweep in m["sweeps"].items():
            comp = key + ("*" if report.get("compile_stubbed") and key == "on" else "")
            after: str | None = None
            for n in streams:
                row = {"model": label, "compile": comp, "N": str(n)}
                stage = sweep["stages"].get(str(n))
                if stage is not None and stage["warmup_end"] == "budget":
                    row["result"] = "skipped: budget (its warm-up ran into the deadline)"
                elif stage is not None:
                    p95 = stage["final_latency_s"]["p95"]
                    if stage["sustained"]:
                        result = "ok"
                    elif stage["failed_windows"]:
                        result = f"{stage['failed_windows']} failed windows: sweep stops"
                    elif p95 is None:
                        result = "no final measured: sweep stops"
                    else:
                        result = f"p95 final > {max_p95:g} s: sweep stops"
                    if not stage["sustained"] and stage.get("bottleneck", "-") != "-":
                        result += f" ({stage['bottleneck']}-bound)"
                    row.update(
                        {
                            "final p50/p95 s": _pair(stage["final_latency_s"]),
                            "partial p50/p95 s": _pair(stage["partial_latency_s"]),
                            "compute/stream-s": _num(stage["compute_per_stream_second"], ".4f"),
                            "batch": _num(stage["mean_batch"], ".1f"),
                            "GPU peak MiB": _num(stage["gpu_peak_mib"], ".0f"),
                            "busy": _num(stage["engine_busy"], ".0%"),
                            "host CPU": _num(stage["host_cpu"], ".2f"),
                            "loop lag p95": _num(stage["loop_lag_s"]["p95"], ".3f"),
                            "result": result,
                        }
                    )
                elif sweep["error"] is not None and after is None:
                    after = "not run"
                    row["result"] = f"failed: {sweep['error']}"
                elif after is not None:
                    row["result"] = after
                elif sweep["stopped_at"] is not None:
                    row["result"] = after = f"not run (stopped at N={sweep['stopped_at']})"
                elif sweep["skipped_from"] is not None:
                    row["result"] = after = f"skipped: {sweep['skip_reason']}"
                else:
                    row["result"] = after = "not run"
                rows.append(row)
    return rows


def format_table(rows: list[dict[str, str]]) -> str:
    lines = ["  ".join(name.ljust(width) for name, width in COLUMNS).rstrip()]
    for row in rows:
        cells = [row.get(name, "-").ljust(width) for name, width in COLUMNS]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------


def targets_table(path: str) -> tuple[dict[str, Any], str] | None:
    """The captions-in-more-languages rows (``tools/translate_benchmark.py``'s JSON, run
    by gpu_check.sh before the sweep): compute per stream-second by targets, cascade
    against the SED's own rows. None without the file; a line saying so when unreadable."""
    if not path:
        return None
    from tools.translate_benchmark import format_rows
    from tools.translate_benchmark import table_rows as target_rows

    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return {"error": str(exc)}, f"targets: no figures ({path}: {exc})"
    rows = target_rows(report)
    models = f"{report.get('speech_model')}, {report.get('translation_model')}"
    where = f"{report.get('device')} {report.get('dtype')}"
    head = f"targets ({models}, {where}): engine compute per stream-second"
    return report, head + "\n" + format_rows(rows)


def _streams(text: str) -> list[int]:
    counts = [int(x) for x in text.split(",") if x.strip()]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("stream counts must be positive integers")
    return counts


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU, tiny Whisper, N=1,2, seconds")
    p.add_argument("--probe", action="store_true", help="print torch's view of the device; exit")
    p.add_argument("--out-dir", default="results")
    p.add_argument("--device", default=None, help="default cuda (--quick: cpu)")
    p.add_argument("--streams", type=_streams, default=None, help="default 1,50,200,500,1000,2000")
    p.add_argument("--compile", choices=("off", "on", "both"), default="both")
    p.add_argument("--models", default="", help="comma-separated labels to run (default: all)")
    p.add_argument("--seconds", type=float, default=None, help="measured audio per stage (20)")
    p.add_argument("--warmup-s", type=float, default=None)
    p.add_argument("--compile-quiet-s", type=float, default=None)
    p.add_argument("--compile-warmup-max-s", type=float, default=None)
    p.add_argument("--max-p95", type=float, default=None, help="the stop rule, s (1.0)")
    p.add_argument("--budget-s", type=float, default=BUDGET_S)
    p.add_argument("--started-at", type=float, default=None, help="epoch s the check started")
    p.add_argument("--tests-rc", type=int, default=None, help="exit status of the gpu tests")
    p.add_argument("--set", action="append", default=[], help="config override k=v")
    p.add_argument("--targets-json", default="", help="tools/translate_benchmark.py's JSON")
    args = p.parse_args(argv)
    quick = args.quick
    args.device = args.device or ("cpu" if quick else "cuda")
    args.streams = args.streams or ([1, 2] if quick else list(STREAMS))
    q = Timing(seconds=4.0, warmup_s=1.0, compile_quiet_s=0.5, compile_warmup_max_s=3.0)
    d = q if quick else Timing()
    args.timing = Timing(
        seconds=args.seconds if args.seconds is not None else d.seconds,
        warmup_s=args.warmup_s if args.warmup_s is not None else d.warmup_s,
        compile_quiet_s=d.compile_quiet_s if args.compile_quiet_s is None else args.compile_quiet_s,
        compile_warmup_max_s=(
            d.compile_warmup_max_s
            if args.compile_warmup_max_s is None
            else args.compile_warmup_max_s
        ),
        drain_max_s=d.drain_max_s,
    )
    if args.max_p95 is None:
        args.max_p95 = 30.0 if quick else 1.0  # --quick checks the path, not the numbers
    if args.started_at is None:
        args.started_at = time.time()
    return args


def models_for(args: argparse.Namespace, cache: Path) -> list[tuple[ModelRun, str]]:
    """(what to run, the model id or folder to load): built here when needed."""
    if args.quick:
        from streamer.testing.tiny_models import make_whisper

        folder = cache / "tiny-whisper"
        if not (folder / "config.json").exists():
            make_whisper(folder)
        return [(ModelRun(str(folder), "tiny-whisper", "float32"), str(folder))]
    wanted = {x.strip() for x in args.models.split(",") if x.strip()}
    chosen = [m for m in GPU_MODELS if not wanted or m.label in wanted]
    return [(m, benchmark.resolve_model(m.name, cache)) for m in chosen]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    info = probe(args.device)
    print(f"torch: {describe(info)}", flush=True)
    if not info["usable"]:
        print(f"gpu_sweep: {info['problem']}; nothing was run", file=sys.stderr)
        return NO_GPU_EXIT
    if args.probe:
        return 0
    import transformers

    from streamer.engine.ct2_whisper import default_cache_dir

    transformers.logging.set_verbosity_error()
    deadline = args.started_at + args.budget_s - MARGIN_S
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    with tempfile.TemporaryDirectory(prefix="gpu-sweep-") as tmp:
        cache = Path(tmp) if args.quick else default_cache_dir()
        prep0 = time.time()
        models = models_for(args, cache)
        t = args.timing
        audio = SharedSpeech(t.compile_warmup_max_s + t.seconds + 5.0)
        prep_s = round(time.time() - prep0, 1)
        report: dict[str, Any] = {
            "version": 1,
            "quick": args.quick,
            "device": info,
            "machine": {"platform": platform.platform(), "processor": platform.processor()},
            "tests": {
                "rc": args.tests_rc,
                "passed": None if args.tests_rc is None else args.tests_rc in (0, 5),
            },
            "streams": args.streams,
            "max_p95_s": args.max_p95,
            "timing": dataclasses.asdict(t),
            "compile_stubbed": args.quick,
            "budget": {
                "budget_s": args.budget_s,
                "margin_s": MARGIN_S,
                "prep_s": prep_s,
                "started_at": args.started_at,
                "sweep_start_s": round(time.time() - args.started_at, 1),
            },
            "models": [],
        }
        sweeps = [(m, path, c) for m, path in models for c in compiles]
        failed = False
        startup: dict[str, float] = {}  # measured model load + engine start, per model
        results: dict[str, dict[str, Any]] = {}
        for k, (spec, path, compile_on) in enumerate(sweeps):
            now = time.time()
            until_wall = share_end(now, deadline, len(sweeps) - k)
            mono = time.monotonic()  # the sweep measures in monotonic time
            until, hard = mono + (until_wall - now), mono + (deadline - now)
            entry = results.setdefault(spec.label, {
                "label": spec.label, "model": spec.name, "dtype": spec.dtype,
                "device": args.device, "fixed_decode_length": spec.fixed_length,
                "sweeps": {}})  # fmt: skip
            stub = stub_compile() if args.quick and compile_on else contextlib.nullcontext()
            with stub:
                res = asyncio.run(
                    run_sweep(
                        spec, path, compile_on, args, audio, until, hard,
                        startup.get(spec.label, STARTUP_EST_S),
                    )
                )  # fmt: skip
            if "startup_s" in res:
                startup[spec.label] = res["startup_s"]
            res["share_s"] = round(until_wall - now, 1)
            entry["sweeps"]["on" if compile_on else "off"] = res
            failed |= res["error"] is not None
            cleanup(args.device, compiled=compile_on and not args.quick)
        report["models"] = list(results.values())
        report["budget"]["used_s"] = round(time.time() - args.started_at, 1)
    rows = table_rows(report, args.streams, args.max_p95)
    table = format_table(rows)
    targets = targets_table(args.targets_json)
    if targets:
        report["targets"] = targets[0]
        table += "\n\n" + targets[1]
    report["rows"] = rows
    report["table"] = table
    written = []
    for m in report["models"]:
        out = out_dir / f"gpu-{m['label']}.json"
        head = {k: report[k] for k in ("version", "quick", "device", "max_p95_s", "timing")}
        out.write_text(json.dumps({**head, **m}, indent=2) + "\n")
        written.append(str(out))
    summary = out_dir / "gpu-check.json"
    summary.write_text(json.dumps(report, indent=2) + "\n")
    written.append(str(summary))
    print()
    print(table)
    if args.quick:
        print("* --quick: torch.compile stubbed (the static decode step runs eagerly)")
    b = report["budget"]
    print(f"budget: {b['used_s']:.0f} s of {b['budget_s']:.0f} s used "
          f"(sweeps from {b['sweep_start_s']:.0f} s); wrote {', '.join(written)}")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
