"""Voice-activity detection: per-frame speech probabilities for the core.

Silero VAD (the ``silero-vad`` package ships its model) scores 512-sample
frames at 16 kHz; an RMS-energy detector is the dependency-light fallback.
Both are stateful per stream, buffer the samples that do not fill a frame,
and are called off the event loop (``asyncio.to_thread``): the core receives
the probabilities as plain data.
"""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np

from streamer.types import FloatArray

FRAME_SAMPLES = 512  # at 16 kHz: 32 ms
#: The most audio one VAD call scores (16 kHz samples: 0.5 s). A stream handed
#: a long block (a client's 1 MiB frame is 32 s) queues several calls, so the
#: other streams' calls interleave with its own instead of waiting for all of it.
VAD_PIECE_SAMPLES = 8000
_silero_lock = threading.Lock()
_silero: Any = None  # the shared Silero model (see SileroVad)
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _vad_pool() -> ThreadPoolExecutor:
    """One small FIFO pool for every stream's VAD: bounded CPU, first come first served."""
    global _pool
    with _pool_lock:
        if _pool is None:
            workers = max(1, min(4, os.cpu_count() or 1))
            _pool = ThreadPoolExecutor(workers, thread_name_prefix="vad")
        return _pool


async def score_speech(
    vad: FrameVad, samples: FloatArray, piece: int = VAD_PIECE_SAMPLES
) -> FloatArray:
    """``vad.process(samples)`` off the loop, at most ``piece`` samples per call.

    A detector that says it is ``cheap`` (numpy over a few frames: microseconds)
    runs inline: a thread hop per block would cost more than the work, and with
    thousands of streams the hops, not the scoring, would bound the loop.
    """
    if getattr(vad, "cheap", False):
        return vad.process(samples)
    loop = asyncio.get_running_loop()
    pool = _vad_pool()
    parts = [
        await loop.run_in_executor(pool, vad.process, samples[i : i + piece])
        for i in range(0, len(samples), piece)
    ]
    if not parts:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(parts).astype(np.float32, copy=False)


class FrameVad(Protocol):
    frame_samples: int

    def process(self, samples: FloatArray) -> FloatArray:
        """Probabilities for every frame completed by ``samples``."""
        ...


class _Framer:
    def __init__(self, frame_samples: int) -> None:
        self.frame_samples = frame_samples
        self._rest = np.zeros(0, dtype=np.float32)

    def frames(self, samples: FloatArray) -> FloatArray:
        data = np.concatenate([self._rest, np.asarray(samples, dtype=np.float32)])
        n = len(data) // self.frame_samples
        self._rest = data[n * self.frame_samples :]
        return data[: n * self.frame_samples].reshape(n, self.frame_samples)


def _silero_model() -> Any:
    """The one Silero JIT model every stream shares (loaded on first use)."""
    global _silero
    with _silero_lock:  # torch.jit loading is not re-entrant-safe
        if _silero is None:
            from silero_vad import load_silero_vad

            _silero = load_silero_vad()
        return _silero


class SileroVad:
    """Silero VAD v5/v6 (JIT): one shared model, the recurrent state kept per stream.

    The JIT wrapper keeps a stream's state inside the module, so a module per
    stream used to be loaded (about 4 MB and 50 ms each, on the event loop).
    Here every stream calls the shared model's stateless 16 kHz network with
    its own state and context, exactly as the wrapper does: the same
    probabilities, for one model's memory (tests check both).
    """

    def __init__(self, sample_rate: int = 16000) -> None:
        if sample_rate != 16000:
            raise ValueError("Silero VAD runs on 16 kHz audio here")
        import torch

        self._torch = torch
        self._net = _silero_model()._model  # the 16 kHz network: (x, state) -> (p, state)
        self._state = torch.zeros(0)  # the wrapper's "no state yet"
        self._context = torch.zeros(1, int(self._net.context_size_samples))
        self.frame_samples = FRAME_SAMPLES
        self._framer = _Framer(FRAME_SAMPLES)

    def process(self, samples: FloatArray) -> FloatArray:
        frames = self._framer.frames(samples)
        torch = self._torch
        out = np.empty(len(frames), dtype=np.float32)
        keep = self._context.shape[1]
        with torch.inference_mode():
            for i, frame in enumerate(frames):
                x = torch.cat([self._context, torch.from_numpy(frame.copy())[None, :]], 1)
                prob, self._state = self._net(x, self._state)
                self._context = x[:, -keep:]
                out[i] = float(prob.item())
        return out


class EnergyVad:
    """Speech probability from frame RMS: 0 at ``floor_db``, 1 at ``floor_db + 20`` dB."""

    cheap = True  # see score_speech

    def __init__(self, frame_samples: int = FRAME_SAMPLES, floor_db: float = -45.0) -> None:
        self.frame_samples = frame_samples
        self.floor_db = floor_db
        self._framer = _Framer(frame_samples)

    def process(self, samples: FloatArray) -> FloatArray:
        frames = self._framer.frames(samples)
        if not len(frames):
            return np.zeros(0, dtype=np.float32)
        rms = np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1) + 1e-12)
        db = 20 * np.log10(rms)
        probs: FloatArray = np.clip((db - self.floor_db) / 20.0, 0.0, 1.0).astype(np.float32)
        return probs


def make_vad(backend: str, sample_rate: int) -> FrameVad:
    if backend == "silero":
        return SileroVad(sample_rate)
    if backend == "energy":
        return EnergyVad()
    raise ValueError(f"unknown VAD backend {backend!r}")
