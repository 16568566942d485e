"""MicrophoneSource driven by a fake sounddevice from another thread; device listing."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import itertools
import logging
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

from streamer.audio import capture
from streamer.audio.capture import (
    DeviceInfo,
    MicrophoneSource,
    format_devices,
    list_devices,
    resolve_device,
)
from streamer.audio.resample import resample, resampled_length, to_mono
from streamer.audio.sources import Source
from streamer.errors import DeviceError

DATA = Path(__file__).parents[1] / "data" / "audio"
TIMEOUT = 10.0

DEVICES = [
    {"index": 0, "name": "HDMI Output", "max_input_channels": 0, "default_samplerate": 48000.0},
    {"index": 1, "name": "USB Microphone", "max_input_channels": 2, "default_samplerate": 44100.0},
    {"index": 2, "name": "Built-in Mic", "max_input_channels": 1, "default_samplerate": 16000.0},
    {"index": 3, "name": "USB Microphone (monitor)", "max_input_channels": 2,
     "default_samplerate": 48000.0},
]  # fmt: skip


class FakePortAudioError(Exception):
    pass


class FakeStatus:
    def __init__(self, input_overflow: bool = False) -> None:
        self.input_overflow = input_overflow

    def __bool__(self) -> bool:
        return self.input_overflow


class FakeInputStream:
    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs
        self.callback = kwargs["callback"]
        self.finished_callback = kwargs.get("finished_callback")
        self.started = threading.Event()
        self.stopped = False
        self.closed = threading.Event()

    def start(self) -> None:
        self.started.set()

    def stop(self) -> None:
        self.stopped = True
        if self.finished_callback is not None:
            self.finished_callback()  # PortAudio calls it once the stream is inactive

    def close(self) -> None:
        self.closed.set()

    def feed(self, block: np.ndarray, status: FakeStatus | None = None) -> None:
        """What PortAudio's thread does: call back with a buffer it then reuses."""
        buf = np.array(block, dtype=np.float32, copy=True)
        self.callback(buf, len(buf), None, status or FakeStatus())
        buf[:] = 12345.0  # the source must have copied it


class FakeSD:
    """Module-like stand-in for sounddevice."""

    PortAudioError = FakePortAudioError

    def __init__(self, devices=DEVICES, default_input=1, fail_open: str | None = None) -> None:
        self.devices = devices
        self.default = SimpleNamespace(device=[default_input, 0])
        self.fail_open = fail_open
        self.streams: list[FakeInputStream] = []
        self.opened = threading.Event()

    def query_devices(self):
        return [dict(d) for d in self.devices]

    def InputStream(self, **kwargs) -> FakeInputStream:
        if self.fail_open:
            raise FakePortAudioError(self.fail_open)
        stream = FakeInputStream(**kwargs)
        self.streams.append(stream)
        self.opened.set()
        return stream

    def wait_stream(self) -> FakeInputStream:
        assert self.opened.wait(TIMEOUT)
        stream = self.streams[-1]
        assert stream.started.wait(TIMEOUT)
        return stream


@pytest.fixture(scope="module")
def jfk() -> tuple[np.ndarray, int]:
    data, rate = sf.read(DATA / "jfk.flac", dtype="float32", always_2d=True)
    assert (rate, data.shape[1]) == (44100, 2)
    return data, rate


def chunks(data: np.ndarray, size: int) -> list[np.ndarray]:
    return [data[i : i + size] for i in range(0, len(data), size)]


async def take(agen, n: int) -> list:
    return [await asyncio.wait_for(agen.__anext__(), TIMEOUT) for _ in range(n)]


async def drain(agen) -> list:
    async def run():
        return [b async for b in agen]

    return await asyncio.wait_for(run(), TIMEOUT)


def assert_tiles(blocks) -> None:
    for prev, nxt in itertools.pairwise(blocks):
        assert nxt.start == prev.end


# -- capture --------------------------------------------------------------


