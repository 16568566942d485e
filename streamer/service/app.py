"""Where everything is wired together: config -> model, engine, sources, sinks.

``App.run()`` is the daemon's lifetime:
  start the WebSocket server (not ready) -> load the model off the loop ->
  start the engine thread -> start sinks and sources -> serve until the file
  sources end (unless ``keep_serving``) or a signal arrives -> shut down in
  order, each step with a timeout: stop sources, finalise every stream, drain
  the engine, flush sinks, close WebSocket clients with 1001.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import signal
import ssl
import sys
import time
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streamer.config import (
    Config,
    WebSocketConfig,
    config_to_dict,
    split_items,
)
from streamer.core.admission import AdmissionGate, AdmissionLimits, Demand
from streamer.core.wire import IngestPolicy
from streamer.errors import ConfigError, StreamerError
from streamer.service.engine_setup import all_targets, start_engine
from streamer.service.exposure import exposure_warnings
from streamer.service.ingest import IngestLimits, IngestService
from streamer.service.logs import register_secret, reload_logging
from streamer.service.metrics import Metrics
from streamer.service.realtime import RealtimeService
from streamer.service.seq_store import SeqReservations, resolve_state_dir
from streamer.service.stream_factory import StreamFactory, open_source, probe_file_sources
from streamer.service.streams import BULK_AHEAD_S, StreamRunner
from streamer.service.systemd import SystemdService
from streamer.service.wyoming import WyomingServer
from streamer.sinks.caption_page import add_page_routes
from streamer.sinks.console import ConsoleSink
from streamer.sinks.fanout import Fanout, Subscription
from streamer.sinks.jsonl import JsonlSink
from streamer.sinks.mqtt import MqttSettings, MqttSink, resolve_password
from streamer.sinks.websocket import AccessPolicy, CaptionServer, http_response
from streamer.types import Hypothesis

if TYPE_CHECKING:
    from websockets.asyncio.server import ServerConnection
    from websockets.http11 import Request, Response

    from streamer.engine.client import EngineClient
    from streamer.engine.core import Engine

log = logging.getLogger(__name__)

SHUTDOWN_STEP_TIMEOUT = 15.0
#: The longest a shutdown can take, step by step (``App._shutdown``): clients stop
#: feeding, streams finalise, client sockets flush (their finals, then the
#: stragglers' background finals), the engine drains, sinks flush, the server
#: closes (its own three bounded steps). systemd's TimeoutStopSec must exceed it.
SHUTDOWN_MAX_S = 7 * SHUTDOWN_STEP_TIMEOUT
#: How often the engine's load is sampled for admission (``[admission]``).
ADMISSION_SAMPLE_S = 0.5


def admission_limits(cfg: Config) -> AdmissionLimits:
    """The admission thresholds from ``[admission]`` and ``streaming.max_backlog_s``."""
    a = cfg.admission
    return AdmissionLimits(
        max_engine_load=a.max_engine_load,
        max_lag_s=a.max_lag_s,
        max_backlog_s=cfg.streaming.max_backlog_s,
        window_s=a.load_window_s,
        warmup_streams=a.warmup_streams,
    )


TOKEN_ENV = "STREAMER_WS_TOKEN"


def changed_keys(old: Config, new: Config) -> list[str]:
    """``section.key`` names whose values differ (``sources`` as a whole)."""
    a, b = config_to_dict(old), config_to_dict(new)
    out: list[str] = []
    for section, values in b.items():
        if isinstance(values, dict):
            out += [f"{section}.{k}" for k, v in values.items() if a[section].get(k) != v]
        elif a[section] != values:
            out.append(section)
    return out


def load_ws_token(path: str) -> str | None:
    """The WebSocket bearer token: from ``auth_token_file``, else ``$STREAMER_WS_TOKEN``."""
    if not path:
        return os.environ.get(TOKEN_ENV) or None
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(
            f"cannot read the token file {path}: {reason}", key="websocket.auth_token_file"
        ) from None
    if not token:
        raise ConfigError(f"the token file {path} is empty", key="websocket.auth_token_file")
    return token


def make_ssl_context(cert: str, key: str) -> ssl.SSLContext | None:
    """A server TLS context from PEM files, or None for plain ws://."""
    if not cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load TLS certificate {cert} / key {key}: {exc}", key="websocket.tls_cert"
        ) from None
    return context


