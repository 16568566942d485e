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
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from streamer.audio.vad import FrameVad, make_vad
from streamer.config import Config, SourceConfig, resolve_audio_path
from streamer.core.segmenter import SegmenterSettings
from streamer.core.session import SessionSettings, StreamSession
from streamer.errors import StreamerError
from streamer.service.streams import StreamRunner
from streamer.sinks.console import ConsoleSink
from streamer.sinks.fanout import Fanout, Subscription
from streamer.sinks.jsonl import JsonlSink
from streamer.sinks.websocket import CaptionServer
from streamer.types import Hypothesis

if TYPE_CHECKING:
    from streamer.engine.client import EngineClient
    from streamer.engine.core import Engine
    from streamer.engine.decoding import Decoder

log = logging.getLogger(__name__)

SHUTDOWN_STEP_TIMEOUT = 15.0


def session_settings(cfg: Config, sample_rate: int, frame_samples: int) -> SessionSettings:
    """Convert the config's human units (ms, s) into sample counts."""
    st, vad, model = cfg.streaming, cfg.vad, cfg.model

    def samples(seconds: float) -> int:
        return round(seconds * sample_rate)

    return SessionSettings(
        sample_rate=sample_rate,
        chunk=samples(st.chunk_ms / 1000),
        left_context=samples(st.left_context_s),
        max_segment=samples(st.max_segment_s),
        max_window=samples(st.max_window_s),
        agreement_n=st.agreement_n,
        max_tokens_per_second=st.max_tokens_per_second,
        min_tokens=st.min_tokens,
        prompt_max_tokens=st.prompt_max_tokens,
        vad=vad.enabled,
        segmenter=SegmenterSettings(
            frame_samples=frame_samples,
            threshold=vad.threshold,
            min_speech=samples(vad.min_speech_ms / 1000),
            endpoint_silence=samples(st.endpoint_silence_ms / 1000),
        ),
        lang=None if model.source_language == "auto" else model.source_language,
    )


def model_spec(cfg: Config) -> Any:
    from streamer.engine.loader import ModelSpec

    m = cfg.model
    return ModelSpec(
        id=m.id,
        device=m.device,
        dtype=m.dtype,
        source_language=m.source_language,
        target_language=m.target_language,
        task=m.task,
        num_beams=m.num_beams,
        cache_dir=m.cache_dir,
    )


def make_decoder(cfg: Config) -> Decoder:
    """Load the configured model into the daemon's decoder (blocking)."""
    from streamer.engine.decoding import Decoder
    from streamer.engine.loader import load_model

    return Decoder(load_model(model_spec(cfg)), cfg.streaming.whisper_input)


def start_engine(cfg: Config) -> Engine:
    """Load the model and start the engine thread (blocking: call off the loop)."""
    from streamer.engine.core import Engine

    engine = Engine(make_decoder(cfg))
    engine.start()
    return engine


@dataclass
class StreamFactory:
    """Builds a runner (session + VAD) for a new stream id."""

    cfg: Config
    client: EngineClient
    publish: Callable[[Hypothesis], None]
    partials: bool = True
    runners: dict[str, StreamRunner] = field(default_factory=dict)

    def create(self, stream: str) -> StreamRunner:
        sr = self.client.sample_rate
        vad: FrameVad | None = make_vad(self.cfg.vad.backend, sr) if self.cfg.vad.enabled else None
        frame = vad.frame_samples if vad is not None else 512
        settings = session_settings(self.cfg, sr, frame)
        if not self.partials:
            settings = dataclasses.replace(settings, partials=False)
        runner = StreamRunner(StreamSession(stream, settings), self.client, self.publish, vad)
        self.runners[stream] = runner
        return runner


def open_source(src: SourceConfig, sample_rate: int) -> Any:
    """The async block iterator for one configured source."""
    if src.type == "file":
        from streamer.audio.sources import FileSource

        path = resolve_audio_path(src.path)
        return FileSource(
            path, src.stream, sample_rate, block_ms=src.block_ms, realtime=src.pace == "realtime"
        )
    from streamer.audio.capture import MicrophoneSource

    return MicrophoneSource(
        src.stream,
        sample_rate,
        device=src.device or None,
        block_ms=src.block_ms,
        channels=src.channels,
        device_rate=src.sample_rate or None,
    )


