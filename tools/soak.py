"""Soak the daemon: hours of audio through several streams, watching for growth.

The daemon runs in this process (``App``, as ``streamer serve`` builds it), so
its internals can be measured; audio goes in as clients send it: each stream
is a WebSocket client on ``/v1/stream`` looping the test clips (shuffled,
random silences, one long pause) at ``--speed`` x real time, reconnecting
under the same stream id every ``--session-minutes`` of audio. One more
client reads every stream on ``/v1/captions``; ``/metrics`` is scraped too.

Every ``--sample-s`` seconds: RSS, open fds, threads, asyncio tasks, gc
objects, event-loop lag, GPU memory (CUDA), engine load, ``/metrics``
series, and the size of every container attribute (dict, list, set, deque,
audio buffer, queue) of the daemon's long-lived objects and of every live
stream's runner, session, segmenter, open segment and subscription (maximum
over streams), found by introspection, so new attributes are watched too.
Per caption event: the daemon's ``latency_ms`` and the end-to-end latency
(from the client sending the audio, so time in socket buffers counts).

The report (JSON): the samples, and a summary over the audio after
``--warmup``: per series first/last/max, early and late halves' means and
maxima, the least-squares slope per hour of audio (all streams, as received
by the daemon); latency p50/p95 early vs late; per stream sessions, close
codes and sequence errors (``seq`` must rise across reconnects). A saturated
engine (``busy_fraction`` near 1) makes backlogs and latency grow by design:
that is overload, not a leak.

Usage (from the repository root):
    .venv/bin/python tools/soak.py --streams 4 --audio-hours 1 --speed 4 \\
        [--model tiny|builtin:whisper-base|PATH] [--session-minutes 10] \\
        [--block-ms 500] [--sample-s 2] [-c FILE] [--set section.key=value] \\
        [--out results/soak.json]

``--model tiny`` (the default) is a random-weight tiny Whisper built on the
fly, so the soak runs anywhere; its decodes are short (``chunk_ms=500``,
``min_tokens=2``, ``max_tokens_per_second=3``) unless ``--set`` says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import dataclasses
import gc
import json
import os
import platform
import queue
import sys
import tempfile
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make `streamer` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VERSION = "1.0"
REPO_ROOT = Path(__file__).resolve().parents[1]
AUDIO_DIR = REPO_ROOT / "tests" / "data" / "audio"
RATE = 16000
TINY = "tiny"
#: Short decodes for the random tiny model (it never emits EOS: decodes run to the cap).
TINY_OVERRIDES = (
    "streaming.chunk_ms=500",
    "streaming.min_tokens=2",
    "streaming.max_tokens_per_second=3.0",
    'model.source_language="en"',
    'model.target_language="en"',
    # float32: the soak watches our state; bfloat16 (auto on AMX CPUs) adds oneDNN's
    # kernel caches, which grow for ~60 windows of new shapes and then stay flat
    # (Whisper base: +155 MB against +90 MB for float32, measured by hand)
    'model.dtype="float32"',
)
Audio = np.ndarray[Any, np.dtype[np.float32]]
Event = tuple[float, str, float | None, float | None]  # received at, type, daemon ms, e2e ms


@dataclass(frozen=True, slots=True)
class SoakOptions:
    streams: int = 4
    audio_hours: float = 1.0  # per stream
    speed: float = 4.0  # per stream, x real time
    model: str = TINY
    session_minutes: float = 10.0  # audio per WebSocket connection
    block_ms: int = 500  # audio per binary frame
    sample_s: float = 2.0
    warmup: float = 0.2  # fraction of the audio left out of the summary
    seed: int = 0
    configs: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()
    max_wall_s: float = 0.0  # 0: no limit
    progress_s: float = 0.0  # a progress line on stderr this often (0: none)

    def __post_init__(self) -> None:
        if min(self.streams, self.speed, self.audio_hours, self.sample_s) <= 0:
            raise ValueError("streams, speed, audio hours and the sample interval must be > 0")
        if self.block_ms < 10 or self.session_minutes <= 0 or not 0 <= self.warmup < 1:
            raise ValueError("block_ms >= 10, session_minutes > 0, 0 <= warmup < 1")


# ------------------------------------------------------------------ audio


def load_clips(folder: Path = AUDIO_DIR) -> list[Audio]:
    from streamer.audio.resample import load_audio

    rows = [json.loads(x) for x in (folder / "manifest.jsonl").read_text().splitlines() if x]
    return [np.asarray(load_audio(folder / r["path"], RATE), dtype=np.float32) for r in rows]


def make_tape(clips: Sequence[Audio], rng: np.random.Generator) -> Audio:
    """One loop of a stream's audio: the clips shuffled, 0.3–2 s silences, one 8 s pause."""
    parts: list[Audio] = []
    pause_after = int(rng.integers(len(clips)))
    for k, i in enumerate(rng.permutation(len(clips))):
        gap = 8.0 if k == pause_after else float(rng.uniform(0.3, 2.0))
        parts += [clips[i], np.zeros(round(gap * RATE), dtype=np.float32)]
    tape = np.concatenate(parts)
    return np.roll(tape, -int(rng.integers(len(tape))))  # streams start at different places


