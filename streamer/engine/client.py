"""The engine's asyncio facade: submit from the loop, await the result."""

from __future__ import annotations

import asyncio
import contextlib

from streamer.core.session import DecodeRequest, DecodeResult
from streamer.core.translation import TranslateRequest, TranslateResult
from streamer.engine.core import Engine


class EngineClient:
    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.engine = engine
        self.loop = loop or asyncio.get_running_loop()

    @property
    def sample_rate(self) -> int:
        return self.engine.sample_rate

    @property
    def languages(self) -> frozenset[str]:
        return self.engine.languages

    @property
    def tasks(self) -> frozenset[str]:
        return self.engine.tasks

    def submit(self, req: DecodeRequest) -> asyncio.Future[DecodeResult]:
        fut: asyncio.Future[DecodeResult] = self.loop.create_future()

        def deliver(result: DecodeResult) -> None:
            if not fut.done():
                fut.set_result(result)

        def on_engine_thread(result: DecodeResult) -> None:
            # the loop may have closed (shutdown mid-step): nobody waits any more
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(deliver, result)

        self.engine.submit(req, on_engine_thread)
        return fut

    async def decode(self, req: DecodeRequest) -> DecodeResult:
        return await self.submit(req)

    @property
    def targets(self) -> tuple[str, ...]:
        """Translation targets (empty: none): the cascade's or the speech model's own."""
        return self.engine.targets

    @property
    def speech_targets(self) -> tuple[str, ...]:
        """Targets the speech model decodes itself (``MultiTargetSession``), no cascade."""
        return self.engine.speech_targets

    def translate(self, req: TranslateRequest) -> asyncio.Future[TranslateResult]:
        """Submit a text translation; the future resolves on the loop."""
        fut: asyncio.Future[TranslateResult] = self.loop.create_future()

        def deliver(result: TranslateResult) -> None:
            if not fut.done():
                fut.set_result(result)

        def on_engine_thread(result: TranslateResult) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                self.loop.call_soon_threadsafe(deliver, result)

        self.engine.submit_translation(req, on_engine_thread)
        return fut
