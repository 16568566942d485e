"""Where the engine's time goes: encoder passes, decode steps and live streaming, on CPU.

Three measurements, through the engine's own path (``Decoder.encode_batch``,
``BatchRunner.admit``/``step``, ``Decoder.run`` under the streaming session):

- ``encoder``: one encoder pass over B windows of ``--window-s`` seconds
  (trimmed Whisper: the window plus its silence tail, one bucket), per pass
  and per window, with the top aten ops by self CPU time (torch.profiler);
- ``decode_step``: ``BatchRunner.step`` with B running rows (windows of 4-6 s,
  a ``--prompt-tokens`` long prompt as live streams carry, EOS suppressed so
  every row keeps going), with, per step: aten ops and allocations
  (torch.profiler), and the ops' CPU time by op (a dispatch-mode timer, see
  below); ``--before REF`` also times ``streamer/engine/runner.py`` of that git
  revision in the same process, alternating, and checks both choose the same
  tokens;
- ``live``: a set of ``--manifest`` joined into one stream (as
  ``tools/evaluate.py`` joins them) replayed through ``StreamSession`` in
  simulated real time (``tools/simulation.py``), with the engine's compute per
  phase: log-mel features, encoder, prefill (the first decoder pass of a
  request: prompt, forced prefix, cross-attention K/V) and decode steps.

Timing on a shared machine: by default torch runs one thread and every figure
is the thread's CPU time (``time.thread_time``), min of N for passes and
steps, so other processes on the cores change them little (they still share
memory bandwidth and caches: a few percent). torch.profiler's own times are
wall times and are reported as shares only. ``--threads N`` (> 1) times wall
clock instead.

    .venv/bin/python tools/profile_engine.py --before 9714bcc \\
        --out results/profile-engine-cpu.json
    .venv/bin/python tools/profile_engine.py --quick --model PATH   # a tiny model: shape only
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys
import tempfile
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make the `tools` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if TYPE_CHECKING:
    from streamer.engine.decoding import Decoder

REPO_ROOT = Path(__file__).resolve().parents[1]
RATE = 16000


def _clock() -> Callable[[], float]:
    import torch

    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def best_of(fn: Callable[[], object], reps: int) -> tuple[float, float]:
    """(min, median) seconds of ``reps`` calls of ``fn``."""
    clock = _clock()
    times = []
    for _ in range(reps):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    times.sort()
    return times[0], times[len(times) // 2]


def torch_profile(fn: Callable[[], object], calls: int, top: int = 8) -> dict[str, Any]:
    """torch.profiler over ``calls`` calls: aten ops and allocations per call, top ops' shares."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(calls):
            fn()
    events = prof.events()
    ops = [e for e in events if e.name.startswith("aten::")]
    # an allocation is recorded on the op that made it (net of what it freed), or alone
    allocs = [e.self_cpu_memory_usage for e in ops if e.self_cpu_memory_usage > 0]
    allocs += [
        e.cpu_memory_usage for e in events if e.name == "[memory]" and e.cpu_memory_usage > 0
    ]
    top_level = [
        e for e in ops if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")
    ]
    self_us: dict[str, float] = defaultdict(float)
    for e in ops:
        self_us[e.name] += e.self_cpu_time_total
    total = sum(self_us.values()) or 1.0
    return {
        "aten_ops": round(len(ops) / calls),
        "aten_top_level_ops": round(len(top_level) / calls),
        "allocations": round(len(allocs) / calls),
        "allocated_kib": round(sum(allocs) / calls / 1024, 1),
        "self_cpu_share": {
            name: round(us / total, 3)
            for name, us in sorted(self_us.items(), key=lambda kv: -kv[1])[:top]
        },
    }