def pcm_frames(tape: Audio, block: int) -> Iterator[bytes]:
    """The tape looped forever as s16le frames of ``block`` samples."""
    pcm = (np.clip(tape, -1.0, 1.0) * 32767).astype("<i2")
    pos = 0
    while True:
        end = pos + block
        chunk = (
            pcm[pos:end] if end <= len(pcm) else np.concatenate([pcm[pos:], pcm[: end % len(pcm)]])
        )
        pos = end % len(pcm)
        yield chunk.tobytes()


# ------------------------------------------------------------------ measuring


def container_sizes(obj: Any) -> dict[str, int]:
    """len() of every container attribute of ``obj`` (slots too; queues: qsize())."""
    from streamer.core.window import AudioBuffer

    names = set(getattr(obj, "__dict__", {}))
    for cls in type(obj).__mro__:
        slots = getattr(cls, "__slots__", ())
        names.update((slots,) if isinstance(slots, str) else slots)
    out: dict[str, int] = {}
    for name in sorted(names):
        value = getattr(obj, name, None)
        if isinstance(value, dict | list | set | frozenset | deque | bytearray | AudioBuffer):
            out[name] = len(value)
        elif isinstance(value, queue.SimpleQueue | queue.Queue | asyncio.Queue):
            out[name] = value.qsize()
    return out


def state_sizes(app: Any) -> dict[str, int]:
    """``label.attr`` -> size; per-stream labels give the maximum over live streams."""
    engine = app.engine
    single = {
        "app": app,
        "fanout": app.fanout,
        "factory": app.factory,
        "ingest": app.ingest,
        "server": app.server,
        "metrics": app.metrics,
        "engine": engine,
        "engine.scheduler": getattr(engine, "scheduler", None),
        "engine.runner": getattr(engine, "runner", None),
        "tokens": getattr(getattr(engine, "decoder", None), "pieces", None),
    }
    runners = list(app.factory.runners.values()) if app.factory is not None else []
    opened = [s for s in (getattr(r.session, "_open", None) for r in runners) if s is not None]
    multi: dict[str, list[Any]] = {
        "subscription": list(getattr(app.fanout, "_subs", [])),
        "runner": runners,
        "session": [r.session for r in runners],
        "segmenter": [r.session.segmenter for r in runners],
        "segment": opened,
        "agreement": [s.agreement for s in opened],
    }
    out: dict[str, int] = {}
    for label, obj in single.items():
        if obj is not None:
            out.update({f"{label}.{k}": n for k, n in container_sizes(obj).items()})
    for label, objs in multi.items():
        out[f"{label}.count"] = len(objs)
        for obj in objs:
            for k, n in container_sizes(obj).items():
                out[f"{label}.{k}"] = max(out.get(f"{label}.{k}", 0), n)
    return out


