"""Metrics: drive the API, render, parse the exposition text back, check values."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, get_args

import pytest
from prometheus_client.parser import text_string_to_metric_families

from streamer.service.metrics import (
    CONTENT_TYPE,
    LATENCY_BUCKETS,
    REJECT_REASONS,
    EngineLike,
    FanoutLike,
    Metrics,
    RejectReason,
)
from streamer.sinks.fanout import Fanout
from streamer.types import EventKind, Hypothesis

if TYPE_CHECKING:  # mypy: the real classes satisfy the protocols
    from streamer.engine.core import Engine

    def _engine_fits(engine: Engine) -> EngineLike:
        return engine

    def _fanout_fits(fanout: Fanout) -> FanoutLike:
        return fanout


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(metrics: Metrics) -> tuple[Samples, dict[str, str]]:
    """Render and parse: ({(sample name, labels): value}, {family name: type})."""
    body, content_type = metrics.render()
    assert content_type == CONTENT_TYPE
    assert content_type.startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(body.decode()):
        types[family.name] = family.type
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = s.value
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def has(samples: Samples, name: str) -> bool:
    return any(key[0] == name for key in samples)


def hyp(
    kind: EventKind,
    seq: int,
    segment: int = 0,
    stream: str = "mic0",
    latency_ms: float | None = None,
) -> Hypothesis:
    text = f"{kind} {seq}"
    return Hypothesis(
        kind=kind,
        stream=stream,
        segment=segment,
        seq=seq,
        text=text,
        start=float(segment),
        end=float(segment) + 1.0,
        committed="" if kind == "partial" else text,
        tentative=text if kind == "partial" else "",
        lang="de",
        latency_ms=latency_ms,
    )


@dataclass
class FakeStats:
    requests: int = 0
    failed: int = 0
    busy_seconds: float = 0.0
    audio_seconds: float = 0.0


@dataclass
class FakeEngine:
    stats: FakeStats = field(default_factory=FakeStats)
    heartbeat: float = 100.0
    alive: bool = True
    cancelled_requests: int = 0


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_events_and_latency_histogram() -> None:
    m = Metrics(process_metrics=False)
    s, types = scrape(m)
    assert types["streamer_events"] == "counter"
    assert types["streamer_event_latency_seconds"] == "histogram"
    assert value(s, "streamer_events_total", type="partial") == 0
    assert value(s, "streamer_event_latency_seconds_count", type="final") == 0

    m.observe_event(hyp("partial", 1, latency_ms=180.0))
    m.observe_event(hyp("partial", 2, latency_ms=40.0))
    m.observe_event(hyp("partial", 3, latency_ms=None))  # counted, no latency
    m.observe_event(hyp("final", 4, latency_ms=2400.0))
    m.observe_event(hyp("final", 5, latency_ms=12_000.0))  # past the last bucket
    s, _ = scrape(m)

    assert value(s, "streamer_events_total", type="partial") == 3
    assert value(s, "streamer_events_total", type="final") == 2
    assert value(s, "streamer_event_latency_seconds_count", type="partial") == 2
    assert value(s, "streamer_event_latency_seconds_sum", type="partial") == pytest.approx(0.22)
    bucket = "streamer_event_latency_seconds_bucket"
    assert value(s, bucket, type="partial", le="0.05") == 1
    assert value(s, bucket, type="partial", le="0.1") == 1
    assert value(s, bucket, type="partial", le="0.2") == 2
    assert value(s, bucket, type="final", le="2.0") == 0
    assert value(s, bucket, type="final", le="3.0") == 1
    assert value(s, bucket, type="final", le="10.0") == 1
    assert value(s, bucket, type="final", le="+Inf") == 2
    les = sorted(
        float(dict(labels)["le"])
        for name, labels in s
        if name == bucket and dict(labels)["type"] == "final"
    )
    assert les == [*LATENCY_BUCKETS, math.inf]
    assert LATENCY_BUCKETS[0] == 0.05 and LATENCY_BUCKETS[-1] == 10.0


def test_connection_and_ingest_counters() -> None:
    m = Metrics(process_metrics=False)
    m.connection_rejected("captions", "auth")
    m.connection_rejected("captions", "auth")
    m.connection_rejected("stream", "limit")
    m.connection_rejected("metrics", "auth")
    m.client_stream_closed(1000)
    m.client_stream_closed(1000)
    m.client_stream_closed(1008)
    m.audio_received(0.5)
    m.audio_received(1.25)
    m.throttled(0.2)
    s, types = scrape(m)

    name = "streamer_rejected_connections_total"
    assert value(s, name, endpoint="captions", reason="auth") == 2
    assert value(s, name, endpoint="stream", reason="limit") == 1
    assert value(s, name, endpoint="metrics", reason="auth") == 1
    assert (name, frozenset({("endpoint", "stream"), ("reason", "auth")})) not in s
    assert value(s, "streamer_client_streams_closed_total", code="1000") == 2
    assert value(s, "streamer_client_streams_closed_total", code="1008") == 1
    assert value(s, "streamer_audio_received_seconds_total") == pytest.approx(1.75)
    assert value(s, "streamer_ingest_throttled_seconds_total") == pytest.approx(0.2)
    assert types["streamer_audio_received_seconds"] == "counter"
    # The per-child creation timestamps are left out of the exposition.
    assert not any(key[0].endswith("_created") for key in s)


def test_rejection_vocabulary_is_fixed() -> None:
    m = Metrics(process_metrics=False)
    assert set(REJECT_REASONS) >= {"auth", "origin", "limit", "bad_request", "protocol"}
    assert set(REJECT_REASONS) >= {"rate", "idle", "slow"}
    assert set(REJECT_REASONS) == set(get_args(RejectReason))  # documented = typed
    with pytest.raises(ValueError, match="unknown reason"):
        m.connection_rejected("captions", "teapot")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown endpoint"):
        m.connection_rejected("healthz", "auth")  # type: ignore[arg-type]
    s, _ = scrape(m)
    assert not has(s, "streamer_rejected_connections_total")
    with pytest.raises(ValueError):  # counters only go up
        m.audio_received(-1.0)


async def test_fanout_drops_and_slow_subscribers() -> None:
    fanout = Fanout()
    m = Metrics(fanout=fanout, process_metrics=False)

    def publish(event: Hypothesis) -> None:  # what the daemon wires up
        fanout.publish(event)
        m.observe_event(event)

    fast = fanout.subscribe(name="fast")
    slow = fanout.subscribe(kinds=["final"], max_finals=1, name="slow")
    s, _ = scrape(m)
    assert value(s, "streamer_subscribers") == 2
    assert value(s, "streamer_fanout_dropped_partials_total") == 0
    assert value(s, "streamer_fanout_slow_disconnects_total") == 0

    # Three undelivered partials of one stream: latest wins, two overwritten.
    for seq in (1, 2, 3):
        publish(hyp("partial", seq, latency_ms=100.0))
    s, _ = scrape(m)
    assert value(s, "streamer_fanout_dropped_partials_total") == 2

    # The final of segment 0 discards the pending partial (a third drop) and
    # fills the slow subscriber's one-final queue; the next final overflows it.
    publish(hyp("final", 4, segment=0, latency_ms=900.0))
    publish(hyp("final", 5, segment=1, latency_ms=800.0))
    assert slow.slow and slow.closed
    s, _ = scrape(m)
    assert value(s, "streamer_fanout_dropped_partials_total") == 3
    assert value(s, "streamer_fanout_slow_disconnects_total") == 1
    assert value(s, "streamer_subscribers") == 1
    assert value(s, "streamer_events_total", type="partial") == 3
    assert value(s, "streamer_events_total", type="final") == 2
    # The metrics are the fanout's own counts, read at scrape time.
    assert fanout.dropped_partials == fast.dropped_partials == 3
    assert fanout.disconnected_slow == 1
    assert [fast.get_nowait().seq for _ in range(2)] == [4, 5]

    # A caption-socket count, when bound, replaces the fanout-wide one.
    m.bind(subscribers=lambda: 7)
    s, _ = scrape(m)
    assert value(s, "streamer_subscribers") == 7
    assert value(s, "streamer_fanout_dropped_partials_total") == 3  # fanout still bound


def test_engine_values_follow_the_engine() -> None:
    clock = FakeClock(100.0)
    m = Metrics(clock=clock, process_metrics=False)
    s, _ = scrape(m)
    assert value(s, "streamer_engine_alive") == 0  # model still loading
    assert not has(s, "streamer_engine_requests_total")
    assert not has(s, "streamer_engine_real_time_factor")

    engine = FakeEngine(heartbeat=99.0)
    m.bind(engine=engine)
    s, types = scrape(m)
    assert value(s, "streamer_engine_alive") == 1
    assert value(s, "streamer_engine_requests_total") == 0
    assert value(s, "streamer_engine_real_time_factor") == 0  # no audio yet, no division
    assert value(s, "streamer_engine_heartbeat_age_seconds") == pytest.approx(1.0)
    assert types["streamer_engine_requests"] == "counter"
    assert types["streamer_engine_real_time_factor"] == "gauge"

    engine.stats.requests = 10
    engine.stats.failed = 2
    engine.stats.busy_seconds = 1.5
    engine.stats.audio_seconds = 6.0
    engine.cancelled_requests = 3
    engine.heartbeat = 101.0
    clock.now = 104.5
    s, _ = scrape(m)
    assert value(s, "streamer_engine_requests_total") == 10
    assert value(s, "streamer_engine_failed_requests_total") == 2
    assert value(s, "streamer_engine_busy_seconds_total") == pytest.approx(1.5)
    assert value(s, "streamer_engine_audio_seconds_total") == pytest.approx(6.0)
    assert value(s, "streamer_engine_cancelled_requests_total") == 3
    assert value(s, "streamer_engine_real_time_factor") == pytest.approx(0.25)
    assert value(s, "streamer_engine_heartbeat_age_seconds") == pytest.approx(3.5)

    engine.alive = False
    clock.now = 90.0  # a heartbeat "in the future" never gives a negative age
    s, _ = scrape(m)
    assert value(s, "streamer_engine_alive") == 0
    assert value(s, "streamer_engine_heartbeat_age_seconds") == 0


def test_streams_by_origin() -> None:
    counts = {"source": 2}
    m = Metrics(streams=lambda: counts, process_metrics=False)
    s, _ = scrape(m)
    assert value(s, "streamer_streams", origin="source") == 2
    assert value(s, "streamer_streams", origin="client") == 0  # always exported
    counts["client"] = 3
    counts["source"] = 1
    s, _ = scrape(m)
    assert value(s, "streamer_streams", origin="source") == 1
    assert value(s, "streamer_streams", origin="client") == 3
    assert value(s, "streamer_subscribers") == 0  # nothing bound: zero, not absent


def test_added_gauges_and_counters() -> None:
    m = Metrics(process_metrics=False)
    state = {"connected": True, "outbox": 4, "sent": 10}
    m.add_gauge(
        "streamer_mqtt_connected", "Broker connection up.", lambda: float(state["connected"])
    )
    m.add_gauge(
        "streamer_mqtt_outbox",
        "Finals waiting for the broker, by topic kind.",
        lambda: {("final",): state["outbox"], ("status",): 0},
        labels=("kind",),
    )
    m.add_counter("streamer_mqtt_published_total", "Messages published.", lambda: state["sent"])
    s, types = scrape(m)
    assert value(s, "streamer_mqtt_connected") == 1
    assert value(s, "streamer_mqtt_outbox", kind="final") == 4
    assert value(s, "streamer_mqtt_outbox", kind="status") == 0
    assert value(s, "streamer_mqtt_published_total") == 10
    assert types["streamer_mqtt_published"] == "counter"

    state.update(connected=False, outbox=9, sent=12)
    s, _ = scrape(m)
    assert value(s, "streamer_mqtt_connected") == 0
    assert value(s, "streamer_mqtt_outbox", kind="final") == 9
    assert value(s, "streamer_mqtt_published_total") == 12

    with pytest.raises(ValueError, match="already exported"):
        m.add_gauge("streamer_mqtt_connected", "again", lambda: 1.0)
    with pytest.raises(ValueError, match="already exported"):
        m.add_gauge("streamer_events_total", "clashes with a built-in counter", lambda: 1.0)
    with pytest.raises(ValueError, match="already exported"):
        m.add_counter("streamer_subscribers", "clashes with a built-in gauge", lambda: 1.0)
    with pytest.raises(ValueError, match="bad metric name"):
        m.add_gauge("mqtt connected", "space", lambda: 1.0)
    with pytest.raises(ValueError, match="bad label names"):
        m.add_gauge("streamer_x", "dup labels", lambda: {}, labels=("a", "a"))
    with pytest.raises(ValueError, match="built in"):
        m.remove("streamer_streams")

    m.remove("streamer_mqtt_published_total")
    m.remove("streamer_mqtt_connected")
    s, _ = scrape(m)
    assert not has(s, "streamer_mqtt_published_total")
    assert not has(s, "streamer_mqtt_connected")
    assert value(s, "streamer_mqtt_outbox", kind="final") == 9


def test_a_failing_source_is_skipped_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    m = Metrics(process_metrics=False)

    def broken() -> float:
        raise RuntimeError("sink gone")

    m.add_gauge("streamer_broken", "Always fails.", broken)
    m.add_gauge("streamer_wrong_shape", "A mapping without labels.", lambda: {("x",): 1.0})
    m.add_gauge("streamer_fine", "Still exported.", lambda: 5.0)
    s, _ = scrape(m)
    assert not has(s, "streamer_broken")
    assert not has(s, "streamer_wrong_shape")
    assert value(s, "streamer_fine") == 5
    assert value(s, "streamer_metrics_collect_errors_total") == 2
    assert "streamer_broken could not be read" in caplog.text
    s, _ = scrape(m)
    assert value(s, "streamer_metrics_collect_errors_total") == 4


def test_instances_do_not_share_values() -> None:
    a = Metrics()
    b = Metrics()
    a.observe_event(hyp("final", 1, latency_ms=500.0))
    a.connection_rejected("stream", "protocol")
    a.audio_received(2.0)
    a.add_gauge("streamer_extra", "Only on a.", lambda: 1.0)
    b.add_gauge("streamer_extra", "Same name on b is fine.", lambda: 2.0)
    b.bind(engine=FakeEngine(stats=FakeStats(requests=5)))
    sa, _ = scrape(a)
    sb, _ = scrape(b)
    assert value(sa, "streamer_events_total", type="final") == 1
    assert value(sb, "streamer_events_total", type="final") == 0
    assert value(sa, "streamer_audio_received_seconds_total") == 2
    assert value(sb, "streamer_audio_received_seconds_total") == 0
    assert has(sa, "streamer_rejected_connections_total")
    assert not has(sb, "streamer_rejected_connections_total")
    assert (value(sa, "streamer_extra"), value(sb, "streamer_extra")) == (1, 2)
    assert value(sa, "streamer_engine_alive") == 0
    assert value(sb, "streamer_engine_requests_total") == 5
    if sys.platform == "linux":  # process collector reads /proc
        assert value(sa, "process_open_fds") > 0
        assert value(sb, "process_resident_memory_bytes") > 0


def test_client_chosen_close_codes_cannot_mint_series() -> None:
    from streamer.service.metrics import Metrics

    m = Metrics(process_metrics=False)
    for code in (1000, 4000, 4001, 3999):
        m.client_stream_closed(code)
    text = m.render()[0].decode()
    assert 'streamer_client_streams_closed_total{code="1000"} 1.0' in text
    assert 'streamer_client_streams_closed_total{code="other"} 3.0' in text
    assert "4000" not in text