def ingest_policy(ws: WebSocketConfig, client: EngineClient) -> IngestPolicy:
    """What clients may choose, checked against what the loaded model can do."""
    languages, tasks = set(split_items(ws.client_languages)), set(split_items(ws.client_tasks))
    if (languages or tasks) and not client.tasks:
        raise ConfigError(
            "this model has a fixed language and task; clients cannot choose them",
            key="websocket.client_languages" if languages else "websocket.client_tasks",
        )
    unknown = sorted(languages - client.languages)
    if unknown:
        raise ConfigError(
            f"{unknown[0]!r} is not a language of this model", key="websocket.client_languages"
        )
    targets = set(split_items(ws.client_targets))
    missing = sorted(targets - set(client.targets))
    if missing:  # (app.all_targets loads every client target: a bug if reached)
        raise ConfigError(
            f"no translation model for {missing[0]!r}", key="websocket.client_targets"
        )
    return IngestPolicy(
        languages=frozenset(languages), tasks=frozenset(tasks), targets=frozenset(targets)
    )


class App:
    """The daemon: one instance per process."""

    def __init__(
        self,
        cfg: Config,
        *,
        keep_serving: bool | None = None,
        reload_config: Callable[[], Config] | None = None,
    ) -> None:
        self.cfg = cfg
        self.reload_config = reload_config  # SIGHUP re-reads the files through it
        self._sinks: list[ConsoleSink | JsonlSink | MqttSink] = []
        self.keep_serving = cfg.service.keep_serving if keep_serving is None else keep_serving
        self.fanout = Fanout()
        self.engine: Engine | None = None
        self.server: CaptionServer | None = None
        self.ingest: IngestService | None = None
        self.wyoming: WyomingServer | None = None
        self.mqtt: MqttSink | None = None
        self.factory: StreamFactory | None = None
        self.run_id = secrets.token_hex(8)  # on every event and the MQTT status
        self.seqs: SeqReservations | None = None  # opened by run(): durable seq blocks
        self.metrics = Metrics(
            fanout=self.fanout,
            streams=lambda: self.factory.counts() if self.factory else {},
            subscribers=lambda: self.server.subscribers if self.server else 0,
        )
        self.systemd = SystemdService()  # sd_notify: READY, STATUS, WATCHDOG, STOPPING
        self._stop = asyncio.Event()
        self._sink_tasks: list[asyncio.Task[None]] = []
        self._sink_subs: list[Subscription] = []
        self._signals = 0
        self.exit_code = 0
        self._sources_open = False
        self.admission = AdmissionGate(admission_limits(cfg))  # sampled once the engine runs

    @property
    def ready(self) -> bool:
        """The model runs and every configured source is open (what /readyz reports)."""
        return self._sources_open and self.engine is not None and self.engine.alive

    @property
    def saturated(self) -> str | None:
        """Why new streams are refused now (the engine cannot serve one more in
        real time; ``[admission]``), else None. /readyz answers 503 with it."""
        return self._admission() if self.cfg.admission.enabled else None

    def _admission(self) -> str | None:
        """Sample the engine's load and what is live; the refusal reason or None."""
        engine, factory = self.engine, self.factory
        if engine is None or factory is None:
            return None
        # Streams running ahead of real time (bulk) lag and keep the engine busy by
        # design, with work a live stream preempts (see Scheduler): only live
        # streams and the engine time spent on them count.
        live = {
            name: r
            for name, r in factory.runners.items()
            if not r.session.done and r.ahead_seconds <= BULK_AHEAD_S
        }
        pending = 0  # clients holding a slot whose stream has not started yet
        if self.ingest is not None:
            pending = max(0, self.ingest.active - factory.counts().get("client", 0))
        lags = {name: lag for name, lag in engine.lag().items() if name in live}
        backlogs = {name: r.backlog_seconds for name, r in live.items()}
        demand = Demand(len(live) + pending, lags, backlogs)
        busy = engine.stats.busy_seconds - engine.stats.bulk_seconds
        return self.admission.update(time.monotonic(), busy, demand)

    async def _sample_load(self) -> None:
        """Keep the load window sampled between decisions."""
        while True:
            try:
                self._admission()
            except Exception:  # a bug: say so, keep sampling
                log.exception("admission: sampling the engine's load failed")
            await asyncio.sleep(ADMISSION_SAMPLE_S)

    @property
    def full(self) -> bool:
        """Every ``max_streams`` slot is taken: /readyz answers 503 so that a load
        balancer sends new clients elsewhere (the streams already here go on)."""
        return self.ingest is not None and self.ingest.full

    def _streams_detail(self) -> str:
        if self.ingest is None:
            return ""
        state = "full: refusing new streams" if self.ingest.full else "open"
        return f"streams: {state} ({self.ingest.active} of {self.ingest.limits.max_streams})"

    def _admission_detail(self) -> str:
        if not self.cfg.admission.enabled:
            return "admission: off"
        reason = self.admission.reason
        return f"admission: refusing new streams: {reason}" if reason else "admission: open"

    def request_stop(self) -> None:
        self._stop.set()

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        if self._signals > 1 and signum == signal.SIGINT:
            log.warning("second interrupt: exiting now")
            os._exit(130)
        log.info("%s received: shutting down", signal.Signals(signum).name)
        self._stop.set()

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._on_signal, sig)
        if self.reload_config is not None:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signal.SIGHUP, self.reload)

    def reload(self) -> list[str]:
        """SIGHUP: apply what can change without a restart; name what cannot.

        Applied: ``[logging]`` and the console's ``partials``. Every other
        changed key is named in one warning (it needs a restart). Returns the
        changed keys. A configuration that no longer loads is reported and ignored.
        """
        if self.reload_config is None:
            return []
        self.systemd.notifier.reloading()
        try:
            new = self.reload_config()
        except StreamerError as exc:
            log.error("reload: configuration not applied: %s", exc)
            return []
        finally:
            self.systemd.notifier.ready()
        changed = changed_keys(self.cfg, new)
        applied = [k for k in changed if k.startswith("logging.") or k == "console.partials"]
        if any(k.startswith("logging.") for k in applied):
            reload_logging(new.logging)
        for sink in self._sinks:
            if isinstance(sink, ConsoleSink):
                sink.partials = new.console.partials
        console = dataclasses.replace(self.cfg.console, partials=new.console.partials)
        self.cfg = dataclasses.replace(self.cfg, logging=new.logging, console=console)
        restart = [k for k in changed if k not in applied]
        if applied:
            log.info("reload: applied %s", ", ".join(applied))
        if restart:
            log.warning("reload: not applied, restart to change: %s", ", ".join(restart))
        if not changed:
            log.info("reload: configuration unchanged")
        return changed

    def _start_sinks(self) -> None:
        sinks = self._sinks
        if self.cfg.console.enabled:
            sinks.append(ConsoleSink(sys.stdout, partials=self.cfg.console.partials))
        if self.cfg.jsonl.path:
            sinks.append(JsonlSink(self.cfg.jsonl.path))
        if self.mqtt is not None:
            sinks.append(self.mqtt)
        for sink in sinks:
            name = type(sink).__name__.removesuffix("Sink").lower()
            sub = self.fanout.subscribe(kinds=sink.kinds, targets=sink.targets, name=name)
            self._sink_subs.append(sub)
            self._sink_tasks.append(asyncio.create_task(sink.run(sub), name=f"sink-{name}"))

    def _make_mqtt(self) -> None:
        """Build the MQTT sink (config errors surface before the model loads)."""
        c = self.cfg.mqtt
        if not c.enabled:
            return
        password = resolve_password(c.password, c.password_file)
        register_secret(password)
        optional: dict[str, Any] = {"client_id": c.client_id} if c.client_id else {}
        settings = MqttSettings(
            host=c.host,
            port=c.port,
            **optional,
            username=c.username or None,
            password=password,
            tls=c.tls,
            tls_ca=c.tls_ca,
            tls_cert=c.tls_cert,
            tls_key=c.tls_key,
            protocol=c.protocol,
            prefix=c.prefix,
            node=c.node,
            partials=c.partials,
            partial_qos=c.partial_qos,
            final_qos=c.final_qos,
            partial_expiry_s=c.partial_expiry_s,
            keepalive_s=c.keepalive_s,
            reconnect_min_s=c.reconnect_min_s,
            reconnect_max_s=c.reconnect_max_s,
            outbox_size=c.outbox_size,
            flush_timeout_s=c.flush_timeout_s,
            hermes=c.hermes,
            hermes_site_id=c.hermes_site_id,
        )
        sink = self.mqtt = MqttSink(settings, run_id=self.run_id)
        m = self.metrics
        m.add_gauge("streamer_mqtt_connected", "1 while connected to the broker",
                    lambda: float(sink.connected))  # fmt: skip
        m.add_gauge("streamer_mqtt_outbox", "finals waiting for the broker",
                    lambda: float(sink.outbox_len))  # fmt: skip
        m.add_counter("streamer_mqtt_dropped", "events the MQTT sink dropped, by type",
                      lambda: {("partial",): sink.dropped_partials,
                               ("final",): sink.dropped_finals}, labels=("type",))  # fmt: skip
        m.add_counter("streamer_mqtt_reconnects", "reconnections to the broker",
                      lambda: float(sink.reconnects))  # fmt: skip

    async def run(self) -> int:
        self._install_signals()
        self._make_mqtt()
        state_dir = resolve_state_dir(self.cfg.service.state_dir)
        self.seqs = await asyncio.to_thread(SeqReservations.open, state_dir)
        log.info("run %s; seq reservations in %s", self.run_id, self.seqs.path)
        await self._start_server()
        try:
            async with self.systemd.loading():  # extends systemd's start timeout meanwhile
                await asyncio.to_thread(probe_file_sources, self.cfg)
                self.engine = await asyncio.to_thread(start_engine, self.cfg)
        except StreamerError:
            await self._close_server()
            raise
        from streamer.engine.client import EngineClient

        client = EngineClient(self.engine)

        def on_fatal(exc: BaseException) -> None:
            client.loop.call_soon_threadsafe(self._fatal, exc)

        self.engine.on_fatal = on_fatal
        self.metrics.bind(engine=self.engine)
        engine = self.engine
        self.metrics.add_gauge(
            "streamer_stream_lag_seconds",
            "per stream: age of its oldest unfinished decode request at the last engine step",
            lambda: {(stream,): lag for stream, lag in engine.lag().items()},
            labels=("stream",),
        )
        self.metrics.add_gauge(
            "streamer_engine_batch_mean",
            "mean sequences per engine step",
            lambda: engine.stats.mean_batch,
        )
        self.metrics.add_counter(
            "streamer_engine_memory_releases_total",
            "times the engine, idle after work, gave freed memory back to the system",
            lambda: float(engine.memory_releases),
        )
        self._start_sinks()
        factory = self.factory = StreamFactory(
            self.cfg, client, self._publish, run=self.run_id, seqs=self.seqs
        )
        self.metrics.add_gauge(
            "streamer_stream_backlog_seconds",
            "per stream: audio waiting for its final (grows when the engine is behind)",
            lambda: {(name,): r.backlog_seconds for name, r in factory.runners.items()},
            labels=("stream",),
        )
        gate, admitting = self.admission, self.cfg.admission.enabled
        self.metrics.add_gauge(
            "streamer_engine_load",
            f"engine busy fraction over the last {gate.limits.window_s:g} s",
            lambda: gate.load.busy if gate.load is not None else 0.0,
        )
        self.metrics.add_gauge(
            "streamer_admission_saturated",
            "1 while new streams are refused: the engine cannot serve one more in real time",
            lambda: float(admitting and gate.saturated),
        )
        self.metrics.add_counter(
            "streamer_input_held_seconds_total",
            "wall time streams held their input back because finals were behind",
            factory.held_seconds,
        )
        self.metrics.add_counter(
            "streamer_segments_merged_total",
            "segments decoded together with the one before (a stream catching up)",
            factory.merged_segments,
        )
        if self.ingest is not None:
            try:
                admission = self._admission if self.cfg.admission.enabled else None
                self.ingest.attach(
                    factory, ingest_policy(self.cfg.websocket, client), admission=admission
                )
            except StreamerError:
                await self._stop_engine()
                await self._close_server()
                raise
        opened: list[tuple[StreamRunner, Any]] = []
        for src in self.cfg.sources:
            runner = factory.create(src.stream)
            source = open_source(src, client.sample_rate, runner.source_state)
            if hasattr(source, "open"):  # a required microphone fails now, before READY
                try:
                    await source.open()
                except StreamerError:
                    await self._shutdown([], factory)
                    raise
            opened.append((runner, source))
        source_tasks = [
            asyncio.create_task(runner.run(source.blocks()), name=f"source-{runner.stream}")
            for runner, source in opened
        ]
        self._sources_open = True
        log.info("ready: %d source(s)", len(source_tasks))
        if self.mqtt is not None:  # the broker connection, in `systemctl status`
            self.systemd.add_status(self.mqtt.describe)
        self.systemd.running(
            self.engine,
            streams=factory.counts,
            subscribers=lambda: self.server.subscribers if self.server else 0,
        )
        stop_wait = asyncio.create_task(self._stop.wait(), name="stop-wait")
        sampler = asyncio.create_task(self._sample_load(), name="admission-sampler")
        try:
            if source_tasks and not self.keep_serving:
                waiting: set[asyncio.Future[Any]] = {stop_wait, *source_tasks}
                while not stop_wait.done() and not all(t.done() for t in source_tasks):
                    _, pending = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                    waiting = set(pending)
                self._report_source_errors(source_tasks)
            else:
                await stop_wait
        finally:
            await self._shutdown(source_tasks, factory)
            stop_wait.cancel()
            sampler.cancel()
        return self.exit_code

    def _engine_detail(self) -> str:
        engine = self.engine
        if engine is None:
            return "engine: loading the model"
        if not engine.alive:
            return f"engine: stopped ({engine.fatal})"
        age = time.monotonic() - engine.heartbeat
        return (
            f"engine: running, heartbeat {age:.1f} s ago, RTF {engine.stats.real_time_factor:.2f}"
        )

    def _publish(self, event: Hypothesis) -> None:
        self.metrics.observe_event(event)
        self.fanout.publish(event)

    def _serve_metrics(self, conn: ServerConnection, request: Request) -> Response:
        body, content_type = self.metrics.render()
        return http_response(HTTPStatus.OK, body, content_type)

    async def _start_server(self) -> None:
        ws = self.cfg.websocket
        if not ws.enabled:
            return
        token = load_ws_token(ws.auth_token_file)
        register_secret(token)
        for warning in exposure_warnings(self.cfg):
            log.warning("%s", warning)
        access = AccessPolicy(
            token=token,
            allowed_origins=frozenset(split_items(ws.allowed_origins)),
            server_names=frozenset(split_items(ws.server_names)),
            auth_timeout=ws.auth_timeout_s,
            max_unauthenticated=ws.max_unauthenticated,
            max_unauthenticated_per_address=ws.max_unauthenticated_per_address,
        )
        ssl_context = make_ssl_context(ws.tls_cert, ws.tls_key)
        self.server = CaptionServer(
            self.fanout,
            ws.host,
            ws.port,
            max_subscribers=ws.max_subscribers,
            queue_finals=ws.queue_finals,
            ready=lambda: self.ready and not self.full and self.saturated is None,
            access=access,
            ssl_context=ssl_context,
            max_frame_bytes=ws.max_frame_bytes,
            ping_interval=ws.ping_interval_s,
            ping_timeout=ws.ping_timeout_s,
            on_reject=self.metrics.connection_rejected,  # type: ignore[arg-type]
        )
        self.server.add_route("/metrics", self._serve_metrics, name="metrics", auth=True)
        self.server.add_ready_detail(self._engine_detail)
        self.server.add_ready_detail(self._streams_detail)
        self.server.add_ready_detail(self._admission_detail)
        mqtt = self.mqtt
        if mqtt is not None:
            self.server.add_ready_detail(mqtt.describe)
        add_page_routes(self.server, targets=all_targets(self.cfg))
        limits = IngestLimits(
            max_streams=ws.max_streams,
            max_audio_rate=ws.max_audio_rate,
            audio_burst_s=ws.audio_burst_s,
            idle_timeout_s=ws.idle_timeout_s,
            finalize_timeout_s=SHUTDOWN_STEP_TIMEOUT,
        )
        self.ingest = IngestService(self.server, self.fanout, limits, observer=self.metrics)
        RealtimeService(self.ingest, self.cfg)  # /v1/realtime: OpenAI Realtime transcription
        await self.server.start()
        scheme = "wss" if ssl_context is not None else "ws"
        log.info("captions on %s://%s:%d/v1/captions", scheme, ws.host, self.server.port)
        if self.cfg.wyoming.enabled:  # Home Assistant's Wyoming: client streams over TCP
            self.wyoming = WyomingServer(self.ingest, self.cfg)
            try:
                await self.wyoming.start()
            except StreamerError:
                await self._close_server()
                raise

    async def _stop_engine(self) -> None:
        if self.engine is not None:
            await asyncio.to_thread(self.engine.stop, SHUTDOWN_STEP_TIMEOUT)

    def _report_source_errors(self, tasks: list[asyncio.Task[None]]) -> None:
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                exc = task.exception()
                log.error("%s failed: %s", task.get_name(), exc)
                self.exit_code = getattr(exc, "exit_code", 1)

    def _fatal(self, exc: BaseException) -> None:
        log.critical("engine failure, stopping: %s", exc)
        self.systemd.failed(f"engine failure: {exc}")
        self.exit_code = 1
        self._stop.set()

    async def _shutdown(
        self, source_tasks: list[asyncio.Task[None]], factory: StreamFactory
    ) -> None:
        await self.systemd.stopping()  # STOPPING=1; the watchdog is no longer fed
        ingest = self.ingest
        for task in source_tasks:  # stop sources; each runner finalises its stream
            task.cancel()
        if ingest is not None:  # clients: no new ones, no more reading, streams end
            await ingest.stop_input(SHUTDOWN_STEP_TIMEOUT)
        await asyncio.gather(*source_tasks, return_exceptions=True)
        for runner in factory.runners.values():
            runner.end()
        waits = [r.wait_done(SHUTDOWN_STEP_TIMEOUT) for r in factory.runners.values()]
        finished = await asyncio.gather(*waits)
        if not all(finished):
            log.warning("some streams did not finalise within %.0f s", SHUTDOWN_STEP_TIMEOUT)
        if ingest is not None:  # client sockets get their last finals, then 1001
            await ingest.close(SHUTDOWN_STEP_TIMEOUT)
        await self._stop_engine()
        await self._flush_sinks()
        await self._close_server()

    async def _flush_sinks(self) -> None:
        for sub in self._sink_subs:
            sub.close("shutdown")
        if self._sink_tasks:
            _, pending = await asyncio.wait(self._sink_tasks, timeout=SHUTDOWN_STEP_TIMEOUT)
            for task in pending:
                task.cancel()

    async def _close_server(self) -> None:
        if self.wyoming is not None:
            await self.wyoming.close(timeout=1.0)
            self.wyoming = None
        if self.server is not None:
            await self.server.close()
            self.server = None
