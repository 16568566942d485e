"""Microphone capture through PortAudio (sounddevice), surviving unplugs.

PortAudio calls our callback on its own real-time thread. The callback does
the least it can (downmix and copy the block, stamp it) and hands it to the
event loop with ``loop.call_soon_threadsafe``; everything else (queueing,
resampling, AudioBlock building, fault handling) happens on the loop. It never
blocks and never raises into PortAudio.

Overflow policy: the hand-over queue holds at most ``queue_blocks`` device
blocks. When the consumer falls behind and the queue is full, the incoming
block is dropped, counted (``overflows``) and logged at most every few
seconds. Dropped audio is not replaced: the next block's ``start`` jumps
forward by the samples lost, so every sample's timestamp stays its true
position in the stream (sample counts are the clock) and latency figures stay
honest; consumers see a gap, not invented silence. PortAudio's own input
overflow flag (audio lost before it reached us, count unknown) is counted in
``input_overflows``.

A microphone that stops delivering (unplugged: no callback for
``stall_timeout_s``, PortAudio's finished callback, an error in the callback)
is *lost*: the stream is released and reopened with capped exponential
backoff and jitter, the device found again by name (its index changes when
it comes back). An outage is not a gap in the stream: audio that was never
captured has no position, so blocks after it continue at the sample where
the last one ended, and the consumer learns of the outage from ``on_state``.
PortAudio lists devices only when it is initialised, so a reopen first
re-initialises it, but only while no stream of the process is open (that
would close them all; see ``_PortAudio``).

``sounddevice`` is imported lazily, so the rest of the package works on a
machine without PortAudio; a missing library becomes a one-line DeviceError.
Listing and choosing devices is ``streamer.audio.devices``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import threading
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

# format_devices and resolve_device are re-exported: they lived here before devices.py
from streamer.audio.devices import (
    DeviceInfo,
    format_devices,
    import_sounddevice,
    inputs_summary,
    list_devices,
    resolve_device,
    select_device,
    stable_device_name,
)
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
    "stable_device_name",
]

log = logging.getLogger(__name__)

_LOG_INTERVAL_S = 5.0
RELEASE_TIMEOUT_S = 5.0  # a device that is gone may hang in stop(); do not wait forever

OnState = Callable[[str, str], None]


class _PortAudio:
    """Open PortAudio streams of the process, counted per sounddevice module.

    PortAudio enumerates devices once, in ``Pa_Initialize``: a microphone
    plugged in later stays invisible until PortAudio is terminated and
    initialised again, and that closes every open stream under its
    sounddevice object. So ``refresh`` does it only while no stream is open;
    opening and refreshing share one lock so they never interleave. With
    another microphone running, a reopen uses the list as it was, which still
    works when the device comes back under the same ALSA card.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._open: Counter[int] = Counter()

    def opened(self, sd: Any) -> None:
        with self.lock:
            self._open[id(sd)] += 1

    def closed(self, sd: Any) -> None:
        with self.lock:
            self._open[id(sd)] -= 1
            if self._open[id(sd)] <= 0:
                del self._open[id(sd)]

    def refresh(self, sd: Any) -> bool:
        """Re-enumerate devices if no stream is open; True when it did."""
        terminate = getattr(sd, "_terminate", None)
        initialize = getattr(sd, "_initialize", None)
        if not (callable(terminate) and callable(initialize)):
            return False
        with self.lock:
            if self._open[id(sd)]:
                return False
            with contextlib.suppress(Exception):  # e.g. not initialised after a failed refresh
                terminate()
            try:
                initialize()
            except Exception as exc:
                raise DeviceError(f"PortAudio could not be initialised again: {exc}") from exc
            return True


_PORTAUDIO = _PortAudio()


@dataclass(frozen=True, slots=True)
class _Captured:
    """One device block as handed from the PortAudio thread to the loop."""

    epoch: int  # which opening of the device it came from
    start: int  # first frame, counted in device frames since that opening
    samples: FloatArray  # mono, device rate
    arrival: float  # time.monotonic() in the callback
    input_overflow: bool


@dataclass(frozen=True, slots=True)
class _Stopped:
    """An opening of the device stopped delivering (why, for the logs and on_state)."""

    epoch: int
    reason: str


