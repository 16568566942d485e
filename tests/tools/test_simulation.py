"""The computation-aware simulation: timing rules checked with a fake decoder, VAD and clock."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from streamer.core.segmenter import SegmenterSettings
from streamer.core.session import DecodeResult, SessionSettings
from tools import metrics
from tools.simulation import simulate


class FakeClock:
    """The fake decoder and VAD advance it by their 'compute time'."""

    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


class FakeVad:
    frame_samples = 512

    def __init__(self, clock, cost):
        self.clock, self.cost, self.rest = clock, cost, 0

    def process(self, samples):
        self.clock.t += self.cost
        n, self.rest = divmod(self.rest + len(samples), 512)
        return np.ones(n, dtype=np.float32)  # all speech


def run_fake(decode_s, vad_s):
    clock = FakeClock()

    def decode(req):
        clock.t += decode_s
        return DecodeResult(req.request_id, (1, 2), (b" a", b" b"))

    # 1 s of audio in 100 ms blocks; a partial every 0.5 s of speech
    settings = SessionSettings(chunk=8000, segmenter=SegmenterSettings(min_speech=0))
    vad = FakeVad(clock, vad_s)
    return simulate(np.zeros(16000, np.float32), settings, decode, vad, 1600, clock)


def test_results_arrive_after_the_measured_compute_time():
    run = run_fake(decode_s=0.3, vad_s=0.01)
    # block k arrives at (k+1)/10 s and is fed 10 ms later; the frontier passes
    # 8000 samples (9216, a frame multiple) with block 5, fed at 0.61 s; the
    # final is asked for when the last block is fed (1.01 s)
    got = [(e.kind, e.end, e.time) for e in run.events]
    assert got == [
        ("partial", 0.576, pytest.approx(0.91)),
        ("final", 1.0, pytest.approx(1.31)),
    ]
    assert run.decode_s == pytest.approx(0.6) and run.vad_s == pytest.approx(0.1)
    assert (run.partial_requests, run.final_requests) == (1, 1)
    final_latency = metrics.final_latencies(run.events, run.clock)
    assert final_latency == pytest.approx([310.0])


def test_a_final_supersedes_the_stale_partial_on_a_busy_engine():
    run = run_fake(decode_s=0.7, vad_s=0.01)
    # partial issued at 0.61 would return at 1.31, but the segment closes at 1.01:
    # the final is sent then, the engine abandons the partial and the final runs
    # from 1.01 to 1.71; only the 0.4 s the partial really ran is charged
    assert [(e.kind, e.time) for e in run.events] == [("final", pytest.approx(1.71))]
    assert run.decode_s == pytest.approx(0.4 + 0.7)


def test_a_slow_vad_delays_feeding():
    run = run_fake(decode_s=0.3, vad_s=0.15)
    # the VAD falls behind: block k is fed at 0.1 + 0.15 (k + 1)
    assert [(e.kind, e.time) for e in run.events] == [
        ("partial", pytest.approx(1.3)),
        ("final", pytest.approx(1.9)),
    ]
    assert run.vad_s == pytest.approx(1.5)


def test_empty_audio_ends_without_events():
    clock = FakeClock()

    def decode(req):
        raise AssertionError("nothing to decode")

    run = simulate(np.zeros(0, np.float32), SessionSettings(), decode, None, 1600, clock)
    assert run.events == [] and run.decode_s == 0.0
