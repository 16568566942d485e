"""A microphone that stops delivering: the daemon finalises, says source_lost, recovers.

The microphone is driven through sounddevice's callback with recorded audio
(FakeSD from tests/audio/test_capture.py); everything else is real: the
daemon, the model, the WebSocket subscriber.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import soxr
from websockets.asyncio.client import connect

from streamer.config import SourceConfig
from streamer.errors import DeviceError
from streamer.service.app import App

from ..audio.test_capture import FakeSD
from .test_ingest import CLIP, make_config, running, ws_url

TIMEOUT = 30.0


def mic_config(model: Path, **source: Any) -> Any:
    mic = SourceConfig(type="microphone", stream="mic0", device="USB Microphone", **source)
    return dataclasses.replace(make_config(model), sources=(mic,))


async def test_lost_then_restored_microphone(
    tiny_whisper: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sd = FakeSD()
    monkeypatch.setattr("streamer.audio.capture.import_sounddevice", lambda: sd)
    audio, rate = sf.read(CLIP, dtype="float32")
    async with running(mic_config(tiny_whisper)) as app:
        events: list[dict[str, Any]] = []
        async with connect(ws_url(app, "/v1/captions?streams=mic0")) as sub:

            async def read() -> None:
                async for message in sub:
                    events.append(json.loads(message))

            reader = asyncio.create_task(read())
            stream = await asyncio.to_thread(sd.wait_stream, 1)
            device_audio = soxr.resample(audio, rate, stream.kwargs["samplerate"])
            block = stream.kwargs["blocksize"]

            def play(s: Any) -> None:
                for i in range(0, len(device_audio), block):
                    s.feed(np.asarray(device_audio[i : i + block])[:, None])
                    time.sleep(0.01)

            await asyncio.to_thread(play, stream)  # then silence from PortAudio: unplugged
            async with asyncio.timeout(TIMEOUT):
                while not any(e["type"] == "source_lost" for e in events):
                    await asyncio.sleep(0.05)
            # the device is still listed, so the source reopens it
            again = await asyncio.to_thread(sd.wait_stream, 2)
            async with asyncio.timeout(TIMEOUT):
                while not any(e["type"] == "source_restored" for e in events):
                    await asyncio.sleep(0.05)
            await asyncio.to_thread(play, again)
            async with asyncio.timeout(TIMEOUT):  # captions go on after the outage
                while not [e for e in events if e["type"] == "partial" and e["start"] > 4.0]:
                    await asyncio.sleep(0.05)
            reader.cancel()
    kinds = [e["type"] for e in events]
    lost = kinds.index("source_lost")
    assert "final" in kinds  # the segment cut by the loss was finalised
    assert lost < kinds.index("source_restored")
    assert "no audio" in events[lost]["text"]
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)  # one numbering for all


async def test_missing_required_microphone_fails_before_ready(
    tiny_whisper: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sd = FakeSD(devices=[{"index": 2, "name": "Built-in Mic", "max_input_channels": 1,
                          "default_samplerate": 16000.0}])  # fmt: skip
    monkeypatch.setattr("streamer.audio.capture.import_sounddevice", lambda: sd)
    app = App(mic_config(tiny_whisper), keep_serving=True)
    with pytest.raises(DeviceError, match="Built-in Mic") as err:
        await asyncio.wait_for(app.run(), TIMEOUT)
    assert err.value.exit_code == 78
    assert not app.ready or app.server is None


async def test_optional_microphone_missing_does_not_stop_the_daemon(
    tiny_whisper: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sd = FakeSD(devices=[])
    monkeypatch.setattr("streamer.audio.capture.import_sounddevice", lambda: sd)
    async with running(mic_config(tiny_whisper, required=False)) as app:
        assert app.ready and "mic0" in app.factory.runners  # type: ignore[union-attr]


async def test_sighup_applies_logging_and_names_what_needs_a_restart(
    tiny_whisper: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging
    import os
    import signal

    from streamer.config import LoggingConfig

    base = make_config(tiny_whisper)
    files = [base]

    def reload_config() -> Any:
        return files[-1]

    app = App(base, keep_serving=True, reload_config=reload_config)
    task = asyncio.create_task(app.run())
    async with asyncio.timeout(TIMEOUT):
        while not app.ready:
            await asyncio.sleep(0.02)
    caplog.set_level(logging.INFO, logger="streamer")
    files.append(
        dataclasses.replace(
            base,
            logging=LoggingConfig(level="debug", format="json"),
            model=dataclasses.replace(base.model, id="elsewhere"),
        )
    )
    os.kill(os.getpid(), signal.SIGHUP)
    async with asyncio.timeout(TIMEOUT):
        while app.cfg.logging.level != "debug":
            await asyncio.sleep(0.02)
    messages = [r.getMessage() for r in caplog.records if "reload" in r.getMessage()]
    assert any("applied logging.level, logging.format" in m for m in messages), messages
    assert any("restart to change: model.id" in m for m in messages), messages
    assert app.cfg.model.id == str(tiny_whisper)  # what runs is what is reported
    assert app.reload() == ["model.id"]  # still different from what runs; logging is applied
    app.request_stop()
    assert await asyncio.wait_for(task, TIMEOUT) == 0
    from streamer.service.logs import reload_logging

    reload_logging(LoggingConfig())  # leave the process's logging as it was
