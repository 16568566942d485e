"""Admission: would one more stream still be served in real time?

Pure: no clock, no I/O, no torch. The adapter passes in the time (seconds on
any monotonic clock), the engine's cumulative busy seconds, and what is live
now (streams, each one's engine lag and finals backlog); this module answers
with ``None`` (admit) or a one-line human reason (refuse, HTTP 503).

The model, from what can be measured:

- **Load.** :class:`LoadTracker` turns (time, cumulative busy seconds, live
  streams) samples into the engine's busy fraction over the last
  ``window_s`` seconds and the mean number of live streams over the same
  span. Both are differences of cumulative series, so any subset of samples
  gives exact figures (samples closer than ``MIN_SAMPLE_GAP_S`` are merged).
- **Cost of a stream.** busy fraction / mean streams, once the window holds at
  least ``min_measured_s`` stream-seconds; the last measured value is kept
  while the daemon is idle. It is an average over whatever the streams did
  (silent streams cost little), and the busy fraction saturates at 1, so a
  saturated engine under-reads it; the load rule below catches that case.
- **Projection.** One more stream would load the engine to
  ``cost x (streams + 1)``. With a steady set of streams that is
  ``busy x (n + 1) / n``: linear, hence conservative, because batching makes
  the real per-stream cost sublinear (on a GPU many streams batch almost for
  free; there the measured cost is small and many streams are admitted).
  Streams younger than the window count at the measured cost, so a burst of
  newcomers is projected before their load shows.
- **Already saturated.** A stream whose oldest decode request waited more
  than ``max_lag_s`` (the engine is behind now), a stream with more than
  ``max_backlog_s`` of audio waiting for finals (its input is held back), or
  a busy fraction at ``max_engine_load`` refuse at once.
- **Warm-up.** Until a cost was measured (a fresh daemon, or the first
  seconds of its first streams), at most ``warmup_streams`` streams are
  admitted: a burst of clients on an idle daemon no longer all get in before
  the engine's load says anything.
- **No streams, always admit.** An idle engine serves one stream whatever
  was measured before.

:class:`AdmissionGate` adds hysteresis, so a probe (``/readyz``) does not
flap: once refusing, it admits again only after the figures are clear of
tighter thresholds (load ``LOAD_MARGIN`` lower, lag x ``LAG_RECOVER``,
backlog x ``BACKLOG_RECOVER``) for ``recover_s`` seconds, or at once when no
stream is live.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = [
    "AdmissionGate",
    "AdmissionLimits",
    "Demand",
    "Load",
    "LoadTracker",
    "assess",
]

#: Samples closer than this are merged (the tracker's size stays bounded).
MIN_SAMPLE_GAP_S = 0.1
#: Hysteresis: while refusing, admit again only below these tighter thresholds.
LOAD_MARGIN = 0.1  # busy fraction (absolute)
LAG_RECOVER = 0.5  # x max_lag_s
BACKLOG_RECOVER = 0.8  # x max_backlog_s


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    """Thresholds (``[admission]`` and ``streaming.max_backlog_s``)."""

    max_engine_load: float = 0.9  # busy fraction one more stream may bring the engine to
    max_lag_s: float = 5.0  # a stream's decode request waiting longer: saturated
    max_backlog_s: float = 30.0  # a stream's audio waiting for finals beyond: saturated
    window_s: float = 10.0  # the load is measured over this many recent seconds
    warmup_streams: int = 4  # streams admitted before any per-stream cost was measured
    min_measured_s: float = 2.0  # stream-seconds in the window before the cost counts
    recover_s: float = 1.0  # figures clear this long before admitting again


@dataclass(frozen=True, slots=True)
class Load:
    """The engine over the last ``span`` seconds (at most the window)."""

    busy: float  # fraction of the span the engine was busy, 0..1
    streams: float  # mean number of live streams over the span
    span: float  # seconds

    @property
    def stream_seconds(self) -> float:
        return self.streams * self.span

    @property
    def stream_cost(self) -> float | None:
        """Busy fraction per live stream; None when nothing streamed in the span."""
        return self.busy / self.streams if self.streams > 0 else None


@dataclass(frozen=True, slots=True)
class Demand:
    """What is live now: streams (clients still in their handshake included),
    each stream's engine lag and finals backlog, in seconds."""

    streams: int
    lags: Mapping[str, float] = field(default_factory=dict)
    backlogs: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Sample:
    time: float
    busy: float  # cumulative busy seconds
    stream_seconds: float  # cumulative integral of live streams over time
    streams: int  # live streams from this sample on