def process_figures() -> dict[str, float | None]:
    """RSS (MiB), open fds and OS threads of this process (Linux /proc; else None)."""
    out: dict[str, float | None] = {"rss_mib": None, "fds": None, "os_threads": None}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss_mib"] = int(line.split()[1]) / 1024
            elif line.startswith("Threads:"):
                out["os_threads"] = int(line.split()[1])
        out["fds"] = len(os.listdir("/proc/self/fd"))
    return out


def gpu_figures(app: Any) -> dict[str, float]:
    device = getattr(getattr(getattr(app.engine, "decoder", None), "m", None), "device", None)
    if getattr(device, "type", "") != "cuda":
        return {}
    import torch

    return {
        "gpu_allocated_mib": torch.cuda.memory_allocated(device) / 2**20,
        "gpu_reserved_mib": torch.cuda.memory_reserved(device) / 2**20,
    }


def scrape(port: int) -> tuple[int | None, float | None]:
    """``/metrics``: the number of samples exported (label sets that only grow would
    show) and the seconds of audio the daemon has received."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            lines = resp.read().decode("utf-8").splitlines()
    except OSError:
        return None, None
    samples = [line for line in lines if line and not line.startswith("#")]
    received = [s for s in samples if s.startswith("streamer_audio_received_seconds_total ")]
    return len(samples), float(received[0].split()[1]) if received else None


# ------------------------------------------------------------------ clients


@dataclass(slots=True)
class StreamLog:
    """What one soak client sent and received."""

    stream: str
    sent_s: float = 0.0
    sessions: int = 0
    refused: int = 0
    close_codes: dict[int, int] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    sent: list[tuple[float, float]] = field(default_factory=list)  # (session s, wall) per frame
    last_seq: int = 0
    seq_errors: int = 0
    errors: list[str] = field(default_factory=list)
    behind_s: float = 0.0  # worst lag of the sender behind its pacing (wall s)

    def e2e_ms(self, end_s: float, now: float) -> float | None:
        """Wall time since the frame holding ``end_s`` (session seconds) was sent."""
        i = bisect.bisect_left(self.sent, end_s - 0.002, key=lambda f: f[0])
        return None if i >= len(self.sent) else (now - self.sent[i][1]) * 1000.0


@dataclass(slots=True)
class Shared:
    opts: SoakOptions
    url: str
    t0: float = 0.0
    logs: dict[str, StreamLog] = field(default_factory=dict)
    captions_events: int = 0
    captions_finals: int = 0
    captions_close: int | None = None

    @property
    def sent_s(self) -> float:
        return sum(s.sent_s for s in self.logs.values())


async def run_client(shared: Shared, slog: StreamLog, tape: Audio) -> None:
    """Send ``audio_hours`` of the looped tape in sessions, each paced at ``speed``."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidHandshake

    opts = shared.opts
    block = round(opts.block_ms * RATE / 1000)
    frames = pcm_frames(tape, block)
    start = {"type": "start", "stream": slog.stream, "sample_rate": RATE, "encoding": "pcm_s16le"}
    while slog.sent_s < opts.audio_hours * 3600:
        try:
            ws = await connect(f"{shared.url}/v1/stream", max_size=None, open_timeout=30)
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            slog.errors.append(f"connect: {exc}")
            await asyncio.sleep(0.5)
            continue
        async with ws:
            try:
                await ws.send(json.dumps(start))
                ready = json.loads(await ws.recv()).get("type") == "ready"
            except ConnectionClosed as exc:
                ready = False
                slog.errors.append(f"start: {exc}")
            if not ready:  # e.g. refused: the previous session's id not released yet
                slog.refused += 1
                await asyncio.sleep(0.2)
                continue
            slog.sessions += 1
            slog.sent.clear()
            receiver = asyncio.create_task(receive(slog, ws))
            session = min(opts.session_minutes * 60, opts.audio_hours * 3600 - slog.sent_s)
            t0, sent = time.monotonic(), 0.0
            try:
                while sent < session:
                    wait = t0 + sent / opts.speed - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    slog.behind_s = max(slog.behind_s, -wait)
                    await ws.send(next(frames))
                    sent += block / RATE
                    slog.sent_s += block / RATE
                    slog.sent.append((sent, time.monotonic()))
                await ws.send('{"type": "stop"}')
                await asyncio.wait_for(receiver, 120)
            except (ConnectionClosed, TimeoutError) as exc:
                slog.errors.append(f"session {slog.sessions}: {type(exc).__name__}: {exc}")
                receiver.cancel()
            code = -1 if ws.close_code is None else ws.close_code
            slog.close_codes[code] = slog.close_codes.get(code, 0) + 1


