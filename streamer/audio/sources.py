"""Audio sources: where AudioBlocks come from.

A source turns some input (a file here, a microphone in ``capture.py``, a
WebSocket client in the service layer) into ``AudioBlock``s: mono float32 at
the model's rate, stamped with their absolute start sample. Samples are the
clock; wall time (``arrival``) is only for latency figures.

``FileSource`` replays a file either paced like a live input (to test and
demo the streaming path against real time) or as fast as possible (offline
``transcribe``). Decoding and resampling run in a worker thread, one chunk at
a time, so the event loop never waits on disk or on soxr.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from streamer.audio.resample import AudioFileReader, Quality
from streamer.types import AudioBlock

__all__ = ["FileSource", "Source", "block_samples"]

log = logging.getLogger(__name__)

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[object]]


@runtime_checkable
class Source(Protocol):
    """Anything that yields one stream's AudioBlocks.

    ``blocks()`` is an async iterator whose blocks tile the stream: each
    block's ``start`` equals the previous block's ``end``, except where a live
    source lost audio (then ``start`` jumps forward by the lost samples, so
    timestamps stay true; see ``MicrophoneSource``). The iterator ends when the
    input ends or the source is closed.
    """

    stream: str

    def blocks(self) -> AsyncIterator[AudioBlock]: ...


def block_samples(rate: int, block_ms: int) -> int:
    """Samples in one block of ``block_ms`` at ``rate`` (rounded, at least 1)."""
    if rate <= 0:
        raise ValueError(f"sample rate must be positive, got {rate}")
    if block_ms <= 0:
        raise ValueError(f"block_ms must be positive, got {block_ms}")
    return max(1, round(rate * block_ms / 1000))


class FileSource:
    """Replay an audio file as a stream of AudioBlocks.

    ``realtime=True`` releases block k at ``t0 + start_k / target_rate``, where
    ``t0`` is the clock when the first block is ready: deadlines come from the
    sample count, not from summed sleeps, so pacing does not drift, and a late
    block (slow consumer) is released at once without shifting later deadlines.
    ``realtime=False`` yields as fast as the consumer takes blocks, yielding
    to the event loop between blocks.

    All blocks have ``block_ms`` of audio except the last, which holds the
    remainder; together they tile ``[0, len(load_audio(path, target_rate)))``
    exactly. ``clock`` and ``sleep`` are injectable so tests can check pacing
    without waiting.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        stream: str,
        target_rate: int,
        block_ms: int = 100,
        realtime: bool = True,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        *,
        quality: Quality = "HQ",
        decode_ms: int = 500,
    ) -> None:
        self.path = Path(path)
        self.stream = stream
        self.target_rate = target_rate
        self.block_ms = block_ms
        self.block_samples = block_samples(target_rate, block_ms)
        self.realtime = realtime
        self.quality: Quality = quality
        if decode_ms <= 0:
            raise ValueError(f"decode_ms must be positive, got {decode_ms}")
        self._decode_ms = max(decode_ms, block_ms)
        self._clock = clock
        self._sleep = sleep
        self._reader: AudioFileReader | None = None
        self._started = False
        self._closed = False
        self.samples_emitted = 0

    def __repr__(self) -> str:
        mode = "realtime" if self.realtime else "fast"
        return f"FileSource({str(self.path)!r}, stream={self.stream!r}, {mode})"

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop the source: ``blocks()`` ends at its next step. Never blocks; idempotent."""
        self._closed = True
        if self._reader is not None:
            self._reader.close()

    def _open(self) -> AudioFileReader:
        reader = AudioFileReader(self.path, self.target_rate, quality=self.quality)
        # Decode about ``decode_ms`` of source audio per worker-thread hop.
        reader.chunk_frames = block_samples(reader.source_rate, self._decode_ms)
        return reader

    async def _open_in_thread(self) -> AudioFileReader:
        """Open in a worker thread; if cancelled meanwhile, close what it opens."""
        task = asyncio.ensure_future(asyncio.to_thread(self._open))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_close_opened)
            raise

    async def blocks(self) -> AsyncIterator[AudioBlock]:
        """Yield the file's blocks; raises AudioError if the file cannot be read.

        May be iterated once. The file is released when the iterator ends, is
        closed (``contextlib.aclosing``), its task is cancelled, or ``close()``
        is called; a bare ``break`` leaves it to garbage collection.
        """
        if self._started:
            raise RuntimeError(f"{self!r}: blocks() can be iterated only once")
        self._started = True
        if self._closed:
            return
        reader = await self._open_in_thread()
        self._reader = reader
        n = self.block_samples
        pending = np.zeros(0, dtype=np.float32)
        start = 0
        t0: float | None = None
        try:
            while not self._closed:
                if len(pending) < n and not reader.closed:
                    chunk = await asyncio.to_thread(reader.read)
                    if chunk is None:
                        reader.close()  # end of file: keep only the remainder
                    else:
                        pending = np.concatenate((pending, chunk)) if len(pending) else chunk
                    continue
                if len(pending) == 0:
                    return
                samples = pending[:n].copy()
                pending = pending[n:]
                due: float | None = None
                if self.realtime:
                    now = self._clock()
                    if t0 is None:
                        t0 = now
                    due = t0 + start / self.target_rate
                    await (self._sleep(due - now) if due > now else asyncio.sleep(0))
                else:
                    await asyncio.sleep(0)
                if self._closed:
                    return
                now = self._clock()
                block = AudioBlock(
                    stream=self.stream,
                    start=start,
                    samples=samples,
                    sample_rate=self.target_rate,
                    # a live input would have had this block at ``due`` even when the
                    # consumer (held back by a slow engine) takes it later
                    arrival=now if due is None else min(now, due),
                )
                start = block.end
                self.samples_emitted = start
                yield block
        finally:
            reader.close()


def _close_opened(task: asyncio.Future[AudioFileReader]) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result().close()
