"""The Wyoming ASR server: the ``wyoming`` package's ``AsyncTcpClient`` against the daemon.

In-process daemon on free ports, tiny random Whisper (its text is noise): the
tests check the events and their order, that the chunks add up to the
transcript, that the transcript is the final text the other sinks got, the
audio formats, refusals, bad framing and shutdown.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import soxr
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Describe, Info
from wyoming.ping import Ping, Pong

from streamer.config import (
    Config,
    WebSocketConfig,
    WyomingConfig,
    validate_config,
)
from streamer.errors import ConfigError
from streamer.service.app import App
from streamer.service.client_io import decode_int_pcm
from streamer.service.exposure import exposure_warnings
from streamer.service.wyoming import MAX_HEADER_BYTES
from streamer.sinks.fanout import Subscription
from streamer.testing.daemon import client_config, running_app
from streamer.testing.net import free_port

AUDIO = Path(__file__).resolve().parents[1] / "data" / "audio"
TIMEOUT = 30.0


def make_config(model: Path, port: int, **wyoming: Any) -> Config:
    return client_config(
        model,
        streaming={"agreement_n": 1},
        sections={"wyoming": WyomingConfig(enabled=True, port=port, **wyoming)},
    )


@pytest.fixture
async def app(tiny_whisper: Path) -> AsyncIterator[App]:
    async with running_app(make_config(tiny_whisper, free_port()), TIMEOUT) as daemon:
        yield daemon


def wyoming_client(app: App) -> AsyncTcpClient:
    assert app.wyoming is not None
    return AsyncTcpClient("127.0.0.1", app.wyoming.port, read_timeout=TIMEOUT)


def pcm(path: Path, rate: int, width: int, channels: int, seconds: float = 0.0) -> bytes:
    """A clip as little-endian signed PCM of ``width`` bytes, with ``seconds`` of silence."""
    audio, clip_rate = sf.read(path, dtype="float32", always_2d=True)
    audio = soxr.resample(audio.mean(axis=1), clip_rate, rate)
    audio = np.concatenate([audio, np.zeros(int(seconds * rate), dtype=np.float32)])
    ints = np.round(np.clip(audio, -1, 0.999) * (1 << (8 * width - 1))).astype(np.int32)
    ints = np.repeat(ints[:, None], channels, axis=1).reshape(-1)
    return b"".join(int(v).to_bytes(width, "little", signed=True) for v in ints) if width == 3 \
        else ints.astype(f"<i{width}").tobytes()  # fmt: skip


async def send_request(
    client: AsyncTcpClient,
    data: bytes,
    rate: int,
    width: int,
    channels: int,
    stop: bool = True,
    **transcribe: Any,
) -> None:
    await client.write_event(Transcribe(**transcribe).event())
    await client.write_event(AudioStart(rate=rate, width=width, channels=channels).event())
    step = rate // 10 * width * channels  # 100 ms chunks
    for i in range(0, len(data), step):
        chunk = AudioChunk(rate=rate, width=width, channels=channels, audio=data[i : i + step])
        await client.write_event(chunk.event())
    if stop:
        await client.write_event(AudioStop().event())


async def read_until(client: AsyncTcpClient, kind: str) -> list[Event]:
    events: list[Event] = []
    while True:
        event = await client.read_event()
        assert event is not None, f"closed before {kind}: {[e.type for e in events]}"
        events.append(event)
        if event.type == kind:
            return events


def wyoming_finals(sub: Subscription) -> dict[str, list[str]]:
    """Final texts per wyoming-N stream that the fanout published so far."""
    out: dict[str, list[str]] = {}
    while True:
        try:
            event = sub.get_nowait()
        except asyncio.QueueEmpty:
            return out
        if event.stream.startswith("wyoming-"):
            out.setdefault(event.stream, []).append(event.text)


async def streams_ended(app: App) -> None:
    assert app.factory is not None
    async with asyncio.timeout(TIMEOUT):
        while any(s.startswith("wyoming-") for s in app.factory.runners):
            await asyncio.sleep(0.02)


# -- the wyoming client against the daemon --------------------------------------------------


async def test_describe_lists_a_streaming_asr_program(app: App, tiny_whisper: Path) -> None:
    async with wyoming_client(app) as client:
        await client.write_event(Describe().event())
        event = await client.read_event()
        assert event is not None and Info.is_type(event.type)
        info = Info.from_event(event)
        (program,) = info.asr
        assert program.supports_transcript_streaming and program.installed
        (model,) = program.models
        assert model.name == tiny_whisper.name and model.languages == ["en"]
        await client.write_event(Ping(text="hi").event())
        pong = await client.read_event()
        assert pong is not None and Pong.from_event(pong).text == "hi"


async def test_streaming_client_gets_chunks_then_the_transcript(app: App) -> None:
    """44.1 kHz stereo in; transcript-start, chunks, transcript, transcript-stop out."""
    sub = app.fanout.subscribe(kinds={"final"})
    data = pcm(AUDIO / "jfk.flac", 44100, 2, 2, seconds=0.5)
    async with wyoming_client(app) as client:
        await send_request(client, data, 44100, 2, 2, stop=False, language="en")
        # text streams while the request is open: a chunk comes before audio-stop
        events = await read_until(client, "transcript-chunk")
        await client.write_event(AudioStop().event())
        events += await read_until(client, "transcript-stop")
    kinds = [e.type for e in events]
    assert kinds[0] == "transcript-start" and events[0].data == {"language": "en"}
    assert kinds[-2:] == ["transcript", "transcript-stop"]
    assert set(kinds[1:-2]) == {"transcript-chunk"}, kinds
    chunks = [e.data["text"] for e in events if e.type == "transcript-chunk"]
    assert all(chunks)
    transcript = Transcript.from_event(events[-2])
    assert "".join(chunks) == transcript.text and transcript.language == "en"
    await streams_ended(app)
    (finals,) = wyoming_finals(sub).values()
    assert transcript.text == " ".join(t for t in finals if t) and transcript.text


async def test_non_streaming_client_and_other_formats(app: App) -> None:
    """As an older Home Assistant: wait for ``transcript``, skipping what it does not know.

    Two requests on one connection: 48 kHz 24-bit, then 8 kHz 8-bit mono.
    """
    sub = app.fanout.subscribe(kinds={"final"})
    texts = []
    async with wyoming_client(app) as client:
        for rate, width in ((48000, 3), (8000, 1)):
            await send_request(
                client, pcm(AUDIO / "fleurs-en-004.ogg", rate, width, 1), rate, width, 1
            )
            while True:
                event = await client.read_event()
                assert event is not None
                if Transcript.is_type(event.type):
                    texts.append(Transcript.from_event(event).text)
                    break
            assert (await client.read_event()).type == "transcript-stop"  # type: ignore[union-attr]
    await streams_ended(app)
    finals = wyoming_finals(sub)  # (the noisy 8-bit take may decode to nothing: no final)
    assert texts[0] and set(finals) <= {"wyoming-1", "wyoming-2"}
    assert texts == [" ".join(t for t in finals.get(f"wyoming-{n}", []) if t) for n in (1, 2)]


@pytest.mark.parametrize(("width", "channels"), [(1, 1), (2, 2), (3, 1), (4, 3)])
def test_every_wyoming_sample_width_decodes(width: int, channels: int) -> None:
    data = pcm(AUDIO / "LDC93S1_timit_sample.wav", 16000, width, channels)
    audio, _ = sf.read(AUDIO / "LDC93S1_timit_sample.wav", dtype="float32")
    decoded = decode_int_pcm(data, width, channels)
    assert len(decoded) == len(audio)
    assert np.abs(decoded - np.clip(audio, -1, 0.999)).max() <= 1.0 / (1 << (8 * width - 1))


async def test_bad_framing_closes_only_that_connection(
    app: App, caplog: pytest.LogCaptureFixture
) -> None:
    assert app.wyoming is not None
    port = app.wyoming.port
    async with wyoming_client(app) as good:
        bad_inputs = [
            (b"this is not a Wyoming event\n", "header line is not JSON"),
            (b'["type", "describe"]\n', "not a JSON object"),
            (json.dumps({"type": "audio-chunk", "payload_length": 1 << 30}).encode() + b"\n",
             "payload_length 1073741824 is over the limit"),
            (b"x" * (MAX_HEADER_BYTES + 10), f"header line over {MAX_HEADER_BYTES} bytes"),
        ]  # fmt: skip
        for data, reason in bad_inputs:
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="streamer.service.wyoming"):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(data)
                await writer.drain()
                assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""  # closed by the server
                writer.close()
            assert any(reason in r.getMessage() for r in caplog.records), (reason, caplog.text)
        await good.write_event(Describe().event())  # the other connection is unaffected
        event = await good.read_event()
        assert event is not None and Info.is_type(event.type)


async def test_a_language_the_server_does_not_allow_is_an_error_event(app: App) -> None:
    async with wyoming_client(app) as client:
        await client.write_event(Transcribe(language="de").event())
        event = await client.read_event()
        assert event is not None and Error.is_type(event.type)
        error = Error.from_event(event)
        assert error.code == "unsupported-language" and "'de'" in error.text
        assert await client.read_event() is None  # then the server closes


async def test_shutdown_sends_the_transcript_of_the_audio_taken(app: App) -> None:
    data = pcm(AUDIO / "fleurs-en-004.ogg", 16000, 2, 1)
    async with wyoming_client(app) as client:
        await client.write_event(Transcribe().event())
        await client.write_event(AudioStart(rate=16000, width=2, channels=1).event())
        await client.write_event(AudioChunk(rate=16000, width=2, channels=1, audio=data).event())
        assert (await client.read_event()).type == "transcript-start"  # type: ignore[union-attr]
        assert app.factory is not None
        async with asyncio.timeout(TIMEOUT):  # the chunk was fed
            while not any(r.session.buffer.end for r in app.factory.runners.values()):
                await asyncio.sleep(0.02)
        app.request_stop()
        events = await read_until(client, "transcript-stop")
        assert events[-2].type == "transcript" and events[-2].data["text"]
        assert await client.read_event() is None


# -- configuration ---------------------------------------------------------------------------


def test_config_rules_and_exposure_warning(tiny_whisper: Path) -> None:
    cfg = make_config(tiny_whisper, 10300)
    assert Config().wyoming == WyomingConfig(enabled=False, host="127.0.0.1", port=10300)
    with pytest.raises(ConfigError, match=r"needs websocket\.enabled"):
        validate_config(dataclasses.replace(cfg, websocket=WebSocketConfig(enabled=False)))
    clash = WyomingConfig(enabled=True, port=8765)
    with pytest.raises(ConfigError, match=r"wyoming\.port is websocket\.port \(8765\)"):
        validate_config(
            dataclasses.replace(cfg, websocket=WebSocketConfig(port=8765), wyoming=clash)
        )
    assert exposure_warnings(cfg, environ={}) == []
    wide = dataclasses.replace(cfg, wyoming=WyomingConfig(enabled=True, host="0.0.0.0"))
    (warning,) = exposure_warnings(wide, environ={"STREAMER_WS_TOKEN": "t"})
    assert "wyoming.host = '0.0.0.0'" in warning and "no authentication" in warning
