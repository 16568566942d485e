"""Microphone capture through PortAudio (sounddevice).

PortAudio calls our callback on its own real-time thread. The callback does
the least it can (downmix and copy the block, stamp it) and hands it to the
event loop with ``loop.call_soon_threadsafe``; everything else (queueing,
resampling, AudioBlock building) happens on the loop. It never blocks and never
raises into PortAudio.

Overflow policy: the hand-over queue holds at most ``queue_blocks`` device
blocks. When the consumer falls behind and the queue is full, the incoming
block is dropped, counted (``overflows``) and logged at most every few
seconds. Dropped audio is not replaced: the next block's ``start`` jumps
forward by the samples lost, so every sample's timestamp stays its true
position in the stream (sample counts are the clock) and latency figures stay
honest; consumers see a gap, not invented silence. PortAudio's own input
overflow flag (audio lost before it reached us, count unknown) is counted in
``input_overflows``.

``sounddevice`` is imported lazily, so the rest of the package works on a
machine without PortAudio; a missing library becomes a one-line DeviceError.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamer.audio.resample import Quality, StreamResampler, resampled_length, to_mono
from streamer.audio.sources import block_samples
from streamer.errors import DeviceError
from streamer.types import AudioBlock, FloatArray

__all__ = [
    "DeviceInfo",
    "MicrophoneSource",
    "format_devices",
    "import_sounddevice",
    "list_devices",
    "resolve_device",
]

log = logging.getLogger(__name__)

PORTAUDIO_HINT = "PortAudio is not installed: apt-get install libportaudio2"
_LOG_INTERVAL_S = 5.0


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """One capture-capable PortAudio device."""

    index: int
    name: str
    max_input_channels: int
    default_samplerate: float
    is_default: bool = False


def import_sounddevice() -> Any:
    """Import sounddevice, turning a missing or broken PortAudio into a DeviceError."""
    try:
        return importlib.import_module("sounddevice")
    except OSError as exc:  # sounddevice raises OSError('PortAudio library not found')
        raise DeviceError(f"{PORTAUDIO_HINT} ({exc})") from exc
    except ImportError as exc:
        raise DeviceError(
            f"the sounddevice package is not installed: pip install sounddevice ({exc})"
        ) from exc
    except Exception as exc:  # PortAudioError from Pa_Initialize at import
        raise DeviceError(f"PortAudio could not be initialised: {exc}") from exc


def _default_input_index(sd: Any) -> int | None:
    default = getattr(sd, "default", None)
    value = getattr(default, "device", None)
    if value is not None and not isinstance(value, int | str):
        try:
            value = value[0]
        except (IndexError, KeyError, TypeError):
            return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def list_devices(sd: Any = None) -> list[DeviceInfo]:
    """The input-capable devices PortAudio sees (possibly none), default marked.

    Raises DeviceError when PortAudio is missing or cannot list devices.
    """
    sd = import_sounddevice() if sd is None else sd
    try:
        raw = list(sd.query_devices())
    except Exception as exc:  # sounddevice.PortAudioError
        raise DeviceError(f"cannot list audio devices: {exc}") from exc
    default = _default_input_index(sd)
    out = []
    for pos, dev in enumerate(raw):
        channels = int(dev.get("max_input_channels", 0))
        if channels <= 0:
            continue
        index = int(dev.get("index", pos))
        out.append(
            DeviceInfo(
                index=index,
                name=str(dev.get("name", f"device {index}")),
                max_input_channels=channels,
                default_samplerate=float(dev.get("default_samplerate", 0.0)),
                is_default=index == default,
            )
        )
    return out


def format_devices(devices: Sequence[DeviceInfo] | None = None, *, sd: Any = None) -> str:
    """A table of input devices for ``streamer devices``; ``*`` marks the default."""
    devices = list_devices(sd) if devices is None else devices
    if not devices:
        return "no audio input devices found"
    width = max(4, *(len(d.name) for d in devices))
    lines = [f"  {'index':>5}  {'name':<{width}}  {'inputs':>6}  {'rate':>6}"]
    for d in devices:
        mark = "*" if d.is_default else " "
        rate = f"{d.default_samplerate:.0f}"
        inputs = d.max_input_channels
        lines.append(f"{mark} {d.index:>5}  {d.name:<{width}}  {inputs:>6}  {rate:>6}")
    return "\n".join(lines)


def _available(devices: Sequence[DeviceInfo]) -> str:
    return ", ".join(f"{d.index}: {d.name!r}" for d in devices) or "none"


def resolve_device(device: str | int | None, sd: Any = None) -> DeviceInfo:
    """Pick a capture device by index, by case-insensitive name substring, or the default.

    A string of digits is an index. A name matching several devices must
    match one of them exactly (ignoring case). Raises DeviceError listing the
    input devices when nothing fits.
    """
    devices = list_devices(sd)
    if not devices:
        raise DeviceError("no audio input device found (is a microphone or sound card attached?)")
    if device is None:
        return next((d for d in devices if d.is_default), devices[0])
    if isinstance(device, str) and device.strip().isdigit():
        device = int(device.strip())
    if isinstance(device, int):
        for d in devices:
            if d.index == device:
                return d
        raise DeviceError(
            f"no audio input device with index {device}; input devices: {_available(devices)}"
        )
    wanted = device.strip().casefold()
    matches = [d for d in devices if wanted in d.name.casefold()]
    exact = [d for d in matches if d.name.casefold() == wanted]
    if len(matches) == 1 or len(exact) == 1:
        return exact[0] if exact else matches[0]
    if not matches:
        raise DeviceError(
            f"no audio input device matches {device!r}; input devices: {_available(devices)}"
        )
    raise DeviceError(f"audio input device {device!r} is ambiguous: {_available(matches)}")


@dataclass(frozen=True, slots=True)
class _Captured:
    """One device block as handed from the PortAudio thread to the loop."""

    start: int  # first frame, counted in device frames since the stream opened
    samples: FloatArray  # mono, device rate
    arrival: float  # time.monotonic() in the callback
    input_overflow: bool


class MicrophoneSource:
    """Capture one stream from a PortAudio input device as AudioBlocks.

    The device is opened by ``blocks()`` (at ``device_rate``, or the device's
    default rate when None) with ``block_ms`` blocks and ``channels`` channels,
    downmixed to mono and resampled to ``target_rate`` when the rates differ.
    Block sizes vary slightly when resampling (the filter's delay); ``start``
    counts target-rate samples from the first captured sample, and jumps over
    dropped blocks (see the module docstring). ``arrival`` is the monotonic
    time at which the device block reached the callback.

    ``sd`` replaces the sounddevice module (tests inject a fake).
    """

    def __init__(
        self,
        stream: str,
        target_rate: int,
        device: str | int | None = None,
        block_ms: int = 100,
        channels: int = 1,
        device_rate: int | None = None,
        queue_blocks: int = 50,
        sd: Any = None,
        *,
        quality: Quality = "HQ",
    ) -> None:
        if target_rate <= 0:
            raise ValueError(f"target_rate must be positive, got {target_rate}")
        if block_ms <= 0:
            raise ValueError(f"block_ms must be positive, got {block_ms}")
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if device_rate is not None and device_rate <= 0:
            raise ValueError(f"device_rate must be positive, got {device_rate}")
        if queue_blocks < 1:
            raise ValueError(f"queue_blocks must be >= 1, got {queue_blocks}")
        self.stream = stream
        self.target_rate = target_rate
        self.device = device
        self.block_ms = block_ms
        self.channels = channels
        self.queue_blocks = queue_blocks
        self.quality: Quality = quality
        self._requested_rate = device_rate
        self._sd = sd
        self.device_info: DeviceInfo | None = None
        self.device_rate: int | None = device_rate
        self._overflows = 0
        self._input_overflows = 0
        self._frames = 0  # device frames seen by the callback (callback thread only)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[_Captured | None] | None = None
        self._pa_stream: Any = None
        self._started = False
        self._closed = False  # close() was called (any thread)
        self._ended = False  # the end marker is queued (loop thread)
        self._last_log = -math.inf
        self._unlogged = 0

    def __repr__(self) -> str:
        return f"MicrophoneSource(stream={self.stream!r}, device={self.device!r})"

    @property
    def overflows(self) -> int:
        """Device blocks dropped because the consumer fell ``queue_blocks`` behind."""
        return self._overflows

    @property
    def input_overflows(self) -> int:
        """Callbacks that PortAudio flagged with input overflow (audio lost upstream)."""
        return self._input_overflows

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop capturing: ``blocks()`` yields what is already queued, then ends.

        Non-blocking, idempotent, callable from any thread; the device itself is
        stopped and released by ``blocks()`` on its way out.
        """
        if self._closed:
            return
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        """Schedule the end of the stream from any thread.

        It goes through the same ``call_soon_threadsafe`` FIFO as the blocks, so
        every block captured before ``close()`` returned is still queued ahead
        of the end marker.
        """
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # RuntimeError: the loop is closed
            loop.call_soon_threadsafe(self._end)

    # -- PortAudio thread -------------------------------------------------

    def _callback(self, indata: Any, frames: int, time_info: Any, status: Any) -> None:
        """Runs on PortAudio's thread: copy, stamp, hand over. Never raises."""
        try:
            start = self._frames
            self._frames += frames
            loop = self._loop
            if self._closed or loop is None:
                return
            item = _Captured(
                start=start,
                samples=to_mono(indata),
                arrival=time.monotonic(),
                input_overflow=bool(getattr(status, "input_overflow", False)),
            )
            loop.call_soon_threadsafe(self._enqueue, item)
        except RuntimeError:  # the loop closed under us
            pass
        except Exception:
            log.exception("%s: error in the audio callback", self.stream)

    def _finished(self) -> None:
        """PortAudio's finished_callback: the stream stopped (by us, or the device went away)."""
        if not self._closed:
            log.warning("%s: audio input stream stopped unexpectedly", self.stream)
        self._wake()

    # -- event loop ---------------------------------------------------------

    def _end(self) -> None:
        if not self._ended and self._queue is not None:
            self._ended = True
            self._queue.put_nowait(None)  # the queue is unbounded: the marker always fits

    def _enqueue(self, item: _Captured) -> None:
        if item.input_overflow:
            self._input_overflows += 1
            self._log_loss()
        if self._ended or self._queue is None:
            return
        if self._queue.qsize() >= self.queue_blocks:
            self._overflows += 1
            self._log_loss()
            return
        self._queue.put_nowait(item)

    def _log_loss(self) -> None:
        """Warn about lost audio at most every few seconds, with the running counts."""
        self._unlogged += 1
        now = time.monotonic()
        if now - self._last_log < _LOG_INTERVAL_S:
            return
        log.warning(
            "%s: audio lost (%d events since last report): %d blocks dropped because the "
            "consumer is behind, %d input overflows reported by PortAudio",
            self.stream,
            self._unlogged,
            self._overflows,
            self._input_overflows,
        )
        self._last_log = now
        self._unlogged = 0

    def _open(self) -> Any:
        """Resolve the device and start the PortAudio stream (worker thread)."""
        sd = import_sounddevice() if self._sd is None else self._sd
        info = resolve_device(self.device, sd)
        if self.channels > info.max_input_channels:
            raise DeviceError(
                f"audio input device {info.index} ({info.name!r}) has "
                f"{info.max_input_channels} input channels, {self.channels} requested"
            )
        rate = self._requested_rate or round(info.default_samplerate)
        if rate <= 0:
            raise DeviceError(f"audio input device {info.name!r} reports no sample rate")
        self.device_info, self.device_rate = info, rate
        errors: tuple[type[BaseException], ...] = (OSError, ValueError, RuntimeError)
        pa_error = getattr(sd, "PortAudioError", None)
        if isinstance(pa_error, type) and issubclass(pa_error, BaseException):
            errors = (*errors, pa_error)
        try:
            stream = sd.InputStream(
                samplerate=rate,
                blocksize=block_samples(rate, self.block_ms),
                device=info.index,
                channels=self.channels,
                dtype="float32",
                callback=self._callback,
                finished_callback=self._finished,
            )
            stream.start()
        except errors as exc:
            raise DeviceError(
                f"cannot open audio input device {info.index} ({info.name!r}) at {rate} Hz, "
                f"{self.channels} channel(s): {exc}"
            ) from exc
        log.info("%s: capturing from %r at %d Hz", self.stream, info.name, rate)
        return stream

    async def _open_in_thread(self) -> Any:
        """Open in a worker thread; if cancelled meanwhile, release what it opens."""
        task = asyncio.ensure_future(asyncio.to_thread(self._open))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(self._shut_opened)
            raise

    def _shut_opened(self, task: asyncio.Future[Any]) -> None:
        self._closed = True
        if not task.cancelled() and task.exception() is None:
            asyncio.get_running_loop().run_in_executor(None, self._shut, task.result())

    @staticmethod
    def _shut(stream: Any) -> None:
        try:
            stream.stop()
        finally:
            stream.close()

    async def blocks(self) -> AsyncIterator[AudioBlock]:
        """Open the device and yield its audio until ``close()`` or the device stops.

        Raises DeviceError when PortAudio or the device is missing. May be
        iterated once.
        """
        if self._started:
            raise RuntimeError(f"{self!r}: blocks() can be iterated only once")
        self._started = True
        if self._closed:
            return
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()  # bounded by _enqueue's queue_blocks check
        self._pa_stream = await self._open_in_thread()
        try:
            async with contextlib.aclosing(self._resampled(self._queue)) as blocks:
                async for block in blocks:
                    yield block
        finally:
            self._closed = self._ended = True
            stream, self._pa_stream = self._pa_stream, None
            await asyncio.to_thread(self._shut, stream)

    async def _resampled(
        self, queue: asyncio.Queue[_Captured | None]
    ) -> AsyncGenerator[AudioBlock, None]:
        rate = self.device_rate
        assert rate is not None
        resampler = StreamResampler(rate, self.target_rate, quality=self.quality)
        expected = 0  # next device frame if nothing was dropped
        position = 0  # next output sample, target rate
        arrival: float | None = None
        while (item := await queue.get()) is not None:
            if item.start != expected:  # blocks were dropped: close this run, jump ahead
                tail = resampler.flush()
                if len(tail):
                    yield self._block(position, tail, arrival)
                    position += len(tail)
                resampler.reset()
                position = max(position, resampled_length(item.start, rate, self.target_rate))
            expected = item.start + len(item.samples)
            arrival = item.arrival
            out = resampler.process(item.samples)
            if len(out):
                yield self._block(position, out, arrival)
                position += len(out)
        tail = resampler.flush()
        if len(tail):
            yield self._block(position, tail, arrival)

    def _block(self, start: int, samples: FloatArray, arrival: float | None) -> AudioBlock:
        return AudioBlock(
            stream=self.stream,
            start=start,
            samples=np.ascontiguousarray(samples, dtype=np.float32),
            sample_rate=self.target_rate,
            arrival=arrival,
        )
