"""VAD off the loop: bounded pieces in the shared pool, cheap detectors inline."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import soundfile as sf

from streamer.audio.vad import VAD_PIECE_SAMPLES, EnergyVad, SileroVad, score_speech

from ..service.test_ingest import CLIP


def clip() -> Any:
    audio, rate = sf.read(CLIP, dtype="float32")
    assert rate == 16000
    return audio


class Recording:
    """Wraps a detector; records each call's length and thread."""

    def __init__(self, vad: Any) -> None:
        self.vad = vad
        self.frame_samples = vad.frame_samples
        self.cheap = getattr(vad, "cheap", False)
        self.calls: list[tuple[int, int]] = []

    def process(self, samples: Any) -> Any:
        self.calls.append((len(samples), threading.get_ident()))
        return self.vad.process(samples)


async def test_a_long_block_is_scored_half_a_second_per_call_off_the_loop() -> None:
    audio = clip()
    vad = Recording(SileroVad())
    probs = await score_speech(vad, audio)
    assert max(n for n, _ in vad.calls) <= VAD_PIECE_SAMPLES and len(vad.calls) > 4
    assert threading.get_ident() not in {t for _, t in vad.calls}
    whole = SileroVad().process(audio)  # the same probabilities as one call
    np.testing.assert_allclose(probs, whole, atol=1e-6)


async def test_a_cheap_detector_runs_inline() -> None:
    audio = clip()
    vad = Recording(EnergyVad())
    probs = await score_speech(vad, audio)
    assert vad.calls == [(len(audio), threading.get_ident())]
    np.testing.assert_array_equal(probs, EnergyVad().process(audio))