async def test_recorded_audio_from_callback_thread_reconstructs_resampled_stream(jfk):
    data, rate = jfk
    sd = FakeSD()
    src = MicrophoneSource("mic0", 16000, device="usb microphone", channels=2, sd=sd,
                           queue_blocks=1000)  # fmt: skip
    assert isinstance(src, Source)

    def play() -> None:
        stream = sd.wait_stream()
        for block in chunks(data, stream.kwargs["blocksize"]):
            stream.feed(block)
        src.close()  # from another thread, as a signal handler thread might

    player = threading.Thread(target=play)
    player.start()
    blocks = await drain(src.blocks())
    await asyncio.to_thread(player.join, TIMEOUT)

    stream = sd.streams[0]
    assert stream.kwargs["device"] == 1 and stream.kwargs["samplerate"] == 44100
    assert stream.kwargs["channels"] == 2 and stream.kwargs["dtype"] == "float32"
    assert stream.kwargs["blocksize"] == 4410
    assert stream.stopped and stream.closed.is_set()
    assert src.device_rate == 44100 and src.device_info.name == "USB Microphone"

    expected = resample(to_mono(data), rate, 16000)
    assert blocks[0].start == 0
    assert_tiles(blocks)
    assert blocks[-1].end == len(expected) == 176000
    got = np.concatenate([b.samples for b in blocks])
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    assert all(b.stream == "mic0" and b.sample_rate == 16000 for b in blocks)
    arrivals = [b.arrival for b in blocks]
    assert all(a is not None for a in arrivals) and arrivals == sorted(arrivals)
    assert src.overflows == 0 and src.input_overflows == 0


async def test_same_rate_is_passed_through_block_for_block():
    data, _ = sf.read(DATA / "LDC93S1_timit_sample.wav", dtype="float32", always_2d=True)
    sd = FakeSD()
    src = MicrophoneSource("m", 16000, device=2, sd=sd, block_ms=50, queue_blocks=100)
    agen = src.blocks()
    first = asyncio.create_task(agen.__anext__())
    stream = await asyncio.to_thread(sd.wait_stream)
    assert stream.kwargs["samplerate"] == 16000 and stream.kwargs["blocksize"] == 800
    await asyncio.to_thread(lambda: [stream.feed(b) for b in chunks(data, 800)])
    src.close()
    blocks = [await asyncio.wait_for(first, TIMEOUT), *await drain(agen)]
    assert [len(b.samples) for b in blocks] == [len(c) for c in chunks(data, 800)]
    assert_tiles(blocks)
    np.testing.assert_array_equal(np.concatenate([b.samples for b in blocks]), data[:, 0])


async def test_full_queue_drops_blocks_counts_them_and_keeps_timestamps_honest(jfk, caplog):
    data, _ = jfk
    sd = FakeSD()
    src = MicrophoneSource("m", 16000, device=1, channels=2, queue_blocks=2, sd=sd)
    parts = chunks(data, 4410)
    agen = src.blocks()
    first = asyncio.create_task(agen.__anext__())
    stream = await asyncio.to_thread(sd.wait_stream)
    await asyncio.to_thread(stream.feed, parts[0])
    got = [await asyncio.wait_for(first, TIMEOUT)]
    # The consumer now stops reading: 2 blocks fit in the queue, 7 are dropped.
    with caplog.at_level(logging.WARNING, logger="streamer.audio.capture"):
        await asyncio.to_thread(lambda: [stream.feed(p) for p in parts[1:10]])
    assert src.overflows == 7
    lost = [r for r in caplog.records if "audio lost" in r.getMessage()]
    assert len(lost) == 1  # rate-limited: one report for the burst
    got += await take(agen, 2)
    await asyncio.to_thread(lambda: [stream.feed(p) for p in parts[10:12]])
    src.close()
    got += await drain(agen)

    # Device blocks 0-2 were kept, 3-9 dropped, 10-11 kept.
    before = [b for b in got if b.start < 16000]
    after = [b for b in got if b.start >= 16000]
    assert_tiles(before)
    assert_tiles(after)
    assert before[0].start == 0 and before[-1].end == resampled_length(3 * 4410, 44100, 16000)
    assert after[0].start == resampled_length(10 * 4410, 44100, 16000) == 16000
    assert after[-1].end == 16000 + resampled_length(2 * 4410, 44100, 16000)
    mono = to_mono(data)
    np.testing.assert_allclose(
        np.concatenate([b.samples for b in before]),
        resample(mono[: 3 * 4410], 44100, 16000),
        atol=1e-6,
    )
    np.testing.assert_allclose(
        np.concatenate([b.samples for b in after]),
        resample(mono[10 * 4410 : 12 * 4410], 44100, 16000),
        atol=1e-6,
    )
    assert src.overflows == 7  # nothing raised anywhere


