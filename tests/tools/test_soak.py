"""A short soak: 3 client streams, minutes of audio each, through the real daemon.

The tiny Whisper keeps it under a minute; the engine stays well below
saturation (a saturated engine makes backlogs grow by design). What must
hold: the process (RSS, fds, threads, tasks, gc objects, /metrics series)
and every container of the daemon are as big in the second half as in the
first, per-stream state stays under bounds derived from the config, and
latency does not grow. The long runs are ``tools/soak.py`` itself.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tools.soak import SoakOptions, StreamLog, pcm_frames, soak, summary_lines

STREAMS = 3
RATE = 16000


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def report() -> dict[str, Any]:
    opts = SoakOptions(
        streams=STREAMS,
        audio_hours=0.04,  # 2.4 min per stream: 3 sessions of at most a minute
        speed=4.0,
        session_minutes=1.0,
        sample_s=0.5,
        warmup=0.25,
        max_wall_s=120.0,
    )
    result = await soak(opts)
    print("\n".join(summary_lines(result)))
    return result


@pytest.fixture(scope="module")
def streaming(report: dict[str, Any]) -> dict[str, Any]:
    return dict(report["config"]["streaming"])


def test_every_session_ran_cleanly(report: dict[str, Any]) -> None:
    run = report["run"]
    assert not run["timed_out"] and run["daemon_exit_code"] == 0
    assert run["engine"]["failed"] == 0
    assert run["engine"]["busy_fraction"] < 0.8, "the engine saturated: not a soak any more"
    for name, s in run["streams"].items():
        assert s["errors"] == [] and s["refused_starts"] == 0, (name, s)
        assert s["sessions"] == 3 and s["close_codes"] == {"1000": 3}, (name, s)
        assert s["finals"] >= 10 and s["seq_errors"] == 0, (name, s)  # seq rises across sessions
    finals = sum(s["finals"] for s in run["streams"].values())
    assert run["captions_subscriber"]["finals"] == finals  # every final reached both sockets


def test_process_figures_stay_flat(report: dict[str, Any]) -> None:
    series = report["summary"]["series"]
    assert len(report["samples"]) >= 40

    def grown(key: str) -> float:
        return float(series[key]["late_max"] - series[key]["early_max"])

    assert grown("rss_mib") <= 30, series["rss_mib"]
    assert grown("fds") <= 2, series["fds"]
    assert grown("os_threads") <= 4 and series["py_threads"]["max"] <= 16, series["py_threads"]
    assert grown("tasks") <= 4, series["tasks"]
    gc_objects = series["gc_objects"]
    assert gc_objects["late_mean"] <= gc_objects["early_mean"] * 1.01 + 2000, gc_objects
    # per-stream series (engine lag) come and go; a label set per session would pile up
    assert grown("metrics_series") <= STREAMS, series["metrics_series"]


#: Hard bounds per state size, from the settings (s: the streaming config dict).
BOUNDS: dict[str, Callable[[dict[str, Any]], float]] = {
    "session.buffer": lambda s: 3 * s["max_segment_s"] * RATE,  # never the whole session
    "runner._arrivals": lambda s: 3 * s["max_segment_s"] / 0.5 + 2,  # 500 ms frames
    "session._history": lambda s: s["prompt_max_tokens"],
    "session._closing": lambda s: 4,
    "session._in_flight": lambda s: 2,
    "session._abandoned": lambda s: 1,
    "runner._pending": lambda s: 2,
    "agreement._votes": lambda s: s["agreement_n"],
    "agreement._committed": lambda s: s["max_tokens_per_second"] * s["max_segment_s"] + 8,
    "engine._cancelled": lambda s: STREAMS,
    "engine._callbacks": lambda s: 2 * STREAMS,
    "engine._lag": lambda s: STREAMS,
    "engine.scheduler._running": lambda s: STREAMS,
    "engine.scheduler._waiting": lambda s: STREAMS,
    "factory.runners": lambda s: STREAMS,
    "factory._ended": lambda s: STREAMS,  # the same ids come back
    "ingest._conns": lambda s: STREAMS + 1,
    "ingest._finishing": lambda s: STREAMS,
    "fanout._subs": lambda s: STREAMS + 1,  # each client's own + /v1/captions
    "subscription._queue": lambda s: 64,
    "tokens._cache": lambda s: 493,  # the tiny tokenizer's vocabulary: bounded by design
}
#: Sizes that follow the audio (segment lengths), not time: only their hard bound applies.
FLUCTUATING = {"session.buffer", "runner._arrivals", "tokens._cache", "agreement._committed",
               "segment.committed_pieces"}  # fmt: skip


def test_state_sizes_are_bounded_and_do_not_grow(
    report: dict[str, Any], streaming: dict[str, Any]
) -> None:
    state = report["summary"]["state"]
    assert {"session.buffer", "engine._cancelled", "factory._ended"} <= set(state)
    too_big = {k: (state[k]["max"], bound(streaming)) for k, bound in BOUNDS.items()
               if k in state and state[k]["max"] > bound(streaming)}  # fmt: skip
    assert not too_big, too_big
    grown = {
        k: (v["early_max"], v["late_max"])
        for k, v in state.items()
        if k not in FLUCTUATING and v["late_max"] > v["early_max"] * 1.5 + 8
    }
    assert not grown, grown


def test_latency_does_not_grow(report: dict[str, Any]) -> None:
    latency = report["summary"]["latency_ms"]
    for kind in ("end_to_end_final", "end_to_end_partial", "daemon_final"):
        early, late = latency[kind]["early"], latency[kind]["late"]
        assert early["n"] >= 10 and late["n"] >= 10, (kind, latency[kind])
        assert late["p50"] <= 2 * early["p50"] + 300, (kind, latency[kind])
        assert late["p95"] <= 2 * early["p95"] + 1000, (kind, latency[kind])


def test_frames_loop_the_tape_exactly() -> None:
    import numpy as np

    tape = ((np.arange(10) - 5) / 10).astype(np.float32)
    frames = pcm_frames(tape, 4)
    got = np.frombuffer(b"".join(next(frames) for _ in range(5)), dtype="<i2")
    expected = (np.clip(np.concatenate([tape, tape]), -1, 1) * 32767).astype("<i2")
    assert np.array_equal(got, expected)


def test_end_to_end_latency_is_measured_from_the_frame_that_held_the_audio() -> None:
    slog = StreamLog("s", sent=[(0.5, 10.0), (1.0, 10.2), (1.5, 10.4)])
    assert slog.e2e_ms(0.7, 11.0) == pytest.approx(800.0)  # in the second frame
    assert slog.e2e_ms(1.0, 11.0) == pytest.approx(800.0)  # its last sample
    assert slog.e2e_ms(1.5, 11.0) == pytest.approx(600.0)
    assert slog.e2e_ms(1.6, 11.0) is None  # not sent in this session


def test_container_sizes_find_every_container_attribute() -> None:
    import asyncio
    import queue
    from collections import deque
    from dataclasses import dataclass, field

    import numpy as np

    from streamer.core.window import AudioBuffer
    from tools.soak import container_sizes

    @dataclass(slots=True)
    class Slotted:
        items: list[int] = field(default_factory=lambda: [1, 2])
        name: str = "not a container"

    class Plain:
        def __init__(self) -> None:
            self._seen = {"a": 1}
            self.window = deque([1, 2, 3])
            self.inbox: queue.SimpleQueue[int] = queue.SimpleQueue()
            self.inbox.put(7)
            self.buffer = AudioBuffer()
            self.buffer.append(np.zeros(5, dtype=np.float32))
            self.loop_queue: asyncio.Queue[int] = asyncio.Queue()
            self.number = 3

    assert container_sizes(Slotted()) == {"items": 2}
    assert container_sizes(Plain()) == {
        "_seen": 1, "buffer": 5, "inbox": 1, "loop_queue": 0, "window": 3,
    }  # fmt: skip


def test_series_summary_reports_growth_per_audio_hour() -> None:
    from tools.soak import series_summary

    flat = series_summary([0.5, 1.0, 1.5, 2.0], [10, 12, 10, 12])
    assert flat["slope_per_audio_hour"] == pytest.approx(0.8)
    assert flat["early_max"] == flat["late_max"] == 12
    growing = series_summary([0.5, 1.0, 1.5, 2.0], [10, 20, 30, 40])
    assert growing["slope_per_audio_hour"] == pytest.approx(20.0)
    assert (growing["early_mean"], growing["late_mean"]) == (15.0, 35.0)


async def test_a_daemon_that_dies_ends_the_soak_with_a_report(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch
    from transformers.models.whisper.modeling_whisper import WhisperDecoderLayer

    real_forward = WhisperDecoderLayer.forward
    calls = 0

    def forward(self: WhisperDecoderLayer, *args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls > 40:
            raise torch.AcceleratorError("CUDA error: unspecified launch failure")
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(WhisperDecoderLayer, "forward", forward)
    opts = SoakOptions(streams=2, audio_hours=1.0, speed=4.0, sample_s=0.5, max_wall_s=120)
    result = await soak(opts)
    run = result["run"]
    assert run["daemon_ended_early"] and not run["timed_out"], run
    assert run["daemon_exit_code"] == 1 and run["audio_h_total"] < 0.1, run
