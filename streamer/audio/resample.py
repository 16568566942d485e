"""Sample-rate conversion and audio file decoding.

Every audio path into the engine goes through here, so that all sources hand the
model the same thing: mono float32 at the model's rate. Resampling uses soxr (a
band-limited resampler); linear interpolation would alias speech energy above
the new Nyquist frequency back into the band the model listens to.

The chunked ``StreamResampler`` is bit-identical to one-shot ``resample`` on
the concatenated input (soxr keeps the filter state between chunks), so a
stream cut into microphone or WebSocket blocks resamples without seams.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any, Literal

import numpy as np
import soundfile as sf
import soxr

from streamer.errors import AudioError
from streamer.types import FloatArray

__all__ = [
    "AudioFileReader",
    "Quality",
    "StreamResampler",
    "load_audio",
    "resample",
    "resampled_length",
    "to_mono",
]

log = logging.getLogger(__name__)

Quality = Literal["HQ", "VHQ"]
_QUALITIES = ("HQ", "VHQ")


def _check_rate(name: str, rate: int) -> int:
    if isinstance(rate, bool) or not isinstance(rate, int | np.integer) or rate <= 0:
        raise ValueError(f"{name} must be a positive integer, got {rate!r}")
    return int(rate)


def _check_quality(quality: str) -> str:
    if quality not in _QUALITIES:
        raise ValueError(f"quality must be one of {_QUALITIES}, got {quality!r}")
    return quality


def to_mono(x: np.ndarray[Any, Any]) -> FloatArray:
    """Downmix ``frames × channels`` (or copy a 1-D signal) to a new 1-D float32 array.

    Channels are averaged, which keeps the level of a centred voice. Integer
    PCM is scaled to [-1, 1) by its type's range so that int16 input from a
    client and float input from a file land on the same scale.
    """
    arr = np.asarray(x)
    if arr.ndim not in (1, 2):
        raise AudioError(f"audio must be 1-D or frames×channels, got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        scale = float(-int(info.min)) if info.min < 0 else (int(info.max) + 1) / 2.0
        offset = 0.0 if info.min < 0 else scale
        arr = (arr.astype(np.float64) - offset) / scale
    if arr.ndim == 2:
        if arr.shape[1] == 0:
            raise AudioError("audio has zero channels")
        arr = arr[:, 0] if arr.shape[1] == 1 else arr.mean(axis=1, dtype=np.float64)
    # Always a new array: callers hand in buffers that get reused (PortAudio's).
    return np.array(arr, dtype=np.float32, copy=True, order="C")


def resampled_length(n: int, from_rate: int, to_rate: int) -> int:
    """Samples that ``resample`` returns for ``n`` input samples: round(n·to/from)."""
    return (2 * n * to_rate + from_rate) // (2 * from_rate)


def resample(
    x: np.ndarray[Any, Any], from_rate: int, to_rate: int, *, quality: Quality = "HQ"
) -> FloatArray:
    """Resample a whole signal (1-D, or frames×channels) to ``to_rate`` as float32.

    The output has ``resampled_length(len(x), from_rate, to_rate)`` frames.
    """
    from_rate = _check_rate("from_rate", from_rate)
    to_rate = _check_rate("to_rate", to_rate)
    _check_quality(quality)
    arr = np.ascontiguousarray(x, dtype=np.float32)
    if arr.ndim not in (1, 2):
        raise AudioError(f"audio must be 1-D or frames×channels, got shape {arr.shape}")
    if from_rate == to_rate or len(arr) == 0:
        shape = (resampled_length(len(arr), from_rate, to_rate), *arr.shape[1:])
        return arr.copy() if from_rate == to_rate else np.zeros(shape, dtype=np.float32)
    out = soxr.resample(arr, from_rate, to_rate, quality=quality)
    return np.ascontiguousarray(out, dtype=np.float32)


class StreamResampler:
    """Resample a signal that arrives in chunks of any size, without seams.

    ``process`` returns whatever output the filter can produce so far (soxr
    holds back a short delay line, so early chunks come out shorter);
    ``flush`` drains the filter at the end of the stream. The concatenated
    outputs equal ``resample`` of the concatenated input. After ``flush`` the
    resampler is finished; ``reset`` starts a new, independent sequence (used
    after a gap, when splicing the filter across missing audio would smear it).
    With equal rates it is a pass-through with no delay.
    """

    def __init__(
        self, from_rate: int, to_rate: int, *, channels: int = 1, quality: Quality = "HQ"
    ) -> None:
        self.from_rate = _check_rate("from_rate", from_rate)
        self.to_rate = _check_rate("to_rate", to_rate)
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.channels = channels
        self.quality: Quality = quality
        _check_quality(quality)
        self.samples_in = 0
        self.samples_out = 0
        self._finished = False
        self._stream: soxr.ResampleStream | None = None
        self.reset()

    @property
    def passthrough(self) -> bool:
        return self.from_rate == self.to_rate

    @property
    def finished(self) -> bool:
        """True after ``flush`` until ``reset``."""
        return self._finished

    def reset(self) -> None:
        """Forget the filter state and counters: the next chunk starts a new stream."""
        self._stream = (
            None
            if self.passthrough
            else soxr.ResampleStream(
                self.from_rate, self.to_rate, self.channels, dtype="float32", quality=self.quality
            )
        )
        self.samples_in = 0
        self.samples_out = 0
        self._finished = False

    def _coerce(self, chunk: np.ndarray[Any, Any]) -> FloatArray:
        arr = np.ascontiguousarray(chunk, dtype=np.float32)
        if self.channels == 1:
            if arr.ndim == 2 and arr.shape[1] == 1:
                arr = arr[:, 0]
            if arr.ndim != 1:
                raise ValueError(f"expected a 1-D mono chunk, got shape {arr.shape}")
        elif arr.ndim != 2 or arr.shape[1] != self.channels:
            raise ValueError(f"expected a (frames, {self.channels}) chunk, got shape {arr.shape}")
        return arr

    def _count(self, out: FloatArray) -> FloatArray:
        self.samples_out += len(out)
        return out

    def process(self, chunk: np.ndarray[Any, Any]) -> FloatArray:
        """Feed one chunk; return the output now available (possibly empty)."""
        if self._finished:
            raise RuntimeError("StreamResampler was flushed; call reset() to start again")
        arr = self._coerce(chunk)
        self.samples_in += len(arr)
        if self._stream is None:
            return self._count(arr.copy())
        if len(arr) == 0:
            return self._count(arr.copy())
        out = self._stream.resample_chunk(arr, last=False)
        return self._count(np.ascontiguousarray(out, dtype=np.float32))

    def flush(self) -> FloatArray:
        """End the stream: return the filter's held-back tail. Idempotent."""
        shape: tuple[int, ...] = (0,) if self.channels == 1 else (0, self.channels)
        empty = np.zeros(shape, dtype=np.float32)
        if self._finished or self._stream is None:
            self._finished = True
            return empty
        self._finished = True
        out = self._stream.resample_chunk(empty, last=True)
        return self._count(np.ascontiguousarray(out, dtype=np.float32))


