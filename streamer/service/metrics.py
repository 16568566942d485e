"""Prometheus metrics of one daemon, served on ``GET /metrics``.

Two kinds of figures:

- **Events the daemon reports** (``observe_event``, ``connection_rejected``,
  ...) update ordinary prometheus_client counters and a histogram.
- **State read at scrape time** (streams, subscribers, engine and fanout
  counts, gauges that sinks register with :meth:`Metrics.add_gauge`) comes from
  callables and objects bound at construction or with :meth:`Metrics.bind`; a
  custom collector reads them on each scrape, so nothing the daemon forgets to
  update can go stale.

Every :class:`Metrics` owns its own ``CollectorRegistry`` (never the global
one), so several daemons or tests in one process do not share values.

This module must not import torch: the engine is read through the small
:class:`EngineLike` protocol (``streamer.engine.core.Engine`` satisfies it).
Call :meth:`Metrics.render` on the event loop thread: the fanout and the
stream-count callables belong to the loop. Engine figures are plain attribute
reads of numbers the engine thread updates; a scrape may see one request's
busy time before its audio seconds, which is harmless.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal, Protocol, get_args

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.process_collector import ProcessCollector

from streamer.types import Hypothesis

__all__ = [
    "CONTENT_TYPE",
    "ENDPOINTS",
    "LATENCY_BUCKETS",
    "ORIGINS",
    "REJECT_REASONS",
    "Endpoint",
    "EngineLike",
    "EngineStatsLike",
    "FanoutLike",
    "Metrics",
    "RejectReason",
    "ValueFn",
]

log = logging.getLogger(__name__)

#: Content type of :meth:`Metrics.render` (Prometheus text format 0.0.4,
#: which is what ``generate_latest`` writes).
CONTENT_TYPE: Final = CONTENT_TYPE_PLAIN_0_0_4

#: Event latency buckets in seconds: partials land around 0.1–1 s, finals
#: include the endpointing silence (0.5–3 s); past 10 s something is wrong.
LATENCY_BUCKETS: Final = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0)

Endpoint = Literal["captions", "stream", "metrics", "realtime", "wyoming"]
#: Values of the ``endpoint`` label: ``/v1/captions``, ``/v1/stream``, ``/metrics``,
#: ``/v1/realtime`` (OpenAI Realtime) and the Wyoming server.
ENDPOINTS: Final[frozenset[str]] = frozenset(get_args(Endpoint))

RejectReason = Literal[
    "auth", "origin", "limit", "saturated", "bad_request", "protocol", "rate", "idle", "slow",
    "shutdown",
]  # fmt: skip
#: Values of the ``reason`` label of ``streamer_rejected_connections_total``:
#: a connection refused before the upgrade (HTTP status) or closed by the
#: server for the client's fault (WebSocket close code).
REJECT_REASONS: Final[Mapping[str, str]] = {
    "auth": "missing or bad token: HTTP 401, or 1008 on a bad/late auth message",
    "origin": "Origin not in allowed_origins: HTTP 403",
    "limit": "too many streams or subscribers: HTTP 503 or close 1013",
    "saturated": "engine saturated (admission): HTTP 503 or close 1013, with the reason",
    "bad_request": "bad query (HTTP 400) or bad start message (1007/1008: bad JSON, "
    "unknown field, bad value, option not allowed, stream id in use)",
    "protocol": "bad traffic after start: binary before start or text where audio "
    "is expected (1003), bad PCM frame length or non-finite samples (1007), "
    "frame over max_frame_bytes (1009)",
    "rate": "client sends audio faster than real time beyond the allowed burst",
    "idle": "idle timeout (1008)",
    "slow": "slow caption subscriber, final queue full (1013)",
    "shutdown": "refused while shutting down: HTTP 503",
}

#: Values of the ``origin`` label of ``streamer_streams``: configured sources
#: (microphone, file) and clients streaming over ``/v1/stream``. Both are
#: always exported (0 when absent) so the series never vanish.
ORIGINS: Final = ("source", "client")

#: A scrape-time callable: a number without labels, or a mapping from label
#: value tuples (in the order of ``labels``) to numbers; None leaves the
#: family out of this scrape (e.g. no engine yet).
ValueFn = Callable[[], "float | Mapping[tuple[str, ...], float] | None"]
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


class EngineStatsLike(Protocol):
    """What the metrics read of ``streamer.engine.core.EngineStats``."""

    @property
    def requests(self) -> int: ...
    @property
    def failed(self) -> int: ...
    @property
    def busy_seconds(self) -> float: ...
    @property
    def audio_seconds(self) -> float: ...


class EngineLike(Protocol):
    """What the metrics read of ``streamer.engine.core.Engine``.

    ``heartbeat`` is a ``time.monotonic()`` value, compared with the clock
    given to :class:`Metrics`.
    """

    @property
    def stats(self) -> EngineStatsLike: ...
    @property
    def heartbeat(self) -> float: ...
    @property
    def alive(self) -> bool: ...
    @property
    def cancelled_requests(self) -> int: ...


class FanoutLike(Protocol):
    """What the metrics read of ``streamer.sinks.fanout.Fanout`` (fanout-wide totals)."""

    @property
    def subscribers(self) -> int: ...
    @property
    def dropped_partials(self) -> int: ...
    @property
    def disconnected_slow(self) -> int: ...


@dataclass(frozen=True, slots=True)
class _Source:
    """A metric family registered with :meth:`Metrics.add_gauge` / ``add_counter``."""

    name: str
    documentation: str
    fn: ValueFn
    labels: tuple[str, ...]
    counter: bool

    def family(self) -> Metric | None:
        """Read ``fn`` and build the family; None when it has nothing to say now."""
        value = self.fn()
        if value is None:
            return None
        samples: list[tuple[list[str], float]] = []
        if isinstance(value, Mapping):
            if not self.labels:
                raise TypeError(f"{self.name}: a mapping needs labels")
            for key, number in value.items():
                if len(key) != len(self.labels):
                    raise ValueError(f"{self.name}: label values {key!r} for {self.labels!r}")
                samples.append(([str(k) for k in key], float(number)))
        else:
            if self.labels:
                raise TypeError(f"{self.name}: labels {self.labels!r} need a mapping")
            samples.append(([], float(value)))
        if self.counter:
            counter = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
            for labels, number in samples:
                counter.add_metric(labels, number)
            return counter
        gauge = GaugeMetricFamily(self.name, self.documentation, labels=self.labels)
        for labels, number in samples:
            gauge.add_metric(labels, number)
        return gauge


class _ScrapeCollector:
    """Reads the bound sources on every scrape; one failing source is skipped."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        for source in tuple(self._m._sources.values()):
            try:
                family = source.family()
            except Exception:  # a broken callable must not fail the whole scrape
                self._m._collect_errors += 1
                log.exception("metric %s could not be read", source.name)
                continue
            if family is not None:
                yield family
        yield CounterMetricFamily(
            "streamer_metrics_collect_errors_total",
            "Metric sources that raised while being read at scrape time.",
            value=self._m._collect_errors,
        )