class _Capture:
    """One opening of the device: its PortAudio stream, callbacks and frame count.

    Items handed over carry the epoch, so late callbacks of a stream already
    given up are recognised and dropped.
    """

    def __init__(
        self, owner: MicrophoneSource, epoch: int, info: DeviceInfo, rate: int, sd: Any
    ) -> None:
        self.owner = owner
        self.epoch = epoch
        self.info = info
        self.rate = rate
        self.sd = sd
        self.stream: Any = None
        self.frames = 0  # PortAudio thread only
        self.released = False
        self.failed = False

    def callback(self, indata: Any, frames: int, time_info: Any, status: Any) -> None:
        """Runs on PortAudio's thread: copy, stamp, hand over. Never raises."""
        try:
            start = self.frames
            self.frames += frames
            if self.released or self.owner.closed:
                return
            overflow = bool(getattr(status, "input_overflow", False))
            item = _Captured(self.epoch, start, to_mono(indata), time.monotonic(), overflow)
        except Exception as exc:
            if not self.failed:  # once per opening: the stream is then reopened
                self.failed = True
                log.exception("%s: error in the audio callback", self.owner.stream)
                self.owner._post(_Stopped(self.epoch, f"error in the audio callback: {exc}"))
            return
        self.owner._post(item)

    def finished(self) -> None:
        """PortAudio's finished_callback: the stream stopped by itself (or by us)."""
        if not (self.released or self.owner.closed):
            self.owner._post(_Stopped(self.epoch, "the input stream stopped unexpectedly"))

    def shut(self) -> None:
        """Stop and close the stream (worker thread); a vanished device's errors are logged."""
        self.released = True
        stream, self.stream = self.stream, None
        if stream is None:
            return
        try:
            for step in (stream.stop, stream.close):
                try:
                    step()
                except Exception as exc:  # PortAudioError from a device that is gone
                    log.debug("%s: %s: %s", self.owner.stream, step.__name__, exc)
        finally:
            _PORTAUDIO.closed(self.sd)


