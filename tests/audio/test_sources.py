"""FileSource: exact tiling, pacing by deadlines (fake clock), closing and errors."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from streamer.audio.resample import load_audio
from streamer.audio.sources import FileSource, Source, block_samples
from streamer.errors import AudioError

DATA = Path(__file__).parents[1] / "data" / "audio"
CLIPS = [
    "jfk.flac",
    "common_voice_fr_17301936.mp3",
    "fleurs-en-004.ogg",
    "LDC93S1_timit_sample.wav",
]


class FakeTime:
    """A clock that only moves when slept on (plus an optional oversleep)."""

    def __init__(self, start: float = 1000.0, oversleep: float = 0.0) -> None:
        self.now = start
        self.oversleep = oversleep
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        self.now += delay + self.oversleep
        await asyncio.sleep(0)


async def collect(source: FileSource) -> list:
    return [block async for block in source.blocks()]


def assert_tiles(blocks, total: int, block: int) -> None:
    assert blocks[0].start == 0
    for prev, nxt in itertools.pairwise(blocks):
        assert nxt.start == prev.end
    assert blocks[-1].end == total
    assert all(len(b.samples) == block for b in blocks[:-1])
    assert 0 < len(blocks[-1].samples) <= block


@pytest.mark.parametrize("name", CLIPS)
async def test_fast_blocks_tile_the_whole_file(name):
    path = DATA / name
    expected = load_audio(path, 16000)
    t = time.perf_counter()
    blocks = await collect(FileSource(path, "s1", 16000, block_ms=100, realtime=False))
    elapsed = time.perf_counter() - t
    assert elapsed < 2.0  # an 11 s clip decodes in well under a second
    assert_tiles(blocks, len(expected), 1600)
    assert {(b.stream, b.sample_rate) for b in blocks} == {("s1", 16000)}
    assert all(b.samples.dtype == np.float32 and b.samples.ndim == 1 for b in blocks)
    np.testing.assert_allclose(np.concatenate([b.samples for b in blocks]), expected, atol=1e-6)


async def test_odd_block_size_and_rate_tile_exactly(tmp_path):
    path = tmp_path / "a.wav"
    x = np.random.default_rng(1).uniform(-0.5, 0.5, (8000 * 7 + 13, 2)).astype(np.float32)
    sf.write(path, x, 8000)
    src = FileSource(path, "odd", 22050, block_ms=33, realtime=False, decode_ms=70)
    blocks = await collect(src)
    expected = load_audio(path, 22050)
    assert_tiles(blocks, len(expected), block_samples(22050, 33))
    np.testing.assert_allclose(np.concatenate([b.samples for b in blocks]), expected, atol=1e-6)
    assert src.samples_emitted == len(expected)


async def test_big_file_is_decoded_incrementally(tmp_path):
    path = tmp_path / "long.wav"
    sf.write(path, np.zeros(22050 * 60, dtype=np.int16), 22050, subtype="PCM_16")
    src = FileSource(path, "long", 16000, realtime=False)
    agen = src.blocks()
    first = await agen.__anext__()
    assert first.start == 0
    reader = src._reader
    assert reader is not None and reader.chunk_frames == 22050 // 2  # 500 ms per hop
    rest = [b async for b in agen]
    assert rest[-1].end == 16000 * 60
    assert reader.closed


async def test_fast_mode_keeps_the_loop_responsive():
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    blocks = await collect(FileSource(DATA / "jfk.flac", "s", 16000, realtime=False))
    task.cancel()
    assert ticks >= len(blocks)


async def test_realtime_releases_blocks_at_their_deadlines():
    fake = FakeTime()
    src = FileSource(
        DATA / "LDC93S1_timit_sample.wav",
        "rt",
        22050,
        block_ms=10,
        clock=fake.clock,
        sleep=fake.sleep,
    )
    blocks = await collect(src)
    assert len(blocks) > 200
    # 10 ms at 22050 Hz is 220 samples (9.977 ms): deadlines follow the sample count.
    for b in blocks:
        assert b.arrival == pytest.approx(1000.0 + b.start / 22050, abs=1e-9)
    assert len(fake.sleeps) == len(blocks) - 1
    assert fake.sleeps == pytest.approx([220 / 22050] * (len(blocks) - 1), abs=1e-9)


async def test_realtime_oversleep_does_not_accumulate():
    fake = FakeTime(oversleep=0.003)  # every real sleep wakes a little late
    src = FileSource(DATA / "fleurs-en-004.ogg", "rt", 16000, clock=fake.clock, sleep=fake.sleep)
    released = [(b, fake.now) async for b in src.blocks()]
    lateness = [now - (1000.0 + b.start / 16000) for b, now in released]
    assert lateness[0] == 0
    assert max(lateness) == pytest.approx(0.003, abs=1e-9)  # 44 blocks, still only 3 ms late
    assert all(b.arrival == 1000.0 + b.start / 16000 for b, _ in released)  # the schedule


async def test_realtime_slow_consumer_catches_up_without_shifting_deadlines():
    fake = FakeTime()
    src = FileSource(DATA / "jfk.flac", "rt", 16000, clock=fake.clock, sleep=fake.sleep)
    arrivals = []
    async with contextlib.aclosing(src.blocks()) as blocks:
        async for b in blocks:
            arrivals.append(b.arrival - 1000.0)
            if len(arrivals) == 4:
                fake.now += 0.35  # the consumer spends 350 ms on block 3
            if len(arrivals) == 9:
                break
    # late blocks are released at once but keep their scheduled arrival: a live input
    # would have had them then, so latency counts the consumer's delay
    assert arrivals == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    assert fake.now - 1000.0 == pytest.approx(0.8)  # back on the original schedule
    assert src._reader is not None and src._reader.closed  # aclosing released it


async def test_break_then_close_releases_the_file():
    src = FileSource(DATA / "jfk.flac", "b", 16000, realtime=False)
    async for _ in src.blocks():
        break
    assert src._reader is not None
    src.close()
    assert src._reader.closed


async def test_fast_mode_never_sleeps():
    fake = FakeTime()
    src = FileSource(
        DATA / "fleurs-en-004.ogg",
        "f",
        16000,
        realtime=False,
        clock=fake.clock,
        sleep=fake.sleep,
    )
    blocks = await collect(src)
    assert fake.sleeps == [] and {b.arrival for b in blocks} == {1000.0}


async def test_close_ends_iteration_and_releases_the_file():
    src = FileSource(DATA / "jfk.flac", "c", 16000, realtime=False)
    seen = []
    async for b in src.blocks():
        seen.append(b)
        if len(seen) == 3:
            src.close()
    assert len(seen) == 3 and src.closed
    assert src._reader is not None and src._reader.closed


async def test_close_before_iteration_yields_nothing():
    src = FileSource(DATA / "jfk.flac", "c", 16000)
    src.close()
    assert await collect(src) == []
    with pytest.raises(RuntimeError, match="only once"):
        await collect(src)


async def test_cancel_while_waiting_for_a_deadline_releases_the_file():
    forever = asyncio.Event()
    got_first = asyncio.Event()

    async def sleep_forever(delay: float) -> None:
        await forever.wait()

    src = FileSource(DATA / "jfk.flac", "x", 16000, sleep=sleep_forever)

    async def consume():
        async for _ in src.blocks():
            got_first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_first.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert src._reader is not None and src._reader.closed


async def test_missing_file_raises_audio_error(tmp_path):
    path = tmp_path / "missing.flac"
    with pytest.raises(AudioError, match="no such file") as info:
        await collect(FileSource(path, "m", 16000))
    assert str(path) in str(info.value)


async def test_corrupt_file_raises_audio_error(tmp_path):
    path = tmp_path / "bad.ogg"
    path.write_bytes(b"\x00" * 4096)
    with pytest.raises(AudioError, match="cannot read audio file"):
        await collect(FileSource(path, "m", 16000, realtime=False))


def test_file_source_is_a_source_and_validates():
    assert isinstance(FileSource(DATA / "jfk.flac", "p", 16000), Source)
    with pytest.raises(ValueError, match="block_ms"):
        FileSource(DATA / "jfk.flac", "p", 16000, block_ms=0)
    with pytest.raises(ValueError, match="rate"):
        FileSource(DATA / "jfk.flac", "p", 0)