class _WithoutCreated:
    """The registry minus the ``*_created`` samples of counters and histograms.

    In text format 0.0.4 they become one extra gauge series per counter child
    (the child's creation time), which nobody here reads; the global switch
    (``disable_created_metrics``) would affect every registry in the process.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for metric in self._registry.collect():
            created = metric.name + "_created"
            if not any(sample.name == created for sample in metric.samples):
                yield metric
                continue
            copy = Metric(metric.name, metric.documentation, metric.type, metric.unit)
            copy.samples = [sample for sample in metric.samples if sample.name != created]
            yield copy


#: WebSocket close codes counted by name; anything else is "other".
KNOWN_CLOSE_CODES = frozenset({1000, 1001, 1002, 1003, 1005, 1006, 1007, 1008, 1009, 1011, 1013})


class Metrics:
    """All metrics of one daemon, in a registry of its own.

    ``engine``, ``fanout``, ``streams`` and ``subscribers`` may be given here or
    later with :meth:`bind` (the engine exists only once the model has
    loaded; until then ``streamer_engine_alive`` is 0 and the other engine
    series are absent). ``streams`` returns active stream counts by origin
    (see :data:`ORIGINS`); ``subscribers`` returns open ``/v1/captions``
    connections (``CaptionServer.subscribers``); without it, ``Fanout.subscribers``
    is used, which also counts internal sinks (console, JSONL, MQTT).
    ``clock`` must be the clock of ``Engine.heartbeat`` (monotonic).
    """

    def __init__(
        self,
        *,
        engine: EngineLike | None = None,
        fanout: FanoutLike | None = None,
        streams: Callable[[], Mapping[str, int]] | None = None,
        subscribers: Callable[[], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
        process_metrics: bool = True,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._clock = clock
        self._engine: EngineLike | None = None
        self._fanout: FanoutLike | None = None
        self._streams: Callable[[], Mapping[str, int]] | None = None
        self._subscribers: Callable[[], int] | None = None
        self._sources: dict[str, _Source] = {}
        self._collect_errors = 0

        self._events = Counter(
            "streamer_events",
            "Caption events published, by type (partial, final).",
            ["type"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "streamer_event_latency_seconds",
            "Wall time from the arrival of the newest audio an event covers to its "
            "publication, by type.",
            ["type"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        for kind in ("partial", "final"):  # export zeros before the first event
            self._events.labels(kind)
            self._latency.labels(kind)
        self._rejected = Counter(
            "streamer_rejected_connections",
            "Connections refused or closed for the client's fault, by endpoint "
            "(captions, stream, metrics, realtime, wyoming) and reason (auth, origin, limit, "
            "bad_request, protocol, rate, idle, slow, shutdown).",
            ["endpoint", "reason"],
            registry=self.registry,
        )
        self._closed = Counter(
            "streamer_client_streams_closed",
            "Client audio streams (/v1/stream, /v1/realtime) closed, by WebSocket close code.",
            ["code"],
            registry=self.registry,
        )
        self._audio = Counter(
            "streamer_audio_received_seconds",
            "Seconds of audio received from all sources and clients.",
            registry=self.registry,
        )
        self._throttled = Counter(
            "streamer_ingest_throttled_seconds",
            "Seconds client ingest was held back for sending faster than real time.",
            registry=self.registry,
        )
        self._builtin_names = {
            "streamer_events",
            "streamer_event_latency_seconds",
            "streamer_rejected_connections",
            "streamer_client_streams_closed",
            "streamer_audio_received_seconds",
            "streamer_ingest_throttled_seconds",
            "streamer_metrics_collect_errors",
        }
        self._add_builtin_sources()
        self.bind(engine=engine, fanout=fanout, streams=streams, subscribers=subscribers)
        self.registry.register(_ScrapeCollector(self))
        if process_metrics:  # RSS, open files, CPU: what soak runs watch
            ProcessCollector(registry=self.registry)

    # -- binding scrape-time sources ---------------------------------------------

    def bind(
        self,
        *,
        engine: EngineLike | None = None,
        fanout: FanoutLike | None = None,
        streams: Callable[[], Mapping[str, int]] | None = None,
        subscribers: Callable[[], int] | None = None,
    ) -> None:
        """Attach the objects read at scrape time; arguments left None stay as they were."""
        if engine is not None:
            self._engine = engine
        if fanout is not None:
            self._fanout = fanout
        if streams is not None:
            self._streams = streams
        if subscribers is not None:
            self._subscribers = subscribers

    def add_gauge(
        self, name: str, documentation: str, fn: ValueFn, labels: Sequence[str] = ()
    ) -> None:
        """Export ``fn()`` as a gauge read on every scrape (e.g. MQTT connected, outbox size).

        Without ``labels``, ``fn`` returns a number; with them, a mapping from
        label-value tuples to numbers. Raises ValueError for a name in use.
        """
        self._add(_Source(name, documentation, fn, tuple(labels), counter=False))

    def add_counter(
        self, name: str, documentation: str, fn: ValueFn, labels: Sequence[str] = ()
    ) -> None:
        """Like :meth:`add_gauge` for a total kept elsewhere (``_total`` is appended)."""
        name = name.removesuffix("_total")
        self._add(_Source(name, documentation, fn, tuple(labels), counter=True))

    def remove(self, name: str) -> None:
        """Stop exporting a family added with :meth:`add_gauge` / :meth:`add_counter`."""
        name = name.removesuffix("_total")
        if name in self._builtin_names:
            raise ValueError(f"metric {name!r} is built in")
        self._sources.pop(name, None)

    def _add(self, source: _Source) -> None:
        if not _NAME.fullmatch(source.name):
            raise ValueError(f"bad metric name {source.name!r}")
        bad = [label for label in source.labels if not _LABEL.fullmatch(label)]
        if bad or len(set(source.labels)) != len(source.labels):
            raise ValueError(f"bad label names {source.labels!r} for {source.name!r}")
        base = source.name.removesuffix("_total")
        if {source.name, base} & (self._sources.keys() | self._builtin_names):
            raise ValueError(f"metric {source.name!r} already exported")
        self._sources[source.name] = source

    # -- updates from the daemon ---------------------------------------------------

    def observe_event(self, event: Hypothesis) -> None:
        """Count a published caption event and record its latency (when known)."""
        self._events.labels(event.kind).inc()
        if event.latency_ms is not None and math.isfinite(event.latency_ms):
            self._latency.labels(event.kind).observe(max(event.latency_ms, 0.0) / 1000.0)

    def connection_rejected(self, endpoint: Endpoint, reason: RejectReason) -> None:
        """Count a refused or server-closed connection; see :data:`REJECT_REASONS`.

        Raises ValueError for a label outside the fixed vocabulary (a bug in the
        caller, caught by its tests rather than exported as a stray series).
        """
        if endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {endpoint!r}; expected one of {sorted(ENDPOINTS)}")
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown reason {reason!r}; expected one of {sorted(REJECT_REASONS)}")
        self._rejected.labels(endpoint, reason).inc()

    def client_stream_closed(self, code: int) -> None:
        """Count a ``/v1/stream`` connection ending with WebSocket close ``code``."""
        # The client picks its own close code: unknown ones share one label so a
        # client cannot mint series.
        label = str(int(code)) if int(code) in KNOWN_CLOSE_CODES else "other"
        self._closed.labels(label).inc()

    def audio_received(self, seconds: float) -> None:
        """Add ``seconds`` of received audio (from any source or client)."""
        self._audio.inc(seconds)

    def throttled(self, seconds: float) -> None:
        """Add ``seconds`` a client's ingest was paused for sending too fast."""
        self._throttled.inc(seconds)

    # -- exposition ------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The ``/metrics`` response: (body, content type)."""
        return generate_latest(_WithoutCreated(self.registry)), CONTENT_TYPE

    # -- built-in scrape-time families ------------------------------------------------

    def _add_builtin_sources(self) -> None:
        self.add_gauge(
            "streamer_streams",
            "Active streams by origin (source: configured inputs, client: /v1/stream).",
            self._read_streams,
            labels=("origin",),
        )
        self.add_gauge("streamer_subscribers", "Open caption subscribers.", self._read_subscribers)
        self.add_gauge(
            "streamer_engine_alive",
            "1 while the engine thread runs and has not failed fatally.",
            lambda: 1.0 if self._engine is not None and self._engine.alive else 0.0,
        )
        engine_counters = (
            ("streamer_engine_requests", "Decode requests completed.", "requests"),
            ("streamer_engine_failed_requests", "Decode requests that failed.", "failed"),
            ("streamer_engine_audio_seconds", "Seconds of audio decoded.", "audio_seconds"),
            ("streamer_engine_busy_seconds", "Seconds the engine spent decoding.", "busy_seconds"),
        )
        for name, doc, attr in engine_counters:
            self.add_counter(name, doc, self._engine_stat(attr))
        self.add_counter(
            "streamer_engine_cancelled_requests",
            "Decode requests cancelled because a newer window superseded them.",
            self._engine_value(lambda e: e.cancelled_requests),
        )
        self.add_gauge(
            "streamer_engine_real_time_factor",
            "Engine busy seconds per second of audio decoded, since start (lower is faster).",
            self._engine_value(_real_time_factor),
        )
        self.add_gauge(
            "streamer_engine_heartbeat_age_seconds",
            "Seconds since the engine thread last showed life (grows when it is stuck).",
            self._engine_value(lambda e: max(self._clock() - e.heartbeat, 0.0)),
        )
        self.add_counter(
            "streamer_fanout_dropped_partials",
            "Undelivered partials replaced by a newer one (latest wins), all subscribers.",
            self._fanout_value(lambda f: f.dropped_partials),
        )
        self.add_counter(
            "streamer_fanout_slow_disconnects",
            "Subscribers (sockets and sinks) disconnected because their final queue was full.",
            self._fanout_value(lambda f: f.disconnected_slow),
        )
        self._builtin_names.update(self._sources)

    def _read_streams(self) -> Mapping[tuple[str, ...], float]:
        counts: dict[tuple[str, ...], float] = {(origin,): 0.0 for origin in ORIGINS}
        if self._streams is not None:
            for origin, n in self._streams().items():
                counts[(origin,)] = float(n)
        return counts

    def _read_subscribers(self) -> float:
        if self._subscribers is not None:
            return self._subscribers()
        return self._fanout.subscribers if self._fanout is not None else 0

    def _engine_stat(self, attr: str) -> ValueFn:
        return self._engine_value(lambda e: float(getattr(e.stats, attr)))

    def _engine_value(self, read: Callable[[EngineLike], float]) -> ValueFn:
        """A source that is absent (no sample) until an engine is bound."""

        def fn() -> float | None:
            return None if self._engine is None else read(self._engine)

        return fn

    def _fanout_value(self, read: Callable[[FanoutLike], float]) -> ValueFn:
        def fn() -> float | None:
            return None if self._fanout is None else read(self._fanout)

        return fn


def _real_time_factor(engine: EngineLike) -> float:
    stats = engine.stats
    return stats.busy_seconds / stats.audio_seconds if stats.audio_seconds else 0.0