class LoadTracker:
    """The engine's busy fraction and mean live streams over a recent window."""

    def __init__(self, window_s: float = 10.0) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be > 0")
        self.window_s = window_s
        self._samples: deque[_Sample] = deque()

    def __len__(self) -> int:
        return len(self._samples)

    def add(self, now: float, busy_seconds: float, streams: int) -> None:
        """Record the engine's cumulative busy seconds and the live streams at ``now``."""
        samples = self._samples
        if samples and now < samples[-1].time:
            raise ValueError("samples must come in time order")
        integral = 0.0
        if samples:
            last = samples[-1]
            integral = last.stream_seconds + last.streams * (now - last.time)
        sample = _Sample(now, busy_seconds, integral, streams)
        # Cumulative series: dropping a sample between two others loses nothing.
        close = len(samples) >= 2 and now - samples[-2].time < MIN_SAMPLE_GAP_S
        if samples and (close or now == samples[-1].time):
            samples[-1] = sample
        else:
            samples.append(sample)
        # Keep one sample at or before the window's start (the anchor), none older.
        start = now - self.window_s
        while len(samples) >= 2 and samples[1].time <= start:
            samples.popleft()

    def load(self) -> Load | None:
        """The load over the window (or the history so far); None before two samples."""
        samples = self._samples
        if len(samples) < 2:
            return None
        first, last = samples[0], samples[-1]
        span = last.time - first.time
        if span <= 0:
            return None
        busy = min(1.0, max(0.0, (last.busy - first.busy) / span))
        streams = max(0.0, (last.stream_seconds - first.stream_seconds) / span)
        return Load(busy, streams, span)


def _worst(values: Mapping[str, float]) -> tuple[str, float] | None:
    if not values:
        return None
    name = max(values, key=lambda k: values[k])
    return name, values[name]


def _streams(n: int) -> str:
    return f"{n} stream" if n == 1 else f"{n} streams"


def assess(
    load: Load | None,
    cost: float | None,
    demand: Demand,
    limits: AdmissionLimits,
    *,
    recovering: bool = False,
) -> str | None:
    """Why one more stream would not be served in real time (None: admit it).

    ``cost`` is the measured busy fraction per stream (None: not measured
    yet). ``recovering`` applies the tighter thresholds of the hysteresis.
    """
    n = demand.streams
    if n <= 0:
        return None
    max_load = limits.max_engine_load - (LOAD_MARGIN if recovering else 0.0)
    max_lag = limits.max_lag_s * (LAG_RECOVER if recovering else 1.0)
    max_backlog = limits.max_backlog_s * (BACKLOG_RECOVER if recovering else 1.0)
    lag = _worst(demand.lags)
    if lag is not None and lag[1] > max_lag:
        return f"engine saturated: stream {lag[0]} lag {lag[1]:.1f} s (limit {max_lag:g} s)"
    backlog = _worst(demand.backlogs)
    if backlog is not None and backlog[1] > max_backlog:
        return (
            f"engine saturated: stream {backlog[0]} has {backlog[1]:.1f} s of audio "
            f"waiting for finals (limit {max_backlog:g} s)"
        )
    if load is not None and load.busy >= max_load:
        return (
            f"engine saturated: busy {load.busy:.0%} over the last {load.span:.0f} s "
            f"with {_streams(n)}"
        )
    if cost is None:
        if n >= limits.warmup_streams:
            return (
                f"engine load not measured yet: {_streams(n)} started "
                f"(at most {limits.warmup_streams} until it is)"
            )
        return None
    projected = cost * (n + 1)
    if projected > max_load:
        busy = f"busy {load.busy:.0%} over the last {load.span:.0f} s, " if load else ""
        return (
            f"engine saturated: one more stream would need {projected:.0%} of the engine "
            f"({busy}{_streams(n)}, limit {max_load:.0%})"
        )
    return None


class AdmissionGate:
    """:func:`assess` over a :class:`LoadTracker`, with hysteresis.

    Call :meth:`update` periodically (so the window stays sampled) and on
    every decision (so a burst of clients is counted as it arrives).
    """

    def __init__(self, limits: AdmissionLimits) -> None:
        self.limits = limits
        self.tracker = LoadTracker(limits.window_s)
        self.cost: float | None = None  # last measured busy fraction per stream
        self.load: Load | None = None
        self.reason: str | None = None  # why new streams are refused now
        self._clear_since: float | None = None

    @property
    def saturated(self) -> bool:
        return self.reason is not None

    def update(self, now: float, busy_seconds: float, demand: Demand) -> str | None:
        """Take a sample; return why a new stream is refused now (None: admit)."""
        self.tracker.add(now, busy_seconds, demand.streams)
        load = self.load = self.tracker.load()
        if load is not None and load.stream_seconds >= self.limits.min_measured_s:
            self.cost = load.stream_cost
        if demand.streams <= 0:  # an idle engine serves one stream
            self.reason = self._clear_since = None
            return None
        if self.reason is None:
            self.reason = assess(load, self.cost, demand, self.limits)
            return self.reason
        still = assess(load, self.cost, demand, self.limits, recovering=True)
        if still is not None:
            self.reason, self._clear_since = still, None
        elif self._clear_since is None:
            self._clear_since = now
        elif now - self._clear_since >= self.limits.recover_s:
            self.reason = self._clear_since = None
        return self.reason