async def test_portaudio_input_overflow_flags_are_counted():
    sd = FakeSD()
    src = MicrophoneSource("m", 16000, device=2, sd=sd)
    agen = src.blocks()
    first = asyncio.create_task(agen.__anext__())
    stream = await asyncio.to_thread(sd.wait_stream)
    flags = [False, True, True, False, True]
    await asyncio.to_thread(
        lambda: [stream.feed(np.zeros((1600, 1)), FakeStatus(f)) for f in flags]
    )
    src.close()
    blocks = [await asyncio.wait_for(first, TIMEOUT), *await drain(agen)]
    assert len(blocks) == 5 and src.input_overflows == 3 and src.overflows == 0


async def test_device_that_stops_by_itself_ends_the_stream(caplog):
    sd = FakeSD()
    src = MicrophoneSource("m", 16000, device=2, sd=sd)
    agen = src.blocks()
    first = asyncio.create_task(agen.__anext__())
    stream = await asyncio.to_thread(sd.wait_stream)
    await asyncio.to_thread(stream.feed, np.ones((1600, 1)) * 0.1)
    await asyncio.wait_for(first, TIMEOUT)
    with caplog.at_level(logging.WARNING, logger="streamer.audio.capture"):
        await asyncio.to_thread(stream.finished_callback)  # unplugged
        assert await drain(agen) == []
    assert "stopped unexpectedly" in caplog.text
    assert stream.closed.is_set()


async def test_cancelling_the_consumer_releases_the_device():
    sd = FakeSD()
    src = MicrophoneSource("m", 16000, device=2, sd=sd)
    agen = src.blocks()
    first = asyncio.create_task(agen.__anext__())
    stream = await asyncio.to_thread(sd.wait_stream)
    await asyncio.to_thread(stream.feed, np.zeros((1600, 1)))
    await asyncio.wait_for(first, TIMEOUT)
    waiting = asyncio.create_task(agen.__anext__())  # parked on the empty queue
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert stream.stopped and stream.closed.is_set() and src.closed
    stream.feed(np.zeros((1600, 1)))  # a late callback is ignored, never raises


async def test_cancelling_while_the_device_opens_still_releases_it():
    sd = FakeSD()
    src = MicrophoneSource("m", 16000, sd=sd)
    task = asyncio.create_task(drain(src.blocks()))
    stream = await asyncio.to_thread(sd.wait_stream)
    task.cancel()  # possibly before the worker thread's open() has returned
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(stream.closed.wait, TIMEOUT)
    assert stream.stopped and src.closed


async def test_close_before_iteration_never_opens_the_device():
    sd = FakeSD()
    src = MicrophoneSource("m", 16000, sd=sd)
    src.close()
    async with contextlib.aclosing(src.blocks()) as agen:
        assert [b async for b in agen] == []
    assert sd.streams == []
    with pytest.raises(RuntimeError, match="only once"):
        await drain(src.blocks())


async def test_open_failure_and_channel_mismatch_raise_device_error():
    src = MicrophoneSource("m", 16000, device=1, sd=FakeSD(fail_open="Invalid sample rate"))
    with pytest.raises(
        DeviceError, match=r"cannot open audio input device 1 .*Invalid sample rate"
    ):
        await drain(src.blocks())
    src = MicrophoneSource("m", 16000, device="built-in", channels=2, sd=FakeSD())
    with pytest.raises(DeviceError, match="has 1 input channels, 2 requested"):
        await drain(src.blocks())
    src = MicrophoneSource("m", 16000, device="webcam", sd=FakeSD())
    with pytest.raises(DeviceError, match="no audio input device matches 'webcam'"):
        await drain(src.blocks())


