"""MicrophoneSource driven by a fake sounddevice from another thread."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import itertools
import logging
import random
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

from streamer.audio.capture import MicrophoneSource
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
    def __init__(self, sd: FakeSD, **kwargs) -> None:
        self.sd = sd
        self.kwargs = kwargs
        self.callback = kwargs["callback"]
        self.finished_callback = kwargs.get("finished_callback")
        self.started = threading.Event()
        self.stopped = False
        self.closed = threading.Event()
        self.stop_raises = False  # a device that is gone errors out of Pa_StopStream

    def start(self) -> None:
        self.started.set()

    def stop(self) -> None:
        self.stopped = True
        if self.finished_callback is not None:
            self.finished_callback()  # PortAudio calls it once the stream is inactive
        if self.stop_raises:
            raise FakePortAudioError("Unanticipated host error")

    def close(self) -> None:
        self.closed.set()

    def feed(self, block: np.ndarray, status: FakeStatus | None = None) -> None:
        """What PortAudio's thread does: call back with a buffer it then reuses."""
        buf = np.array(block, dtype=np.float32, copy=True)
        self.callback(buf, len(buf), None, status or FakeStatus())
        buf[:] = 12345.0  # the source must have copied it


class FakeSD:
    """Module-like stand-in for sounddevice.

    Like PortAudio, it lists the devices ``plugged`` when it was last
    initialised (``_initialize``); opening a listed device that has been
    unplugged since fails. It records a re-initialisation while one of its
    streams is open, which would pull the stream out from under its owner.
    """

    PortAudioError = FakePortAudioError

    def __init__(self, devices=DEVICES, default_input=1, fail_open: str | None = None) -> None:
        self.plugged = [dict(d) for d in devices]
        self.devices = [dict(d) for d in devices]
        self.default = SimpleNamespace(device=[default_input, 0])
        self.fail_open = fail_open
        self.streams: list[FakeInputStream] = []
        self.opened = threading.Event()
        self.changed = threading.Condition()
        self.refreshes = 0
        self.refreshed_while_open = 0
        self.on_refresh = None  # called with the refresh count, on the opening thread
        self.open_gate: threading.Event | None = None  # InputStream() waits on it when set
        self.opening = threading.Event()

    # -- what sounddevice offers
    def query_devices(self):
        return [dict(d) for d in self.devices]

    def InputStream(self, **kwargs) -> FakeInputStream:
        self.opening.set()
        if self.open_gate is not None:
            assert self.open_gate.wait(TIMEOUT)
        if self.fail_open:
            raise FakePortAudioError(self.fail_open)
        if kwargs["device"] not in {d["index"] for d in self.plugged}:
            raise FakePortAudioError("Device unavailable")
        stream = FakeInputStream(self, **kwargs)
        with self.changed:
            self.streams.append(stream)
            self.changed.notify_all()
        self.opened.set()
        return stream

    def _terminate(self) -> None:
        if any(not s.closed.is_set() for s in self.streams):
            self.refreshed_while_open += 1

    def _initialize(self) -> None:
        self.devices = [dict(d) for d in self.plugged]
        with self.changed:
            self.refreshes += 1
            self.changed.notify_all()
        if self.on_refresh is not None:
            self.on_refresh(self.refreshes)

    # -- what the test does
    def unplug(self, name: str) -> None:
        self.plugged = [d for d in self.plugged if d["name"] != name]

    def plug(self, device: dict) -> None:
        self.plugged = [*self.plugged, dict(device)]

    def wait_stream(self, count: int = 1) -> FakeInputStream:
        """The ``count``-th stream opened, once started (called in a worker thread)."""
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.streams) >= count, TIMEOUT)
            stream = self.streams[count - 1]
        assert stream.started.wait(TIMEOUT)
        return stream

    def wait_refreshes(self, count: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: self.refreshes >= count, TIMEOUT)


class States:
    """An ``on_state`` callback that records the calls and lets a test wait for them."""

    def __init__(self, fail: bool = False) -> None:
        self.seen: list[tuple[str, str]] = []
        self.threads: set[int] = set()
        self.fail = fail
        self._changed = asyncio.Event()

    def __call__(self, state: str, detail: str) -> None:
        self.seen.append((state, detail))
        self.threads.add(threading.get_ident())
        self._changed.set()
        if self.fail:
            raise RuntimeError("the daemon's handler broke")

    @property
    def states(self) -> list[str]:
        return [state for state, _ in self.seen]

    async def wait(self, count: int) -> tuple[str, str]:
        async with asyncio.timeout(TIMEOUT):
            while len(self.seen) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.seen[count - 1]


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
    for kwargs in (
        {"queue_blocks": 0},
        {"block_ms": 0},
        {"channels": 0},
        {"device_rate": -1},
        {"stall_timeout_s": 0},
        {"reopen_min_s": 0},
        {"reopen_min_s": 2, "reopen_max_s": 1},
    ):
        with pytest.raises(ValueError):
            MicrophoneSource("m", 16000, sd=FakeSD(), **kwargs)


