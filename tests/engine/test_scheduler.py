"""The engine's step policy, without a model."""

import numpy as np
import pytest

from streamer.core.session import DecodeRequest
from streamer.engine.scheduler import Scheduler, SchedulerLimits


def req(stream, rid, kind="partial", seconds=1.0, supersedes=None, forced=0):
    audio = np.zeros(int(seconds * 16000), dtype=np.float32)
    return DecodeRequest(stream, rid, kind, 0, audio, 0, len(audio), (), (1,) * forced, 8,
                         supersedes=supersedes)  # fmt: skip


def ids(jobs):
    return [(j.req.stream, j.req.request_id) for j in jobs]


def test_one_running_per_stream_finals_first_then_oldest():
    s = Scheduler(SchedulerLimits(max_running=8))
    s.submit(req("a", 0), 0.0)
    s.submit(req("a", 1, "final"), 0.1)
    s.submit(req("b", 0), 0.2)
    s.submit(req("c", 0, "final"), 0.3)
    plan = s.plan()
    assert ids(plan.admit) == [("c", 0), ("a", 0), ("b", 0)]
    assert plan.decode == ()
    plan = s.plan()  # a's final waits behind its running partial
    assert ids(plan.admit) == [] and len(plan.decode) == 3
    s.finish(next(j for j in plan.decode if j.req.stream == "a"))
    assert ids(s.plan().admit) == [("a", 1)]


def test_newer_partial_replaces_a_waiting_one_finals_never():
    s = Scheduler()
    s.submit(req("a", 0), 0.0)
    s.plan()  # a/0 runs
    s.submit(req("a", 1), 1.0)
    s.submit(req("a", 2), 2.0)  # replaces a/1
    s.submit(req("a", 3, "final"), 3.0)
    s.submit(req("a", 4), 4.0)  # behind a final: nothing to replace
    plan = s.plan()
    assert ids(plan.cancelled) == [("a", 1)]
    assert s.superseded == 1 and s.waiting == 3


def test_supersedes_cancels_waiting_at_once_and_running_next_step():
    s = Scheduler()
    s.submit(req("a", 0), 0.0)
    running = s.plan().admit[0]
    s.submit(req("a", 1, "final", supersedes=0), 1.0)
    assert running.cancelled
    plan = s.plan()
    assert ids(plan.cancelled) == [("a", 0)] and ids(plan.admit) == [("a", 1)]
    s.submit(req("b", 0), 2.0)
    s.submit(req("b", 1, supersedes=0), 2.0)  # b/0 was still waiting
    plan = s.plan()
    assert ids(plan.cancelled) == [("b", 0)]


def test_budgets_limit_admission_but_an_idle_engine_takes_one_window():
    limits = SchedulerLimits(max_running=3, max_admit=2, max_admit_samples=48000,
                             max_prefill_tokens=100)  # fmt: skip
    s = Scheduler(limits)
    for i, stream in enumerate("abcdef"):
        s.submit(req(stream, 0, seconds=2.0), float(i))
    plan = s.plan()
    assert ids(plan.admit) == [("a", 0)]  # 2 s + 2 s > 3 s of audio budget
    plan = s.plan()
    assert ids(plan.admit) == [("b", 0)]
    assert len(s.plan().admit) == 1 and len(s.running) == 3
    assert s.plan().admit == ()  # max_running reached
    big = Scheduler(SchedulerLimits(max_admit_samples=16000))
    big.submit(req("x", 0, seconds=10.0), 0.0)
    assert ids(big.plan().admit) == [("x", 0)]  # oversized, but the engine is idle


def test_lag_is_the_age_of_the_oldest_unfinished_request():
    s = Scheduler()
    s.submit(req("a", 0), 10.0)
    s.plan()
    s.submit(req("a", 1, "final"), 11.0)
    s.submit(req("b", 0), 12.0)
    assert s.lag(15.0) == {"a": 5.0, "b": 3.0}
    assert not s.idle


def test_limits_are_validated():
    with pytest.raises(ValueError):
        SchedulerLimits(max_running=0)


def bulk(stream, rid, kind="partial", seconds=1.0):
    r = req(stream, rid, kind, seconds)
    import dataclasses

    return dataclasses.replace(r, bulk=True)


def test_live_windows_go_first_and_alone():
    s = Scheduler(SchedulerLimits(max_running=16, max_admit=8))
    for n in range(4):
        s.submit(bulk(f"big{n}", 0, "final", seconds=15.0), 0.0)  # older, and finals
    s.submit(req("live", 0), 1.0)
    plan = s.plan(1.0)
    assert ids(plan.admit) == [("live", 0)]  # no bulk window batched with it
    # while it decodes, every step is one token: no bulk encoder pass beside it
    assert s.plan(1.1).admit == () and s.plan(1.2).admit == ()
    s.finish(plan.admit[0])
    # the live stream was heard lately: bulk windows join one per step
    assert ids(s.plan(1.3).admit) == [("big0", 0)]
    s.submit(req("live", 1), 1.35)  # the live stream's next chunk comes first again
    assert ids(s.plan(1.4).admit) == [("live", 1)]


def test_bulk_windows_batch_freely_once_no_live_stream_is_heard():
    s = Scheduler(SchedulerLimits(max_running=16, max_admit=8))
    s.submit(req("live", 0), 0.0)
    s.finish(s.plan(0.0).admit[0])
    for n in range(4):
        s.submit(bulk(f"big{n}", 0), 1.0)
    assert len(s.plan(2.0).admit) == 1  # live heard 2 s ago: its next chunk is near
    assert len(s.plan(10.0).admit) == 3  # long quiet: the rest batch together
    t = Scheduler(SchedulerLimits(max_running=16, max_admit=8))
    for n in range(4):  # only bulk streams (streamer transcribe): as before
        t.submit(bulk(f"f{n}", 0), 0.0)
    assert len(t.plan(0.0).admit) == 4