async def receive(slog: StreamLog, ws: Any) -> None:
    from websockets.exceptions import ConnectionClosed

    with contextlib.suppress(ConnectionClosed):
        async for message in ws:
            now = time.monotonic()
            event = json.loads(message)
            kind = event.get("type")
            if kind not in ("partial", "final"):  # status events count only
                if kind not in ("source_lost", "source_restored"):
                    slog.errors.append(f"unexpected message: {message[:200]}")
                continue
            if event["seq"] <= slog.last_seq:
                slog.seq_errors += 1
            slog.last_seq = max(slog.last_seq, event["seq"])
            slog.events.append((now, kind, event["latency_ms"], slog.e2e_ms(event["end"], now)))


async def read_captions(shared: Shared) -> None:
    """One /v1/captions subscriber for every stream (the caption server's side)."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    async with connect(f"{shared.url}/v1/captions", max_size=None) as ws:
        with contextlib.suppress(ConnectionClosed):
            async for message in ws:
                shared.captions_events += 1
                shared.captions_finals += json.loads(message).get("type") == "final"
        shared.captions_close = ws.close_code


async def sample_loop(app: Any, shared: Shared, samples: list[dict[str, Any]]) -> None:
    """Append one sample every ``sample_s`` until cancelled."""
    port = app.server.port  # the server goes away when the daemon stops
    last_wall, last_busy = time.monotonic(), app.engine.stats.busy_seconds
    last_print = last_wall
    while True:
        planned = time.monotonic() + shared.opts.sample_s
        await asyncio.sleep(shared.opts.sample_s)
        now = time.monotonic()
        stats = app.engine.stats
        series, received = await asyncio.to_thread(scrape, port)
        sent = shared.sent_s
        samples.append(
            {
                "t": round(now - shared.t0, 3),
                "audio_h": (sent if received is None else received) / 3600,  # daemon side
                "sent_h": sent / 3600,
                "loop_lag_ms": round((now - planned) * 1000.0, 2),
                **process_figures(),
                "py_threads": threading.active_count(),
                "tasks": len(asyncio.all_tasks()),
                "gc_objects": len(gc.get_objects()),
                **gpu_figures(app),
                "metrics_series": series,
                "engine_load": round((stats.busy_seconds - last_busy) / (now - last_wall), 3),
                "engine_requests": stats.requests,
                "engine_failed": stats.failed,
                "state": state_sizes(app),
            }
        )
        if shared.opts.progress_s and now - last_print >= shared.opts.progress_s:
            last_print = now
            row = samples[-1]
            print(f"soak: {row['t']:6.0f} s  {row['audio_h']:.3f} h audio  RSS "
                  f"{row['rss_mib']} MiB  fds {row['fds']}  engine {row['engine_load']:.0%}",
                  file=sys.stderr, flush=True)  # fmt: skip
        last_wall, last_busy = now, stats.busy_seconds


# ------------------------------------------------------------------ summary


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "p50": None, "p95": None, "max": None}
    arr = np.asarray(values, dtype=np.float64)
    p50, p95 = np.percentile(arr, [50, 95])
    return {"n": len(arr), "p50": round(p50, 1), "p95": round(p95, 1), "max": round(arr.max(), 1)}


def series_summary(xs: Sequence[float], ys: Sequence[float]) -> dict[str, float | None]:
    """Growth figures of one series (x: audio hours, all streams together)."""
    x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    early, late = (y[: len(y) // 2], y[len(y) // 2 :]) if len(y) > 1 else (y, y)
    slope = float(np.polyfit(x, y, 1)[0]) if len(y) >= 3 and np.ptp(x) > 0 else None
    return {
        "first": float(y[0]),
        "last": float(y[-1]),
        "max": float(y.max()),
        "early_mean": float(early.mean()),
        "late_mean": float(late.mean()),
        "early_max": float(early.max()),
        "late_max": float(late.max()),
        "slope_per_audio_hour": None if slope is None else round(slope, 4),
    }


def summarize(samples: list[dict[str, Any]], shared: Shared) -> dict[str, Any]:
    """Every series and latency, early vs late half, over the audio after the warm-up."""
    opts = shared.opts
    measured = [s for s in samples if s["audio_h"] >= opts.warmup * opts.audio_hours * opts.streams]
    measured = measured if len(measured) >= 4 else samples
    if not measured:
        return {}
    xs = [s["audio_h"] for s in measured]
    series: dict[str, Any] = {}
    for key in measured[-1]:
        pairs = [(s["audio_h"], s[key]) for s in measured if s.get(key) is not None]
        if key not in ("t", "audio_h", "sent_h", "state") and len(pairs) >= 2:
            series[key] = series_summary(*zip(*pairs, strict=True))
    names = sorted({k for s in measured for k in s["state"]})
    state = {k: series_summary(xs, [s["state"].get(k, 0) for s in measured]) for k in names}
    start, end = shared.t0 + measured[0]["t"], shared.t0 + measured[-1]["t"]
    latency: dict[str, Any] = {}
    for name, pick in (("daemon", 2), ("end_to_end", 3)):
        for kind in ("partial", "final"):
            halves: tuple[list[float], list[float]] = ([], [])
            for slog in shared.logs.values():
                for ev in slog.events:
                    ms = ev[2] if pick == 2 else ev[3]
                    if ev[1] == kind and ms is not None and ev[0] >= start:
                        halves[ev[0] >= (start + end) / 2].append(ms)
            latency[f"{name}_{kind}"] = {
                "early": percentiles(halves[0]),
                "late": percentiles(halves[1]),
            }
    return {
        "measured_from_audio_h": round(xs[0], 4),
        "series": series,
        "state": state,
        "latency_ms": latency,
    }


def stream_report(slog: StreamLog) -> dict[str, Any]:
    kinds = [ev[1] for ev in slog.events]
    return {
        "audio_h": round(slog.sent_s / 3600, 4),
        "sessions": slog.sessions,
        "refused_starts": slog.refused,
        "close_codes": {str(k): v for k, v in sorted(slog.close_codes.items())},
        "partials": kinds.count("partial"),
        "finals": kinds.count("final"),
        "last_seq": slog.last_seq,
        "seq_errors": slog.seq_errors,
        "max_send_lag_s": round(slog.behind_s, 3),
        "errors": slog.errors[:20],
    }


# ------------------------------------------------------------------ the run


def build_config(opts: SoakOptions, model_dir: Path | None) -> Any:
    """The config files and ``--set`` overrides, then what the soak needs (no sources,
    console or JSONL; WebSocket on a free loopback port, limits that admit the soak)."""
    from streamer.config import ConsoleConfig, JsonlConfig, load_config

    model = (
        [*TINY_OVERRIDES, f'model.id="{model_dir}"'] if model_dir else [f'model.id="{opts.model}"']
    )
    cfg = load_config(list(opts.configs), [*model, *opts.overrides])
    ws = dataclasses.replace(
        cfg.websocket,
        enabled=True,
        host="127.0.0.1",
        port=0,
        max_streams=max(cfg.websocket.max_streams, opts.streams + 1),
        max_audio_rate=max(cfg.websocket.max_audio_rate, opts.speed * 1.5 + 1.0),
        audio_burst_s=max(cfg.websocket.audio_burst_s, 30.0),
        auth_token_file="",
    )
    return dataclasses.replace(
        cfg, sources=(), websocket=ws, console=ConsoleConfig(enabled=False), jsonl=JsonlConfig()
    )


async def soak(opts: SoakOptions) -> dict[str, Any]:
    """Run one soak and return the report (see the module docstring)."""
    from streamer.service.app import App

    with contextlib.ExitStack() as stack:
        model_dir = None
        if opts.model == TINY:
            from transformers.utils import logging as hf_logging

            from streamer.testing.tiny_models import make_whisper

            hf_logging.disable_progress_bar()
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="soak-")))
            model_dir = make_whisper(tmp / "whisper")
        cfg = build_config(opts, model_dir)
        clips = load_clips()
        app = App(cfg, keep_serving=True)
        app_task = asyncio.create_task(app.run(), name="daemon")
        loading = time.monotonic()
        while not app.ready or app.factory is None or app.server is None:
            if app_task.done():
                app_task.result()
                raise RuntimeError("the daemon ended before it was ready")
            await asyncio.sleep(0.05)
        load_s = time.monotonic() - loading
        shared = Shared(opts, f"ws://127.0.0.1:{app.server.port}", t0=time.monotonic())
        samples: list[dict[str, Any]] = []
        captions = asyncio.create_task(read_captions(shared), name="captions")
        sampler = asyncio.create_task(sample_loop(app, shared, samples), name="sampler")
        clients = []
        for i in range(opts.streams):
            slog = shared.logs.setdefault(f"soak-{i}", StreamLog(f"soak-{i}"))
            tape = make_tape(clips, np.random.default_rng([opts.seed, i]))
            clients.append(asyncio.create_task(run_client(shared, slog, tape), name=slog.stream))
        sending = asyncio.gather(*clients)
        try:  # until every client is done, the daemon ends (fatal error, signal) or time is up
            async with asyncio.timeout(opts.max_wall_s or None):
                waiting: set[asyncio.Future[Any]] = {sending, app_task}
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            timed_out = False
        except TimeoutError:
            timed_out = True
        ended_early = app_task.done()
        wall_s = time.monotonic() - shared.t0
        await asyncio.sleep(opts.sample_s * 1.5)  # one sample after the last session
        if sampler.done():
            sampler.result()  # a measuring bug: raise it
        assert app.engine is not None
        stats = dataclasses.asdict(app.engine.stats)
        app.request_stop()
        exit_code = await asyncio.wait_for(app_task, 120)
        rest: list[asyncio.Future[Any]] = [sampler, captions, sending, *clients]
        for task in rest:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    sent_h = shared.sent_s / 3600
    return {
        "tool": "tools/soak.py",
        "version": VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "options": dataclasses.asdict(opts),
        "model_load_s": round(load_s, 2),
        "config": {k: dataclasses.asdict(getattr(cfg, k)) for k in ("model", "streaming", "vad")},
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "run": {
            "wall_s": round(wall_s, 1),
            "timed_out": timed_out,
            "daemon_ended_early": ended_early,
            "audio_h_total": round(sent_h, 4),
            "speed_achieved_per_stream": round(sent_h * 3600 / opts.streams / wall_s, 2),
            "daemon_exit_code": exit_code,
            "engine": {**stats, "busy_fraction": round(stats["busy_seconds"] / wall_s, 3)},
            "captions_subscriber": {
                "events": shared.captions_events,
                "finals": shared.captions_finals,
                "close_code": shared.captions_close,
            },
            "streams": {name: stream_report(s) for name, s in shared.logs.items()},
        },
        "summary": summarize(samples, shared),
        "samples": samples,
    }


# ------------------------------------------------------------------ CLI


#: (flag, type, help) of the options that map onto ``SoakOptions`` fields.
FLAGS = (
    ("--streams", int, "client streams"),
    ("--audio-hours", float, "audio per stream (hours)"),
    ("--speed", float, "x real time, per stream"),
    ("--model", str, "tiny, builtin:whisper-base or a checkpoint folder"),
    ("--session-minutes", float, "audio minutes per connection, then the client reconnects"),
    ("--block-ms", int, "audio per binary frame (ms)"),
    ("--sample-s", float, "seconds between samples"),
    ("--warmup", float, "fraction of the audio left out of the summary"),
    ("--seed", int, "seed of the tapes (clip order, silences)"),
    ("--max-wall-s", float, "stop sending after this long (0: no limit)"),
)


def parse_args(argv: Sequence[str] | None) -> tuple[SoakOptions, Path, int]:
    p = argparse.ArgumentParser(prog="tools/soak.py", description=__doc__.split("\n")[0])
    defaults = SoakOptions()
    for flag, kind, text in FLAGS:
        default = getattr(defaults, flag[2:].replace("-", "_"))
        p.add_argument(flag, type=kind, default=default, help=f"{text} [{default}]")
    p.add_argument("-c", "--config", dest="configs", action="append", default=[])
    p.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value")
    p.add_argument("--progress-s", type=float, default=60.0, help="progress line every (s)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "soak.json")
    a = vars(p.parse_args(argv))
    out, threads = a.pop("out"), a.pop("threads")
    try:
        opts = SoakOptions(
            **{**a, "configs": tuple(a["configs"]), "overrides": tuple(a["overrides"])}
        )
    except ValueError as exc:
        p.error(str(exc))
    return opts, out, threads


SHOWN = ("rss_mib", "fds", "os_threads", "tasks", "gc_objects", "metrics_series", "loop_lag_ms",
         "gpu_allocated_mib", "gpu_reserved_mib")  # fmt: skip


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A digest of the report for the terminal."""
    run, summary = report["run"], report["summary"]
    streams = run["streams"].values()
    lines = [
        f"{run['audio_h_total']:.2f} h of audio in {run['wall_s']:.0f} s "
        f"({run['speed_achieved_per_stream']:.1f}x per stream, {len(streams)} streams), "
        f"engine busy {run['engine']['busy_fraction']:.0%}; "
        f"{sum(s['sessions'] for s in streams)} sessions, "
        f"{sum(s['seq_errors'] for s in streams)} sequence errors, "
        f"daemon exit {run['daemon_exit_code']}"
    ]
    for key in SHOWN:
        if (v := summary["series"].get(key)) is not None:
            lines.append(
                f"  {key:<18} early {v['early_mean']:10.1f}  late {v['late_mean']:10.1f}  "
                f"max {v['max']:10.1f}  slope/audio-h {v['slope_per_audio_hour']}"
            )
    grown = [f"{k} {v['early_max']:.0f}->{v['late_max']:.0f}" for k, v in summary["state"].items()
             if v["late_max"] > v["early_max"] * 1.5 + 8]  # fmt: skip
    lines.append(f"  state grown (late max > 1.5 x early max + 8): {', '.join(grown) or 'none'}")
    for name, lat in summary["latency_ms"].items():
        e, late = lat["early"], lat["late"]
        lines.append(
            f"  {name:<18} latency ms p50/p95: early {e['p50']}/{e['p95']} (n={e['n']}), "
            f"late {late['p50']}/{late['p95']} (n={late['n']})"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    opts, out, threads = parse_args(argv)
    from streamer.errors import StreamerError

    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        report = asyncio.run(soak(opts))
    except StreamerError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    for line in summary_lines(report):
        print(line, file=sys.stderr)
    print(f"report: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