# -- losing the device ---------------------------------------------------

FAST = {"stall_timeout_s": 0.2, "reopen_min_s": 0.01, "reopen_max_s": 0.05}
USB_HW1 = {"index": 1, "name": "USB PnP Sound Device: Audio (hw:1,0)", "max_input_channels": 2,
           "default_samplerate": 44100.0}  # fmt: skip
BUILTIN = DEVICES[2]


class Collector:
    """Consume ``blocks()`` in a task, the way the daemon's runner does."""

    def __init__(self, src: MicrophoneSource) -> None:
        self.blocks: list = []
        self.task = asyncio.create_task(self._run(src))

    async def _run(self, src: MicrophoneSource) -> None:
        async for block in src.blocks():
            self.blocks.append(block)

    async def done(self, timeout: float = TIMEOUT) -> list:
        await asyncio.wait_for(self.task, timeout)
        return self.blocks


def lines(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


async def feed(stream: FakeInputStream, parts) -> None:
    await asyncio.to_thread(lambda: [stream.feed(p) for p in parts])


async def test_stalled_device_is_lost_then_found_again_by_name_at_a_new_index(jfk, caplog):
    """Unplugged: callbacks stop. Configured by index, it comes back under another
    index and ALSA card; blocks continue where they stopped, without a gap."""
    data, _ = jfk
    parts = chunks(data, 4410)
    sd = FakeSD(devices=[DEVICES[0], USB_HW1, BUILTIN])
    states = States()
    src = MicrophoneSource("mic0", 16000, device=1, channels=2, sd=sd, queue_blocks=1000,
                           on_state=states, **FAST)  # fmt: skip
    caplog.set_level(logging.INFO, logger="streamer.audio.capture")
    consumer = Collector(src)
    first = await asyncio.to_thread(sd.wait_stream, 1)
    await feed(first, parts[:20])
    sd.unplug(USB_HW1["name"])

    assert await states.wait(1) == ("lost", "no audio for 0.2 s")
    assert src.state == "lost"
    assert await asyncio.to_thread(first.closed.wait, TIMEOUT) and first.stopped
    await asyncio.to_thread(sd.wait_refreshes, 3)  # reopen attempts: the device is not listed
    assert len(sd.streams) == 1
    sd.plug(USB_HW1 | {"index": 7, "name": "USB PnP Sound Device: Audio (hw:3,0)"})

    state, detail = await states.wait(2)
    assert state == "restored" and "(index 7) at 44100 Hz after" in detail
    second = await asyncio.to_thread(sd.wait_stream, 2)
    assert second.kwargs["device"] == 7 and src.device_info.index == 7
    await feed(second, parts[20:40])
    src.close()
    blocks = await consumer.done()

    assert states.states == ["lost", "restored"] and states.threads == {threading.get_ident()}
    assert blocks[0].start == 0
    assert_tiles(blocks)  # no gap for the outage: the stream clock did not jump
    mono = to_mono(data)
    expected = np.concatenate(
        [
            resample(mono[: 20 * 4410], 44100, 16000),
            resample(mono[20 * 4410 : 40 * 4410], 44100, 16000),
        ]
    )
    assert blocks[-1].end == len(expected) == 64000
    np.testing.assert_allclose(np.concatenate([b.samples for b in blocks]), expected, atol=1e-6)
    assert sd.refreshed_while_open == 0 and second.closed.is_set()
    assert len(lines(caplog, "lost (no audio for 0.2 s)")) == 1
    assert len(lines(caplog, "audio input restored")) == 1
    assert src.losses == 1 and src.state == "closed"


async def test_finished_callback_is_a_loss_and_the_device_comes_back(caplog):
    """PortAudio stops the stream by itself; stopping it then errors (the device is gone)."""
    data, _ = sf.read(DATA / "LDC93S1_timit_sample.wav", dtype="float32", always_2d=True)
    parts = chunks(data[: 16 * 1600], 1600)
    sd = FakeSD()
    states = States()
    src = MicrophoneSource("m", 16000, device="built-in mic", sd=sd, on_state=states,
                           **FAST | {"stall_timeout_s": 60.0})  # fmt: skip
    consumer = Collector(src)
    first = await asyncio.to_thread(sd.wait_stream, 1)
    await feed(first, parts[:8])
    first.stop_raises = True
    await asyncio.to_thread(first.finished_callback)

    assert await states.wait(1) == ("lost", "the input stream stopped unexpectedly")
    assert (await states.wait(2))[0] == "restored"
    second = await asyncio.to_thread(sd.wait_stream, 2)
    assert second.kwargs["device"] == 2
    await feed(second, parts[8:])
    src.close()
    blocks = await consumer.done()
    assert [b.start for b in blocks] == [1600 * i for i in range(16)]
    np.testing.assert_array_equal(np.concatenate([b.samples for b in blocks]), data[: 16 * 1600, 0])
    assert first.closed.is_set() and second.closed.is_set()


async def test_error_in_the_callback_is_a_loss_and_a_failing_handler_is_only_logged(caplog):
    sd = FakeSD()
    states = States(fail=True)
    src = MicrophoneSource("m", 16000, device=2, sd=sd, on_state=states, **FAST)
    consumer = Collector(src)
    first = await asyncio.to_thread(sd.wait_stream, 1)
    await feed(first, [np.zeros((1600, 1))])
    with caplog.at_level(logging.WARNING, logger="streamer.audio.capture"):
        await asyncio.to_thread(first.callback, np.zeros((2, 2, 2)), 2, None, FakeStatus())
        state, detail = await states.wait(1)
        assert state == "lost" and detail.startswith("error in the audio callback: audio must be")
        await states.wait(2)
        second = await asyncio.to_thread(sd.wait_stream, 2)
        await feed(second, [np.ones((1600, 1))])
        src.close()
        blocks = await consumer.done()
    assert [(b.start, b.end) for b in blocks] == [(0, 1600), (1600, 3200)]
    assert len(lines(caplog, "error in the audio callback")) >= 1
    assert len(lines(caplog, "on_state('lost') failed")) == 1
    assert len(lines(caplog, "on_state('restored') failed")) == 1


class RecordingRng(random.Random):
    def __init__(self) -> None:
        super().__init__(0)
        self.spans: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.spans.append((a, b))
        return a


async def test_optional_device_that_never_comes_back_backs_off_and_logs_at_a_bounded_rate(caplog):
    """required=False and missing: no error, "lost" first, then retries forever; the
    fake clock advances 10 s per attempt, so one line per 30 s is one per 3 attempts."""
    sd = FakeSD()
    rng = RecordingRng()
    states = States()
    src = MicrophoneSource("m", 16000, device="webcam", sd=sd, required=False, on_state=states,
                           retry_log_interval_s=30.0, clock=lambda: sd.refreshes * 10.0, rng=rng,
                           **FAST)  # fmt: skip
    sd.on_refresh = lambda n: src.close() if n == 20 else None
    with caplog.at_level(logging.WARNING, logger="streamer.audio.capture"):
        assert await src.open() is False
        assert src.state == "lost"
        assert await Collector(src).done() == []
    detail = states.seen[0][1]
    assert states.states == ["lost"]
    assert "no audio input device matches 'webcam'; input devices: 1: 'USB Microphone'" in detail
    assert sd.refreshes == 20 and sd.streams == []
    assert len(lines(caplog, "continuing without it")) == 1
    retries = lines(caplog, "cannot reopen the audio input")
    assert [int(r.split("attempt ")[1].split(",")[0]) for r in retries] == [3, 6, 9, 12, 15, 18]
    ceilings = [b for _, b in rng.spans]
    assert ceilings[:5] == pytest.approx([0.01, 0.02, 0.04, 0.05, 0.05])
    assert all(a == pytest.approx(b / 2) for a, b in rng.spans)


async def test_optional_device_missing_at_start_is_used_once_plugged_in():
    sd = FakeSD(devices=[DEVICES[0], BUILTIN])
    states = States()
    src = MicrophoneSource("m", 16000, device="USB Microphone", sd=sd, required=False,
                           on_state=states, **FAST)  # fmt: skip
    consumer = Collector(src)
    assert (await states.wait(1))[0] == "lost"
    await asyncio.to_thread(sd.wait_refreshes, 1)
    sd.plug(DEVICES[1] | {"index": 5, "max_input_channels": 1, "default_samplerate": 16000.0})
    assert (await states.wait(2))[0] == "restored"
    stream = await asyncio.to_thread(sd.wait_stream, 1)
    assert stream.kwargs["device"] == 5
    await feed(stream, [np.zeros((1600, 1))] * 3)
    src.close()
    blocks = await consumer.done()
    assert [b.start for b in blocks] == [0, 1600, 3200] and src.losses == 1


async def test_required_device_missing_at_start_fails_fast_with_the_device_list():
    src = MicrophoneSource("m", 16000, device="USB Microphone", sd=FakeSD(devices=[BUILTIN]))
    with pytest.raises(DeviceError) as info:
        await src.open()
    assert str(info.value) == (
        "no audio input device matches 'USB Microphone'; input devices: 2: 'Built-in Mic'"
    )
    assert info.value.exit_code == 78


async def test_close_while_lost_ends_blocks_at_once():
    sd = FakeSD()
    states = States()
    src = MicrophoneSource("m", 16000, device=2, sd=sd, on_state=states, stall_timeout_s=60.0,
                           reopen_min_s=30.0, reopen_max_s=30.0)  # fmt: skip
    consumer = Collector(src)
    stream = await asyncio.to_thread(sd.wait_stream, 1)
    await feed(stream, [np.zeros((1600, 1))])
    await asyncio.to_thread(stream.finished_callback)
    await states.wait(1)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await asyncio.to_thread(src.close)  # from another thread, as a signal handler might
    assert len(await consumer.done(timeout=2.0)) == 1
    assert loop.time() - t0 < 1.0 and states.states == ["lost"] and len(sd.streams) == 1


async def test_close_while_a_reopen_hangs_in_portaudio_ends_at_once_and_releases_it_later():
    sd = FakeSD()
    states = States()
    src = MicrophoneSource("m", 16000, device=2, sd=sd, on_state=states, **FAST)
    consumer = Collector(src)
    first = await asyncio.to_thread(sd.wait_stream, 1)
    sd.open_gate = threading.Event()  # the next Pa_OpenStream blocks
    sd.opening.clear()
    await asyncio.to_thread(first.finished_callback)
    await states.wait(1)
    assert await asyncio.to_thread(sd.opening.wait, TIMEOUT)
    src.close()
    assert await consumer.done(timeout=2.0) == []
    sd.open_gate.set()  # PortAudio returns the stream after all: it must be released
    late = await asyncio.to_thread(sd.wait_stream, 2)
    assert await asyncio.to_thread(late.closed.wait, TIMEOUT)
    assert states.states == ["lost"]


async def test_slow_consumer_is_not_a_stalled_device():
    """Blocks keep arriving while the consumer is away longer than the stall timeout."""
    sd = FakeSD()
    states = States()
    src = MicrophoneSource("m", 16000, device=2, sd=sd, on_state=states, stall_timeout_s=0.3)
    agen = src.blocks()
    first = asyncio.create_task(agen.__anext__())
    stream = await asyncio.to_thread(sd.wait_stream)

    def device() -> None:  # PortAudio keeps calling back, in real time, for 0.6 s
        for _ in range(20):
            stream.feed(np.zeros((1600, 1)))
            time.sleep(0.03)

    await asyncio.to_thread(device)  # the consumer is busy meanwhile
    got = [await asyncio.wait_for(first, TIMEOUT), *await take(agen, 19)]
    src.close()
    got += await drain(agen)
    assert len(got) == 20 and states.seen == [] and len(sd.streams) == 1


async def test_no_portaudio_refresh_while_another_microphone_is_open():
    """Re-initialising PortAudio would close the other stream: the lost one reopens from
    the list as it was, which works once the device is back under its old index."""
    sd = FakeSD()
    a_states, b_states = States(), States()
    a = MicrophoneSource("a", 16000, device=2, sd=sd, on_state=a_states, **FAST)
    b = MicrophoneSource("b", 16000, device="USB Microphone", sd=sd, on_state=b_states,
                         **FAST | {"stall_timeout_s": 60.0})  # fmt: skip
    a_run = Collector(a)
    a_stream = await asyncio.to_thread(sd.wait_stream, 1)
    stop = threading.Event()

    def keep_a_alive() -> None:
        while not stop.is_set():
            a_stream.feed(np.zeros((1600, 1)))
            stop.wait(0.02)

    feeder = asyncio.create_task(asyncio.to_thread(keep_a_alive))
    b_run = Collector(b)
    b_stream = await asyncio.to_thread(sd.wait_stream, 2)
    sd.unplug("USB Microphone")
    sd.opening.clear()
    await asyncio.to_thread(b_stream.finished_callback)
    await b_states.wait(1)
    # A reopen tries the device still listed (no refresh), and fails: it is unplugged.
    assert await asyncio.to_thread(sd.opening.wait, TIMEOUT)
    sd.plug(DEVICES[1])
    assert (await b_states.wait(2))[0] == "restored"
    assert sd.refreshes == 0 and sd.refreshed_while_open == 0 and b.losses == 1
    assert sd.streams[-1].kwargs["device"] == 1
    stop.set()
    await feeder
    a.close()
    b.close()
    await a_run.done()
    await b_run.done()
    assert a_states.seen == []


async def test_microphone_without_portaudio_raises_device_error(monkeypatch):
    def no_portaudio(name: str):
        raise OSError("PortAudio library not found")

    monkeypatch.setattr(importlib, "import_module", no_portaudio)
    with pytest.raises(DeviceError, match="libportaudio2"):
        await drain(MicrophoneSource("m", 16000).blocks())
