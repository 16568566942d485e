"""The admission model: load from cumulative samples, the decision, its hysteresis."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamer.core.admission import (
    AdmissionGate,
    AdmissionLimits,
    Demand,
    Load,
    LoadTracker,
    assess,
)

LIMITS = AdmissionLimits(max_engine_load=0.9, max_lag_s=5.0, max_backlog_s=30.0, window_s=10.0)


def steady(
    tracker: LoadTracker, start: float, end: float, busy: float, streams: int, total: float = 0.0
) -> float:
    """Samples every 0.5 s of an engine busy ``busy`` of the time from ``start`` to
    ``end`` (``total`` busy seconds at ``start``); returns the busy seconds at ``end``."""
    t = start
    while True:
        tracker.add(t, total, streams)
        if t + 0.5 > end + 1e-9:
            return total
        t, total = t + 0.5, total + busy * 0.5


# ------------------------------------------------------------------ LoadTracker


def test_no_load_before_two_samples() -> None:
    tracker = LoadTracker(10.0)
    assert tracker.load() is None
    tracker.add(5.0, 1.0, 2)
    assert tracker.load() is None


def test_busy_fraction_and_mean_streams_over_the_window() -> None:
    tracker = LoadTracker(10.0)
    total = steady(tracker, 0.0, 30.0, busy=0.2, streams=1)  # long ago: forgotten
    assert total == pytest.approx(6.0)
    steady(tracker, 30.5, 60.0, busy=0.8, streams=3, total=total + 0.8 * 0.5)
    load = tracker.load()
    assert load is not None
    assert load.span == pytest.approx(10.0)
    assert load.busy == pytest.approx(0.8)
    assert load.streams == pytest.approx(3.0)
    assert load.stream_cost == pytest.approx(0.8 / 3)


def test_early_on_the_span_is_the_history_so_far() -> None:
    tracker = LoadTracker(10.0)
    tracker.add(0.0, 0.0, 0)
    tracker.add(1.0, 0.0, 2)  # two streams from t = 1
    tracker.add(3.0, 1.0, 2)
    load = tracker.load()
    assert load == Load(busy=pytest.approx(1 / 3), streams=pytest.approx(4 / 3), span=3.0)


def test_busy_fraction_is_clamped_to_one() -> None:
    tracker = LoadTracker(10.0)
    tracker.add(0.0, 0.0, 1)
    tracker.add(1.0, 1.5, 1)  # a long step ended just after the window began
    load = tracker.load()
    assert load is not None and load.busy == 1.0


def test_samples_stay_bounded_and_in_order() -> None:
    tracker = LoadTracker(10.0)
    for i in range(10_000):  # a burst of decisions, 1 ms apart, then a steady second a sample
        tracker.add(i / 1000, 0.0, 1)
    assert len(tracker) <= 10.0 / 0.1 + 2
    with pytest.raises(ValueError):
        tracker.add(1.0, 0.0, 1)


@given(
    st.lists(
        st.tuples(
            st.floats(0.0, 3.0),  # time since the previous sample
            st.floats(0.0, 1.0),  # busy fraction meanwhile
            st.integers(0, 20),  # streams from this sample on
        ),
        min_size=2,
        max_size=60,
    )
)
def test_load_equals_the_brute_force_figures(samples: list[tuple[float, float, int]]) -> None:
    """Merging and forgetting samples never changes the figures over the kept span."""
    tracker = LoadTracker(5.0)
    points: list[tuple[float, float, int]] = []  # (time, cumulative busy, streams)
    t = busy = 0.0
    for dt, fraction, streams in samples:
        t += dt
        busy += fraction * dt
        tracker.add(t, busy, streams)
        points.append((t, busy, streams))
    load = tracker.load()
    if load is None:
        assert t == points[0][0]  # no time passed
        return
    # The anchor is a sample at or before the window's start (or the first one).
    assert load.span >= min(5.0, t - points[0][0]) - 1e-9
    anchor = t - load.span
    busy_then = next(b for time, b, _ in points if time == pytest.approx(anchor, abs=1e-9))
    stream_seconds = sum(
        a[2] * (b[0] - a[0]) for a, b in itertools.pairwise(points) if a[0] >= anchor - 1e-9
    )
    assert load.busy == pytest.approx(min(1.0, (busy - busy_then) / load.span), abs=1e-6)
    assert load.streams == pytest.approx(stream_seconds / load.span, abs=1e-6)
    assert 0.0 <= load.busy <= 1.0


# ------------------------------------------------------------------ assess


def test_zero_streams_are_always_admitted() -> None:
    load = Load(busy=1.0, streams=4.0, span=10.0)
    demand = Demand(0, lags={"gone": 60.0}, backlogs={"gone": 99.0})
    assert assess(load, 0.9, demand, LIMITS) is None


def test_a_stream_lagging_means_saturated() -> None:
    reason = assess(None, None, Demand(2, lags={"a": 0.3, "b": 6.24}), LIMITS)
    assert reason == "engine saturated: stream b lag 6.2 s (limit 5 s)"
    assert assess(None, None, Demand(2, lags={"a": 0.3, "b": 4.9}), LIMITS) is None


def test_a_stream_held_back_means_saturated() -> None:
    reason = assess(None, None, Demand(1, backlogs={"mic": 31.0}), LIMITS)
    assert reason is not None and "stream mic has 31.0 s of audio waiting for finals" in reason


def test_a_busy_engine_means_saturated() -> None:
    reason = assess(Load(0.97, 2.0, 10.0), 0.3, Demand(2), LIMITS)
    assert reason == "engine saturated: busy 97% over the last 10 s with 2 streams"


def test_linear_projection_of_the_measured_cost() -> None:
    # A CPU serving Whisper base: about 45 % per stream.
    one = Load(busy=0.45, streams=1.0, span=10.0)
    assert assess(one, 0.45, Demand(1), LIMITS) is None  # two streams: 90 %, the limit
    two = Load(busy=0.9 * 0.95, streams=2.0, span=10.0)
    reason = assess(two, 0.9 * 0.95 / 2, Demand(2), LIMITS)
    assert reason is not None
    assert reason.startswith("engine saturated: one more stream would need 128% of the engine")
    # A GPU batching many streams almost for free: 2 % each.
    gpu = Load(busy=0.4, streams=20.0, span=10.0)
    assert assess(gpu, 0.02, Demand(20), LIMITS) is None
    assert assess(gpu, 0.02, Demand(44), LIMITS) is None  # 45 x 2 % = 90 %: still in
    assert assess(gpu, 0.02, Demand(45), LIMITS) is not None  # 46 x 2 % > 90 %


def test_streams_younger_than_the_window_count_at_the_measured_cost() -> None:
    # One stream measured at 30 %; three more just joined and show no load yet.
    load = Load(busy=0.3, streams=1.0, span=10.0)
    assert assess(load, 0.3, Demand(2), LIMITS) is None  # 3 x 30 %
    assert assess(load, 0.3, Demand(3), LIMITS) is not None  # 4 x 30 % > 90 %


def test_before_any_cost_is_measured_only_warmup_streams_get_in() -> None:
    limits = AdmissionLimits(warmup_streams=4)
    assert assess(None, None, Demand(3), limits) is None
    reason = assess(Load(0.05, 0.1, 1.0), None, Demand(4), limits)
    assert reason == "engine load not measured yet: 4 streams started (at most 4 until it is)"


def test_recovering_uses_tighter_thresholds() -> None:
    load = Load(busy=0.85, streams=2.0, span=10.0)
    assert assess(load, 0.3, Demand(2), LIMITS) is None
    assert assess(load, 0.3, Demand(2), LIMITS, recovering=True) is not None
    lagging = Demand(1, lags={"a": 3.0})
    assert assess(None, 0.1, lagging, LIMITS) is None
    assert assess(None, 0.1, lagging, LIMITS, recovering=True) is not None


# ------------------------------------------------------------------ AdmissionGate


def test_gate_a_burst_on_a_measured_engine_stops_where_the_projection_says() -> None:
    gate = AdmissionGate(LIMITS)
    t, busy = 0.0, 0.0
    while t < 20.0:  # one stream, 25 % busy, for 20 s
        gate.update(t, busy, Demand(1))
        t, busy = t + 0.5, busy + 0.25 * 0.5
    admitted = 1
    for _ in range(10):  # ten clients at once: each decision counts the ones let in
        if gate.update(t, busy, Demand(admitted)) is None:
            admitted += 1
    assert admitted == 3  # 3 x 25 % = 75 %, a fourth would need 100 %
    assert gate.saturated and gate.reason is not None and "100%" in gate.reason


def test_gate_burst_on_a_fresh_daemon_admits_warmup_streams() -> None:
    gate = AdmissionGate(AdmissionLimits(warmup_streams=4))
    admitted = 0
    for _ in range(50):
        if gate.update(0.0, 0.0, Demand(admitted)) is None:
            admitted += 1
    assert admitted == 4
    assert gate.reason is not None and "not measured yet" in gate.reason


def test_gate_does_not_flap_and_recovers_after_recover_s() -> None:
    limits = AdmissionLimits(max_engine_load=0.9, window_s=2.0, recover_s=1.0)
    gate = AdmissionGate(limits)
    t, busy, states = 0.0, 0.0, []
    for i in range(80):  # busy around the threshold: 0.86 .. 0.94
        fraction = 0.9 + (0.04 if i % 2 else -0.04)
        t, busy = t + 0.25, busy + fraction * 0.25
        states.append(gate.update(t, busy, Demand(3)) is not None)
    assert states[-40:] == [True] * 40  # refusing, steadily
    recovered_at = None
    for _ in range(80):  # one stream left, the load falls to 30 %
        t, busy = t + 0.25, busy + 0.3 * 0.25
        if gate.update(t, busy, Demand(1)) is None and recovered_at is None:
            recovered_at = t
        if recovered_at is not None:
            assert gate.reason is None
    assert recovered_at is not None
    # clear once the 2 s window forgot the peak, then held for recover_s
    assert recovered_at - 20.0 >= limits.recover_s


def test_gate_no_streams_recovers_at_once_and_keeps_the_cost() -> None:
    gate = AdmissionGate(LIMITS)
    t, busy = 0.0, 0.0
    while t < 12.0:
        gate.update(t, busy, Demand(2, lags={"a": 7.0}))
        t, busy = t + 0.5, busy + 0.5
    assert gate.saturated and "lag" in (gate.reason or "")
    assert gate.cost == pytest.approx(0.5)
    assert gate.update(t, busy, Demand(0)) is None  # the streams ended
    t += 60.0  # idle a minute: the measured cost is kept
    assert gate.update(t, busy, Demand(0)) is None
    assert gate.cost == pytest.approx(0.5)
    assert gate.update(t, busy, Demand(1)) is not None  # 2 x 50 % > 90 %