def op_cpu_times(fn: Callable[[], object], calls: int, top: int = 10) -> dict[str, Any]:
    """CPU time per aten op (ms per call), timed around each op with the thread's CPU clock.

    A ``TorchDispatchMode`` times every op the dispatcher sees (``linear`` as one op,
    keyed by its weight's shape): unlike torch.profiler's wall times this holds up
    when other processes take the cores, so long as torch runs one thread. The
    timer's own overhead is outside the op times (``python_ms`` includes it).
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    spent: dict[str, float] = defaultdict(float)

    class Timer(TorchDispatchMode):
        def __torch_dispatch__(
            self, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            t0 = time.thread_time()
            out = func(*args, **(kwargs or {}))
            took = time.thread_time() - t0
            name = func.overloadpacket.__name__
            if name in ("linear", "matmul") and len(args) > 1 and isinstance(args[1], torch.Tensor):
                # linear: by its weight; matmul (the LM head as W @ h.T): by its left operand
                name = f"{name}{list(args[1 if name == 'linear' else 0].shape)}"
            spent[name] += took
            return out

    t0 = time.thread_time()
    with Timer():
        for _ in range(calls):
            fn()
    wall = time.thread_time() - t0
    ops = sum(spent.values())
    return {
        "ops_ms": round(1000 * ops / calls, 2),
        "python_ms": round(1000 * (wall - ops) / calls, 2),
        "top_ms": {
            name: round(1000 * s / calls, 2)
            for name, s in sorted(spent.items(), key=lambda kv: -kv[1])[:top]
        },
    }


# -- the model and its windows -----------------------------------------------------------


def load_decoder(model: str, dtype: str, config: list[str]) -> tuple[Any, Decoder]:
    from streamer.config import load_config
    from streamer.service.engine_setup import make_decoder

    sets = [f"model.id={json.dumps(model)}", f"model.dtype={json.dumps(dtype)}",
            'model.device="cpu"', 'model.source_language="en"', *config]  # fmt: skip
    cfg = load_config([], sets)
    return cfg, make_decoder(cfg)


def speech_audio(seconds: float) -> np.ndarray[Any, Any]:
    from tools.benchmark import speech

    return speech(seconds, 0)


# -- encoder ------------------------------------------------------------------------------


def encoder_section(
    dec: Decoder, batches: Sequence[int], window_s: float, reps: int
) -> dict[str, Any]:
    import torch

    audio = speech_audio(window_s)
    out: dict[str, Any] = {"window_s": window_s}
    with torch.inference_mode():
        frames = dec.encode_batch([audio])[0].hidden.shape[1]
        feats = dec.features([audio])
        out["input_s"] = round(next(iter(feats.values())).shape[-1] / 100, 2)
        out["encoder_frames"] = int(frames)
        fmin, _ = best_of(lambda: dec.features([audio]), reps)
        out["features_ms"] = round(1000 * fmin, 2)
        for b in batches:
            windows = [audio] * b
            tmin, tmed = best_of(lambda w=windows: dec.encode_batch(w), max(2, reps // b))  # type: ignore[misc]
            out[str(b)] = {
                "pass_ms": round(1000 * tmin, 1),
                "pass_median_ms": round(1000 * tmed, 1),
                "per_window_ms": round(1000 * tmin / b, 1),
                "profile": torch_profile(lambda w=windows: dec.encode_batch(w), 1),  # type: ignore[misc]
            }
    return out


# -- decode steps --------------------------------------------------------------------------


def runner_from(ref: str) -> type:
    """``BatchRunner`` of ``streamer/engine/runner.py`` at git revision ``ref``."""
    source = subprocess.run(
        ["git", "show", f"{ref}:streamer/engine/runner.py"],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    folder = Path(tempfile.mkdtemp(prefix="profile-engine-"))
    path = folder / "runner_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("runner_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["runner_before"] = module
    spec.loader.exec_module(module)
    return module.BatchRunner  # type: ignore[no-any-return]


def step_section(
    dec: Decoder,
    batches: Sequence[int],
    steps: int,
    prompt_tokens: int,
    before: type | None,
    rounds: int = 3,
) -> dict[str, Any]:
    import torch

    from streamer.core.session import DecodeRequest
    from streamer.engine.runner import BatchRunner
    from streamer.engine.scheduler import Job

    audio = speech_audio(8.0)
    vocab_low = 300  # ordinary text tokens, below every special token
    prompt = tuple(range(vocab_low, vocab_low + prompt_tokens))
    saved = dec._suppress, dec.loop_guard
    dec._suppress = torch.cat([dec._suppress, torch.tensor([dec.m.eos_token_id])])
    dec.loop_guard = False

    def start(cls: type, b: int) -> Any:
        runner = cls(dec)
        jobs = []
        for i in range(b):
            n = RATE * (4 + i % 3)
            req = DecodeRequest(f"s{i}", i, "final", 0, audio[:n], 0, n, prompt, (), 10**6, "en")
            jobs.append(Job(req, 0.0))
        runner.admit(jobs)
        for _ in range(3):
            runner.step()
        return runner

    def timed(cls: type, b: int) -> tuple[float, float, list[list[int]], int]:
        runner = start(cls, b)
        tmin, tmed = best_of(runner.step, steps)
        tokens = [list(j.tokens) for g in runner.groups for j in g.jobs]
        return tmin, tmed, tokens, int(runner.groups[0].length)

    out: dict[str, Any] = {"prompt_tokens": prompt_tokens, "steps_timed": steps}
    try:
        with torch.inference_mode():
            for b in batches:
                kinds = [("after", BatchRunner)] + ([("before", before)] if before else [])
                best: dict[str, list[float]] = {k: [] for k, _ in kinds}
                tokens: dict[str, list[list[int]]] = {}
                length = 0
                for _ in range(rounds):  # alternate, so that load changes hit both alike
                    for kind, cls in kinds:
                        tmin, tmed, tokens[kind], length = timed(cls, b)
                        best[kind] += [tmin, tmed]
                row: dict[str, Any] = {"cache_length": length}
                for kind, _ in kinds:
                    row[f"{kind}_ms"] = round(1000 * min(best[kind][0::2]), 2)
                    row[f"{kind}_median_ms"] = round(1000 * min(best[kind][1::2]), 2)
                if before:
                    row["same_tokens"] = tokens["after"] == tokens["before"]
                runner = start(BatchRunner, b)
                row["ops"] = op_cpu_times(runner.step, 5)
                row["profile"] = torch_profile(runner.step, 5)
                if before:
                    row["before_profile"] = torch_profile(start(before, b).step, 5)
                out[str(b)] = row
    finally:
        dec._suppress, dec.loop_guard = saved
    return out


# -- live ------------------------------------------------------------------------------------


class PhaseTimer:
    """Wraps a Decoder's methods to add up its compute per phase (thread CPU time)."""

    PHASES = ("features", "encoder", "prefill", "steps")
    METHODS = ("features", "encode_batch", "logits", "run")

    def __init__(self, dec: Decoder) -> None:
        self.dec = dec
        self.seconds = dict.fromkeys(self.PHASES, 0.0)
        self.counts = {"requests": 0, "encoder_passes": 0, "encoder_frames": 0, "steps": 0,
                       "prefill_tokens": 0}  # fmt: skip
        self._first = False
        self._orig = (dec.features, dec.encode_batch, dec.logits, dec.run)
        clock = _clock()
        features, encode_batch, logits, run = self._orig

        def timed_features(audios: Any) -> Any:
            t0 = clock()
            out = features(audios)
            self.seconds["features"] += clock() - t0
            return out

        def timed_encode(audios: Any) -> Any:
            t0, f0 = clock(), self.seconds["features"]
            out = encode_batch(audios)
            self.seconds["encoder"] += clock() - t0 - (self.seconds["features"] - f0)
            self.counts["encoder_passes"] += 1
            self.counts["encoder_frames"] += int(out[0].hidden.shape[1]) * len(out)
            return out

        def timed_logits(ids: Any, enc: Any, cache: Any) -> Any:
            t0 = clock()
            out = logits(ids, enc, cache)
            phase = "prefill" if self._first else "steps"
            self.seconds[phase] += clock() - t0
            if self._first:
                self.counts["prefill_tokens"] += int(ids.shape[1])
            else:
                self.counts["steps"] += 1
            self._first = False
            return out

        def timed_run(req: Any, *args: Any) -> Any:
            self._first = True
            self.counts["requests"] += 1
            return run(req, *args)

        wrapped = (timed_features, timed_encode, timed_logits, timed_run)
        for name, fn in zip(self.METHODS, wrapped, strict=True):
            setattr(dec, name, fn)  # instance attributes shadow the methods

    def restore(self) -> None:
        for name in self.METHODS:
            delattr(self.dec, name)

    def report(self) -> dict[str, Any]:
        total = sum(self.seconds.values()) or 1.0
        c = self.counts
        passes = max(c["encoder_passes"], 1)
        return {
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "share": {k: round(v / total, 3) for k, v in self.seconds.items()},
            **c,
            "encoder_ms_per_pass": round(1000 * self.seconds["encoder"] / passes, 1),
            "encoder_frames_per_pass": round(c["encoder_frames"] / passes, 1),
            "prefill_ms_per_request": round(
                1000 * self.seconds["prefill"] / max(c["requests"], 1), 1
            ),
            "ms_per_step": round(1000 * self.seconds["steps"] / max(c["steps"], 1), 2),
        }