class MicrophoneSource:
    """Capture one stream from a PortAudio input device as AudioBlocks.

    The device is opened by ``open()`` or else by ``blocks()`` (at
    ``device_rate``, or the device's default rate when None) with ``block_ms``
    blocks and ``channels`` channels, downmixed to mono and resampled to
    ``target_rate`` when the rates differ. Block sizes vary slightly when
    resampling (the filter's delay); ``start`` counts target-rate samples from
    the first captured sample and jumps over dropped blocks (see the module
    docstring), never over an outage. ``arrival`` is the monotonic time at
    which the device block reached the callback.

    Losing the device (see the module docstring): after ``stall_timeout_s``
    without a callback (default ``max(1 s, 5 blocks)``) or when PortAudio
    stops the stream, the stream is released and reopened after
    ``reopen_min_s``, doubling up to ``reopen_max_s``, each wait jittered to
    50-100 %. The delay starts over after a stream that ran ``reopen_max_s``,
    so a flapping device backs off too. Reopening finds the device by the
    configured name, or by the name of the device last opened when it was
    configured by index or as the default. ``required=False``: a device that
    cannot be opened at start is lost from the start instead of an error.

    ``on_state(state, detail)`` is called on the event loop thread, from
    inside the iteration of ``blocks()`` (the consumer's task, between two
    blocks), never from PortAudio's thread; it must not block, and what it
    raises is logged and ignored:

    * ``"lost"``: once per outage, after every block captured before it has
      been yielded (and, for a consumer that processes each block before
      asking for the next, processed); ``detail`` says why ("no audio for
      1 s", "the input stream stopped unexpectedly", or the open error when a
      ``required=False`` device is missing at start, before any block).
    * ``"restored"``: once, when the device is open again, before the first
      block after the outage; ``detail`` names device, index, rate and
      outage. That block's ``start`` is the previous block's ``end``.

    No call for ``close()``, and none after it. ``sd`` replaces the
    sounddevice module (tests inject a fake); ``clock`` times the
    rate-limited log lines and ``rng`` the jitter (tests).
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
        required: bool = True,
        on_state: OnState | None = None,
        stall_timeout_s: float | None = None,
        reopen_min_s: float = 0.5,
        reopen_max_s: float = 30.0,
        retry_log_interval_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
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
        if stall_timeout_s is not None and stall_timeout_s <= 0:
            raise ValueError(f"stall_timeout_s must be positive, got {stall_timeout_s}")
        if not 0 < reopen_min_s <= reopen_max_s:
            raise ValueError(
                f"need 0 < reopen_min_s <= reopen_max_s, got {reopen_min_s}, {reopen_max_s}"
            )
        self.stream = stream
        self.target_rate = target_rate
        self.device = device
        self.block_ms = block_ms
        self.channels = channels
        self.queue_blocks = queue_blocks
        self.quality: Quality = quality
        self.required = required
        self.on_state = on_state
        self.stall_timeout_s = stall_timeout_s or max(1.0, 5 * block_ms / 1000)
        self.reopen_min_s = reopen_min_s
        self.reopen_max_s = reopen_max_s
        self.retry_log_interval_s = retry_log_interval_s
        self._clock = clock
        self._rng = rng or random.Random()
        self._requested_rate = device_rate
        self._sd = sd
        self.device_info: DeviceInfo | None = None
        self.device_rate: int | None = device_rate
        self._overflows = 0
        self._input_overflows = 0
        self._losses = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[_Captured | _Stopped | None] | None = None
        self._closing: asyncio.Event | None = None
        self._epoch = 0
        self._current: _Capture | None = None
        self._state = "idle"  # idle | capturing | lost | closed
        self._startup_error: str | None = None
        self._started = False
        self._closed = False  # close() was called (any thread)
        self._ended = False  # the end marker is queued (loop thread)
        self._last_log = -math.inf
        self._unlogged = 0
        self._delay = reopen_min_s
        self._lost_at = self._restored_at = -math.inf
        self._attempts = 0
        self._retry_logged_at = -math.inf

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
    def losses(self) -> int:
        """Outages so far (a device missing at start counts as one)."""
        return self._losses

    @property
    def state(self) -> str:
        """``idle`` (not opened yet), ``capturing``, ``lost`` or ``closed``."""
        return self._state

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop capturing: ``blocks()`` yields what is already queued, then ends.

        Non-blocking, idempotent, callable from any thread; ends a lost
        source's wait at once. The device itself is stopped and released by
        ``blocks()`` on its way out.
        """
        if self._closed:
            return
        self._closed = True
        loop = self._loop
        if loop is not None:
            # Same call_soon_threadsafe FIFO as the blocks: every block captured
            # before close() returned is still queued ahead of the end marker.
            with contextlib.suppress(RuntimeError):  # RuntimeError: the loop is closed
                loop.call_soon_threadsafe(self._end)

    # -- any thread -------------------------------------------------------

    def _post(self, item: _Captured | _Stopped) -> None:
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed under us
                loop.call_soon_threadsafe(self._enqueue, item)

    # -- event loop -------------------------------------------------------

    def _end(self) -> None:
        if self._closing is not None:
            self._closing.set()
        if not self._ended and self._queue is not None:
            self._ended = True
            self._queue.put_nowait(None)  # the queue is unbounded: the marker always fits

    def _enqueue(self, item: _Captured | _Stopped) -> None:
        if isinstance(item, _Captured) and item.input_overflow:
            self._input_overflows += 1
            self._log_loss()
        if self._ended or self._queue is None:
            return
        if isinstance(item, _Captured) and self._queue.qsize() >= self.queue_blocks:
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

    def _notify(self, state: str, detail: str) -> None:
        if self.on_state is None:
            return
        try:
            self.on_state(state, detail)
        except Exception:
            log.exception("%s: on_state(%r) failed", self.stream, state)

    # -- opening ------------------------------------------------------------

    def _open(self, epoch: int, target: str | int | None, refresh: bool) -> _Capture:
        """Resolve the device and start a PortAudio stream (worker thread)."""
        sd = import_sounddevice() if self._sd is None else self._sd
        with _PORTAUDIO.lock:
            if refresh and _PORTAUDIO.refresh(sd):
                log.debug("%s: PortAudio re-enumerated the devices", self.stream)
            devices = list_devices(sd)
            info = select_device(target, devices)
            if self.channels > info.max_input_channels:
                raise DeviceError(
                    f"audio input device {info.index} ({info.name!r}) has "
                    f"{info.max_input_channels} input channels, {self.channels} requested; "
                    f"input devices: {inputs_summary(devices)}"
                )
            rate = self._requested_rate or round(info.default_samplerate)
            if rate <= 0:
                raise DeviceError(f"audio input device {info.name!r} reports no sample rate")
            errors: tuple[type[BaseException], ...] = (OSError, ValueError, RuntimeError)
            pa_error = getattr(sd, "PortAudioError", None)
            if isinstance(pa_error, type) and issubclass(pa_error, BaseException):
                errors = (*errors, pa_error)
            capture = _Capture(self, epoch, info, rate, sd)
            try:
                capture.stream = sd.InputStream(
                    samplerate=rate,
                    blocksize=block_samples(rate, self.block_ms),
                    device=info.index,
                    channels=self.channels,
                    dtype="float32",
                    callback=capture.callback,
                    finished_callback=capture.finished,
                )
                _PORTAUDIO.opened(sd)
                capture.stream.start()
            except errors as exc:
                capture.shut()
                raise DeviceError(
                    f"cannot open audio input device {info.index} ({info.name!r}) at {rate} Hz, "
                    f"{self.channels} channel(s): {exc}; input devices: {inputs_summary(devices)}"
                ) from exc
        return capture

    async def _open_unless_closed(self, target: str | int | None, refresh: bool) -> _Capture | None:
        """Open in a worker thread; None if closed meanwhile. Whatever opens after a
        close or a cancellation is released when it does."""
        assert self._closing is not None
        self._epoch += 1
        task = asyncio.ensure_future(asyncio.to_thread(self._open, self._epoch, target, refresh))
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait({task, closing}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.add_done_callback(self._shut_opened)
            raise
        finally:
            closing.cancel()
        if self._closed or not task.done():
            task.add_done_callback(self._shut_opened)
            return None
        capture = task.result()  # raises DeviceError
        self.device_info, self.device_rate = capture.info, capture.rate
        return capture

    def _shut_opened(self, task: asyncio.Future[_Capture]) -> None:
        self._closed = True
        if not task.cancelled() and task.exception() is None:
            asyncio.get_running_loop().run_in_executor(None, task.result().shut)

    async def _release(self, capture: _Capture) -> None:
        capture.released = True
        task = asyncio.ensure_future(asyncio.to_thread(capture.shut))
        try:
            await asyncio.wait_for(asyncio.shield(task), RELEASE_TIMEOUT_S)
        except TimeoutError:
            log.warning(
                "%s: the audio device did not close within %g s; moving on",
                self.stream,
                RELEASE_TIMEOUT_S,
            )

    def _reopen_target(self) -> str | int | None:
        """What to look for again: a configured name, else the last device's name."""
        device = self.device
        if isinstance(device, str) and not device.strip().isdigit():
            return device
        if self.device_info is not None:
            return stable_device_name(self.device_info.name)
        return device

    async def open(self) -> bool:
        """Open the device now, so that a missing microphone fails before READY.

        True when capturing. A device that cannot be opened raises DeviceError
        (with the list of input devices) when ``required``, else is logged
        and the source starts lost (False): ``blocks()`` reports ``"lost"``
        first and keeps trying. Called by ``blocks()`` when not called before;
        the caller must then iterate ``blocks()`` on the same loop.
        """
        if self._state != "idle" or self._closed:
            return self._current is not None
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._queue = asyncio.Queue()  # bounded by _enqueue's queue_blocks check
            self._closing = asyncio.Event()
        try:
            capture = await self._open_unless_closed(self.device, refresh=False)
        except DeviceError as exc:
            if self.required:
                raise
            self._state, self._startup_error = "lost", str(exc)
            self._lost_at = time.monotonic()
            self._losses += 1
            self._retry_logged_at = self._clock()
            log.warning(
                "%s: cannot open the audio input, continuing without it and retrying: %s",
                self.stream,
                exc,
                extra={"stream": self.stream},
            )
            return False
        if capture is None:
            return False
        self._current, self._state = capture, "capturing"
        log.info("%s: capturing from %r at %d Hz", self.stream, capture.info.name, capture.rate)
        return True

    # -- the stream -----------------------------------------------------------

    async def blocks(self) -> AsyncIterator[AudioBlock]:
        """Yield the microphone's audio until ``close()``, across outages.

        Raises DeviceError when PortAudio or a ``required`` device is missing
        at start. May be iterated once. The device is released when the
        iterator ends, is closed (``contextlib.aclosing``) or its task is
        cancelled.
        """
        if self._started:
            raise RuntimeError(f"{self!r}: blocks() can be iterated only once")
        self._started = True
        try:
            if self._closed:
                return
            if self._state == "idle":
                await self.open()
            async with contextlib.aclosing(self._supervise()) as blocks:
                async for block in blocks:
                    yield block
        finally:
            self._closed = self._ended = True
            self._state = "closed"
            capture, self._current = self._current, None
            if capture is not None:
                await self._release(capture)

    async def _supervise(self) -> AsyncGenerator[AudioBlock, None]:
        """Capture, lose, reopen, capture...: one output sample count throughout."""
        position = 0  # next output sample, target rate
        if self._current is None and self._startup_error is not None:
            self._notify("lost", self._startup_error)
        while not self._closed:
            capture = self._current
            if capture is None:
                capture = await self._reopen()
                if capture is None:
                    return
                self._restored(capture)
            rate = capture.rate
            resampler = StreamResampler(rate, self.target_rate, quality=self.quality)
            base = position
            expected = 0  # next device frame of this opening if nothing was dropped
            arrival: float | None = None
            last = time.monotonic()
            reason: str | None = None
            while (item := await self._next(capture.epoch, last)) is not None:
                if item.epoch != capture.epoch:
                    continue  # a late callback of an opening already given up
                if isinstance(item, _Stopped):
                    reason = item.reason
                    break
                last = arrival = item.arrival
                if item.start != expected:  # blocks were dropped: close this run, jump ahead
                    tail = resampler.flush()
                    if len(tail):
                        yield self._block(position, tail, arrival)
                        position += len(tail)
                    resampler.reset()
                    jump = base + resampled_length(item.start, rate, self.target_rate)
                    position = max(position, jump)
                expected = item.start + len(item.samples)
                out = resampler.process(item.samples)
                if len(out):
                    yield self._block(position, out, arrival)
                    position += len(out)
            tail = resampler.flush()
            if len(tail):
                yield self._block(position, tail, arrival)
                position += len(tail)
            if reason is None:
                return
            self._lost(capture, reason)
            await self._release(capture)

    async def _next(self, epoch: int, last: float) -> _Captured | _Stopped | None:
        """The next item, or a stall once ``stall_timeout_s`` passed since ``last``."""
        queue = self._queue
        assert queue is not None
        while True:
            if not queue.empty():  # a consumer that was away is not a stalled device
                return queue.get_nowait()
            remaining = last + self.stall_timeout_s - time.monotonic()
            if remaining <= 0:
                return _Stopped(epoch, f"no audio for {self.stall_timeout_s:g} s")
            with contextlib.suppress(TimeoutError):
                return await asyncio.wait_for(queue.get(), remaining)

    def _lost(self, capture: _Capture, reason: str) -> None:
        capture.released = True
        self._current, self._state = None, "lost"
        self._losses += 1
        now = time.monotonic()
        if now - self._restored_at >= self.reopen_max_s:
            self._delay = self.reopen_min_s  # it ran a while: not a flapping device
        self._lost_at, self._attempts = now, 0
        log.warning(
            "%s: audio input %r lost (%s); reopening it",
            *(self.stream, capture.info.name, reason),
            extra={"stream": self.stream},
        )
        self._notify("lost", reason)

    def _restored(self, capture: _Capture) -> None:
        self._current, self._state = capture, "capturing"
        now = time.monotonic()
        outage, self._restored_at = now - self._lost_at, now
        detail = (
            f"{capture.info.name!r} (index {capture.info.index}) at {capture.rate} Hz "
            f"after {outage:.1f} s"
        )
        log.warning(
            "%s: audio input restored: %s", self.stream, detail, extra={"stream": self.stream}
        )
        self._notify("restored", detail)

    async def _reopen(self) -> _Capture | None:
        """Retry with backoff until the device opens (None: closed meanwhile)."""
        assert self._closing is not None
        while not self._closed:
            delay = self._delay
            self._delay = min(delay * 2, self.reopen_max_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self._rng.uniform(delay / 2, delay))
            if self._closed:
                return None
            self._attempts += 1
            try:
                return await self._open_unless_closed(self._reopen_target(), refresh=True)
            except DeviceError as exc:
                self._log_retry(exc)
        return None

    def _log_retry(self, exc: DeviceError) -> None:
        """One line per failed attempt at most every ``retry_log_interval_s``."""
        log.debug("%s: reopen attempt %d failed: %s", self.stream, self._attempts, exc)
        now = self._clock()
        if now - self._retry_logged_at < self.retry_log_interval_s:
            return
        self._retry_logged_at = now
        log.warning(
            "%s: cannot reopen the audio input (attempt %d, %.0f s since it was lost; "
            "next try within %.1f s): %s",
            self.stream,
            self._attempts,
            time.monotonic() - self._lost_at,
            self._delay,
            exc,
            extra={"stream": self.stream},
        )

    def _block(self, start: int, samples: FloatArray, arrival: float | None) -> AudioBlock:
        return AudioBlock(
            stream=self.stream,
            start=start,
            samples=np.ascontiguousarray(samples, dtype=np.float32),
            sample_rate=self.target_rate,
            arrival=arrival,
        )
