"""tools/stream_client.py against a real daemon: a file, a (fake) microphone, errors."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from streamer.service.app import App
from tools import stream_client

from ..audio.test_capture import FakeSD
from ..service.test_ingest import CLIP, make_config, running


def received(app: App) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = app.metrics.render()[0].decode()
    for family in text_string_to_metric_families(text):
        if family.name == "streamer_audio_received_seconds":
            return float(family.samples[0].value)
    raise AssertionError("no audio metric")


def base_url(app: App) -> str:
    assert app.server is not None
    return f"ws://127.0.0.1:{app.server.port}"


async def test_file_json_events_and_exit_0(
    tiny_whisper: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running(make_config(tiny_whisper)) as app:
        args = stream_client.parse_args(
            [str(CLIP), "--url", base_url(app), "--fast", "--json", "--stream", "cli"]
        )
        assert await stream_client.run(args) == 0
    out, err = capsys.readouterr()
    events = [json.loads(line) for line in out.splitlines()]
    assert events and events[-1]["type"] == "final"
    assert {e["stream"] for e in events} == {"cli"}
    assert "streaming as cli" in err


async def test_console_output_and_server_error(
    tiny_whisper: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running(make_config(tiny_whisper)) as app:
        ok = stream_client.parse_args(
            [str(CLIP), "--url", base_url(app), "--fast", "--stream", "c"]
        )
        assert await stream_client.run(ok) == 0
        out, _ = capsys.readouterr()
        assert out.strip().splitlines()[-1].startswith("[c ")
        refused = stream_client.parse_args(
            [str(CLIP), "--url", base_url(app), "--language", "fr"]  # not allowed by config
        )
        assert await stream_client.run(refused) == 1
        assert "does not let clients choose 'language' (1008)" in capsys.readouterr().err


async def test_unreachable_server_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    args = stream_client.parse_args([str(CLIP), "--url", "ws://127.0.0.1:9"])
    assert await stream_client.run(args) == 2
    assert "cannot connect" in capsys.readouterr().err


async def test_microphone_until_interrupted(
    tiny_whisper: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The --mic path through sounddevice's callback, fed with a recorded clip."""
    sd = FakeSD()
    monkeypatch.setattr("streamer.audio.capture.import_sounddevice", lambda: sd)
    audio, rate = sf.read(CLIP, dtype="float32")
    async with running(make_config(tiny_whisper)) as app:
        args = stream_client.parse_args(["--mic", "--url", base_url(app), "--json"])
        client = asyncio.create_task(stream_client.run(args))
        stream = await asyncio.to_thread(sd.wait_stream)
        block = stream.kwargs["blocksize"]
        device_audio = soxr.resample(audio, rate, stream.kwargs["samplerate"])

        def play() -> None:  # PortAudio's thread, a little faster than real time
            for i in range(0, len(device_audio), block):
                stream.feed(np.asarray(device_audio[i : i + block])[:, None])
                time.sleep(0.02)

        await asyncio.to_thread(play)
        async with asyncio.timeout(30):  # wait until the server has the audio, then Ctrl-C
            while received(app) < len(audio) / rate - 0.2:
                await asyncio.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)
        assert await asyncio.wait_for(client, 30) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert events[-1]["type"] == "final"
    assert events[-1]["end"] == pytest.approx(len(audio) / rate, abs=0.2)


async def test_fast_long_file_is_throttled_to_the_end(
    tiny_whisper: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Five minutes sent as fast as the server reads: every final, exit 0, no traceback."""
    audio, rate = sf.read(CLIP, dtype="float32")
    seconds = 300
    long = tmp_path / "long.wav"
    sf.write(long, np.tile(audio, seconds * rate // len(audio) + 1)[: seconds * rate], rate)
    cfg = make_config(
        tiny_whisper, vad=False, max_audio_rate=20.0, audio_burst_s=1.0,
        ping_interval_s=0.5, ping_timeout_s=0.5,
    )  # fmt: skip
    async with running(cfg) as app:
        args = stream_client.parse_args(
            [str(long), "--url", base_url(app), "--fast", "--json", "--finals-only"]
        )
        assert await stream_client.run(args) == 0
    out, err = capsys.readouterr()
    finals = [json.loads(line) for line in out.splitlines()]
    assert "Traceback" not in err and "done in" in err
    assert [f["segment"] for f in finals] == list(range(len(finals)))
    assert finals[-1]["end"] == pytest.approx(seconds, abs=0.01)