def live_section(
    cfg: Any, dec: Decoder, manifest: Path, sets: str, limit: int, tails: Sequence[float]
) -> dict[str, Any]:
    """Per set (joined into one stream) and per trimmed-Whisper silence tail (``tail_s``)."""
    from streamer.audio.resample import load_audio
    from tools.evaluate import Evaluator, join_stream, load_manifest, select_sets

    out: dict[str, Any] = {"whisper_input": cfg.streaming.whisper_input}
    saved = dec.tail_s
    for name, clips in select_sets(load_manifest(manifest), sets, limit).items():
        audios = [load_audio(c.path, RATE) for c in clips]
        rng = np.random.default_rng([0, zlib.crc32(name.encode())])
        joined, _ = join_stream(audios, RATE, rng)
        audio_s = len(joined) / RATE
        out[name] = {"clips": len(clips), "audio_s": round(audio_s, 1)}
        for tail in tails:
            dec.tail_s = tail
            timer = PhaseTimer(dec)
            try:
                ev = Evaluator(cfg, dec, 100, clock=_clock())
                run = ev.stream(joined, clips[0].lang, partials=True)
            finally:
                timer.restore()
                dec.tail_s = saved
            out[name][f"tail_s={tail:g}"] = {
                "partial_requests": run.partial_requests,
                "final_requests": run.final_requests,
                "compute_rtf": round(sum(timer.seconds.values()) / audio_s, 3),
                **timer.report(),
                "finals": [e.text for e in run.finals],
            }
    return out