def probe_file_sources(cfg: Config) -> None:
    """Fail fast on unreadable source files, before the model loads."""
    from streamer.audio.resample import probe_audio

    for src in cfg.sources:
        if src.type == "file":
            probe_audio(resolve_audio_path(src.path))


class App:
    """The daemon: one instance per process."""

    def __init__(self, cfg: Config, *, keep_serving: bool | None = None) -> None:
        self.cfg = cfg
        self.keep_serving = cfg.service.keep_serving if keep_serving is None else keep_serving
        self.fanout = Fanout()
        self.engine: Engine | None = None
        self.server: CaptionServer | None = None
        self._stop = asyncio.Event()
        self._sink_tasks: list[asyncio.Task[None]] = []
        self._sink_subs: list[Subscription] = []
        self._signals = 0
        self.exit_code = 0

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.engine.alive

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

    def _start_sinks(self) -> None:
        sinks: list[ConsoleSink | JsonlSink] = []
        if self.cfg.console.enabled:
            sinks.append(ConsoleSink(sys.stdout, partials=self.cfg.console.partials))
        if self.cfg.jsonl.path:
            sinks.append(JsonlSink(self.cfg.jsonl.path))
        for sink in sinks:
            name = type(sink).__name__.removesuffix("Sink").lower()
            sub = self.fanout.subscribe(kinds=sink.kinds, name=name)
            self._sink_subs.append(sub)
            self._sink_tasks.append(asyncio.create_task(sink.run(sub), name=f"sink-{name}"))

    async def run(self) -> int:
        self._install_signals()
        ws = self.cfg.websocket
        if ws.enabled:
            self.server = CaptionServer(
                self.fanout,
                ws.host,
                ws.port,
                max_subscribers=ws.max_subscribers,
                queue_finals=ws.queue_finals,
                ready=lambda: self.ready,
            )
            await self.server.start()
            log.info("captions on ws://%s:%d/v1/captions", ws.host, self.server.port)
        try:
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
        self._start_sinks()
        factory = StreamFactory(self.cfg, client, self.fanout.publish)
        source_tasks: list[asyncio.Task[None]] = []
        for src in self.cfg.sources:
            runner = factory.create(src.stream)
            source = open_source(src, client.sample_rate)
            source_tasks.append(
                asyncio.create_task(runner.run(source.blocks()), name=f"source-{src.stream}")
            )
        log.info("ready: %d source(s)", len(source_tasks))
        stop_wait = asyncio.create_task(self._stop.wait(), name="stop-wait")
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
        return self.exit_code

    def _report_source_errors(self, tasks: list[asyncio.Task[None]]) -> None:
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                exc = task.exception()
                log.error("%s failed: %s", task.get_name(), exc)
                self.exit_code = getattr(exc, "exit_code", 1)

    def _fatal(self, exc: BaseException) -> None:
        log.critical("engine failure, stopping: %s", exc)
        self.exit_code = 1
        self._stop.set()

    async def _shutdown(
        self, source_tasks: list[asyncio.Task[None]], factory: StreamFactory
    ) -> None:
        for task in source_tasks:  # stop sources; each runner finalises its stream
            task.cancel()
        await asyncio.gather(*source_tasks, return_exceptions=True)
        for runner in factory.runners.values():
            runner.end()
        waits = [r.wait_done(SHUTDOWN_STEP_TIMEOUT) for r in factory.runners.values()]
        finished = await asyncio.gather(*waits)
        if not all(finished):
            log.warning("some streams did not finalise within %.0f s", SHUTDOWN_STEP_TIMEOUT)
        if self.engine is not None:
            await asyncio.to_thread(self.engine.stop, SHUTDOWN_STEP_TIMEOUT)
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
        if self.server is not None:
            await self.server.close()
            self.server = None
