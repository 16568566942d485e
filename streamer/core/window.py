"""The audio a stream still needs, addressed by absolute sample index.

Samples are the clock: ``start`` is the index of the first retained sample and
``end`` the index after the last one. Appends never copy the history (chunks
are joined lazily), and ``trim`` drops everything no window can reach again,
so a stream that runs for days holds only seconds of audio.
"""

from __future__ import annotations

import numpy as np

from streamer.types import FloatArray


class AudioBuffer:
    def __init__(self, start: int = 0) -> None:
        self._start = start
        self._chunks: list[FloatArray] = []
        self._length = 0

    @property
    def start(self) -> int:
        return self._start

    @property
    def end(self) -> int:
        return self._start + self._length

    def __len__(self) -> int:
        return self._length

    def append(self, samples: FloatArray) -> None:
        if samples.ndim != 1:
            raise ValueError("audio must be mono (1-D)")
        if len(samples):
            self._chunks.append(np.asarray(samples, dtype=np.float32))
            self._length += len(samples)

    def _joined(self) -> FloatArray:
        if len(self._chunks) > 1:
            self._chunks = [np.concatenate(self._chunks)]
        return self._chunks[0] if self._chunks else np.zeros(0, dtype=np.float32)

    def slice(self, start: int, end: int) -> FloatArray:
        """A copy of samples ``[start, end)``; the range must be retained."""
        if start < self._start or end > self.end or start > end:
            raise IndexError(f"[{start}, {end}) outside retained [{self._start}, {self.end})")
        data = self._joined()
        return data[start - self._start : end - self._start].copy()

    def trim(self, before: int) -> None:
        """Forget samples before ``before`` (clamped to the retained range)."""
        cut = min(max(before, self._start), self.end) - self._start
        if cut <= 0:
            return
        data = self._joined()
        self._chunks = [data[cut:]] if cut < len(data) else []
        self._start += cut
        self._length -= cut