def _open_sound_file(path: Path) -> sf.SoundFile:
    """Open ``path`` for reading or raise an AudioError that names it and why."""
    if not path.exists():
        raise AudioError(f"cannot read audio file {path}: no such file")
    if path.is_dir():
        raise AudioError(f"cannot read audio file {path}: is a directory")
    if not os.access(path, os.R_OK):
        raise AudioError(f"cannot read audio file {path}: permission denied")
    try:
        return sf.SoundFile(str(path))
    except sf.LibsndfileError as exc:
        reason = exc.error_string.rstrip(".") or str(exc)
        raise AudioError(f"cannot read audio file {path}: {reason}") from exc
    except (OSError, RuntimeError, TypeError, ValueError) as exc:
        raise AudioError(f"cannot read audio file {path}: {exc}") from exc


class AudioFileReader:
    """Decode an audio file incrementally to mono float32 at ``target_rate``.

    Reads ``chunk_frames`` source frames per ``read`` call, so a long file is
    never held in memory at once and each call is short enough for a worker
    thread. Any format libsndfile reads works (wav, flac, ogg/vorbis, opus, mp3).

    ``read`` and ``close`` may be called from different threads: ``close``
    never blocks, and if a ``read`` is in flight the reader closes the file
    itself when that read ends. This is what makes cancelling an
    ``asyncio.to_thread(reader.read)`` safe.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        target_rate: int,
        *,
        chunk_frames: int = 1 << 16,
        quality: Quality = "HQ",
    ) -> None:
        self.path = Path(path)
        self.target_rate = _check_rate("target_rate", target_rate)
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
        self.chunk_frames = chunk_frames
        self._file: sf.SoundFile | None = _open_sound_file(self.path)
        self.source_rate = int(self._file.samplerate)
        self.channels = int(self._file.channels)
        self._resampler = StreamResampler(self.source_rate, self.target_rate, quality=quality)
        self._lock = threading.Lock()
        self._closed = False
        self._eof = False

    def __enter__(self) -> AudioFileReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def read(self) -> FloatArray | None:
        """Return the next resampled chunk (may be empty), or None at the end or once closed."""
        try:
            with self._lock:
                return self._read_locked()
        finally:
            # A close() that found the lock held left the file to us; the flag is
            # set before close() tries the lock, so one of the two always closes.
            if self._closed:
                self._close_if_idle()

    def _read_locked(self) -> FloatArray | None:
        if self._closed or self._eof or self._file is None:
            return None
        try:
            data = self._file.read(self.chunk_frames, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError, OSError) as exc:
            raise AudioError(f"cannot decode audio file {self.path}: {exc}") from exc
        if len(data) == 0:
            self._eof = True
            return self._resampler.flush()
        return self._resampler.process(to_mono(data))

    def close(self) -> None:
        """Release the file. Thread-safe and non-blocking; idempotent."""
        self._closed = True
        self._close_if_idle()

    def _close_if_idle(self) -> None:
        if self._lock.acquire(blocking=False):
            try:
                if self._file is not None:
                    self._file.close()
                    self._file = None
            finally:
                self._lock.release()


def probe_audio(path: str | Path) -> float:
    """Duration in seconds of a readable audio file; ``AudioError`` otherwise.

    Lets the daemon reject a bad source before spending seconds loading a model.
    """
    with _open_sound_file(Path(path)) as f:
        return float(f.frames) / float(f.samplerate) if f.samplerate else 0.0


def load_audio(
    path: str | os.PathLike[str], target_rate: int, *, quality: Quality = "HQ"
) -> FloatArray:
    """Read a whole audio file as mono float32 at ``target_rate``.

    Raises AudioError (naming the path and the reason) when the file is
    missing, unreadable or not audio.
    """
    parts: list[FloatArray] = []
    with AudioFileReader(path, target_rate, quality=quality) as reader:
        while (chunk := reader.read()) is not None:
            parts.append(chunk)
    if not parts:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(parts).astype(np.float32, copy=False)