def test_constructor_validates():
    for kwargs in ({"queue_blocks": 0}, {"block_ms": 0}, {"channels": 0}, {"device_rate": -1}):
        with pytest.raises(ValueError):
            MicrophoneSource("m", 16000, sd=FakeSD(), **kwargs)


# -- devices --------------------------------------------------------------


def test_list_devices_with_fake_lists_inputs_and_marks_default():
    devices = list_devices(FakeSD())
    assert devices == [
        DeviceInfo(1, "USB Microphone", 2, 44100.0, True),
        DeviceInfo(2, "Built-in Mic", 1, 16000.0, False),
        DeviceInfo(3, "USB Microphone (monitor)", 2, 48000.0, False),
    ]
    text = format_devices(devices)
    lines = text.splitlines()
    assert len(lines) == 4 and "HDMI" not in text
    assert lines[1].startswith("*") and "USB Microphone" in lines[1] and "44100" in lines[1]
    assert format_devices(sd=FakeSD()) == text
    assert format_devices([]) == "no audio input devices found"


def test_resolve_device_by_index_name_and_default():
    sd = FakeSD()
    assert resolve_device(None, sd).index == 1
    assert resolve_device(2, sd).name == "Built-in Mic"
    assert resolve_device(" 3 ", sd).index == 3
    assert resolve_device("BUILT-IN", sd).index == 2
    assert resolve_device("usb microphone", sd).index == 1  # exact name beats substrings
    assert resolve_device("monitor", sd).index == 3
    assert resolve_device(None, FakeSD(default_input=-1)).index == 1  # first input device


@pytest.mark.parametrize(
    ("device", "message"),
    [
        (0, "no audio input device with index 0; input devices: 1: 'USB Microphone', "),
        (9, "no audio input device with index 9"),
        ("webcam", "no audio input device matches 'webcam'; input devices: 1: 'USB Microphone'"),
        ("usb", "audio input device 'usb' is ambiguous: 1: 'USB Microphone', 3: "),
    ],
)
def test_resolve_device_errors_list_the_inputs(device, message):
    with pytest.raises(DeviceError) as info:
        resolve_device(device, FakeSD())
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_no_input_device_is_a_device_error():
    sd = FakeSD(devices=DEVICES[:1], default_input=-1)
    assert list_devices(sd) == []
    with pytest.raises(DeviceError, match="no audio input device found"):
        resolve_device(None, sd)


def test_missing_portaudio_is_a_one_line_device_error(monkeypatch):
    def no_portaudio(name: str):
        assert name == "sounddevice"
        raise OSError("PortAudio library not found")

    monkeypatch.setattr(capture.importlib, "import_module", no_portaudio)
    with pytest.raises(DeviceError) as info:
        list_devices()
    assert str(info.value) == (
        "PortAudio is not installed: apt-get install libportaudio2 (PortAudio library not found)"
    )
    assert info.value.exit_code == 78


async def test_microphone_without_portaudio_raises_device_error(monkeypatch):
    def no_portaudio(name: str):
        raise OSError("PortAudio library not found")

    monkeypatch.setattr(capture.importlib, "import_module", no_portaudio)
    with pytest.raises(DeviceError, match="libportaudio2"):
        await drain(MicrophoneSource("m", 16000).blocks())


async def test_real_sounddevice_lists_devices_or_explains_what_is_missing():
    try:
        importlib.import_module("sounddevice")
    except OSError:
        with pytest.raises(DeviceError, match=r"^PortAudio is not installed: apt-get install"):
            list_devices()
        return
    devices = list_devices()
    assert isinstance(devices, list)
    assert all(isinstance(d, DeviceInfo) and d.max_input_channels > 0 for d in devices)
    assert isinstance(format_devices(devices), str)
    if not devices:  # PortAudio present, no sound card (as on CI machines)
        with pytest.raises(DeviceError, match="no audio input device found"):
            await drain(MicrophoneSource("m", 16000).blocks())