# -- main ------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="builtin:whisper-base")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU-time figures)")
    p.add_argument("--batches", default="1,8", help="rows per step / windows per encoder pass")
    p.add_argument("--steps", type=int, default=15, help="timed decode steps per round")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--window-s", type=float, default=5.0, help="encoder window (before its tail)")
    p.add_argument("--encoder-reps", type=int, default=5)
    p.add_argument("--before", default="", help="git revision whose runner.py to compare")
    p.add_argument("--manifest", type=Path, default=None, help="live: manifest.jsonl")
    p.add_argument("--sets", default="en", help="live: sets joined into one stream each")
    p.add_argument("--limit", type=int, default=0, help="live: clips per set (0: all)")
    p.add_argument("--tails", default="3", help="live: trimmed Whisper silence tails (s)")
    p.add_argument("--no-live", action="store_true")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config k=v")
    p.add_argument("--quick", action="store_true", help="few repetitions (tests, tiny models)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "profile-engine-cpu.json")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.encoder_reps, args.window_s = 3, 2, min(args.window_s, 2.0)
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    from tools.evaluate import default_manifest

    batches = [int(b) for b in args.batches.split(",") if b]
    t0 = time.perf_counter()
    cfg, dec = load_decoder(args.model, args.dtype, args.overrides)
    report: dict[str, Any] = {
        "tool": "tools/profile_engine.py",
        "argv": list(sys.argv[1:] if argv is None else argv),
        "model": args.model,
        "dtype": args.dtype,
        "torch_threads": torch.get_num_threads(),
        "clock": "thread CPU time" if args.threads == 1 else "wall",
        "machine": {"platform": platform.platform(), "cpus": _cpus(), "load_avg": _load()},
        "torch": torch.__version__,
        "load_s": round(time.perf_counter() - t0, 1),
    }
    report["encoder"] = encoder_section(dec, batches, args.window_s, args.encoder_reps)
    before = runner_from(args.before) if args.before else None
    report["decode_step"] = step_section(dec, batches, args.steps, args.prompt_tokens, before)
    if args.before:
        report["decode_step"]["before"] = args.before
    if not args.no_live:
        manifest = (args.manifest or default_manifest()).resolve()
        tails = [float(t) for t in args.tails.split(",") if t]
        report["live"] = live_section(cfg, dec, manifest, args.sets, args.limit, tails)
    report["machine"]["load_avg_after"] = _load()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    _print_summary(report)
    print(f"-> {args.out}")
    return 0


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


def _load() -> list[float]:
    import os

    return [round(x, 2) for x in os.getloadavg()]


def _print_summary(report: dict[str, Any]) -> None:
    enc = report["encoder"]
    for key, row in enc.items():
        if isinstance(row, dict):
            print(f"encoder B={key}: {row['pass_ms']} ms per pass of {enc['input_s']} s input "
                  f"({row['per_window_ms']} ms per window)")  # fmt: skip
    for key, row in report["decode_step"].items():
        if isinstance(row, dict):
            before = f", before {row['before_ms']} ms" if "before_ms" in row else ""
            print(f"decode step B={key}: {row['after_ms']} ms{before} "
                  f"(cache length {row['cache_length']})")  # fmt: skip
    for name, live in report.get("live", {}).items():
        if isinstance(live, dict):
            for key, run in live.items():
                if isinstance(run, dict):
                    print(f"live {name} ({live['audio_s']} s, {key}): RTF {run['compute_rtf']}, "
                          f"shares {run['share']}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
