"""Precision paths on the CPU: int8 Linear weights and bfloat16.

int8: the batched runner and the static decode step give each window exactly
the tokens of decoding it alone (``Decoder.run``) at int8, as they do in float32
(``test_runner.py``, ``test_static_decode.py``): the int8 layers quantize each
row on its own and integer products are exact. bfloat16: the same tokens up to
ties: batched and static passes add in another order (other GEMM and attention
shapes), and bfloat16 keeps 8 bits, so where a random tiny model's two best
logits lie within bfloat16's rounding the choice may flip; the test accepts a
first difference only there (a tie the solo decoder's own logits show).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from streamer.core.session import DecodeRequest
from streamer.engine import loader
from streamer.engine.decoding import Decoder
from streamer.engine.loader import (
    Int8Linear,
    ModelSpec,
    load_model,
    resolve_dtype,
    resolve_precision,
)
from streamer.engine.runner import BatchRunner
from streamer.engine.scheduler import Job
from streamer.engine.whisper_sed import build_sed_from_whisper
from streamer.errors import ConfigError
from streamer.testing.tiny_models import FAMILIES, make_whisper

from ..conftest import REPO_ROOT
from .test_static_decode import requests as static_requests

AUDIO = REPO_ROOT / "tests" / "data" / "audio" / "fleurs-en-004.ogg"
PRECISIONS = ("int8", "bfloat16")
STATIC_FAMILIES = ("whisper", "sed_bert", "sed_gpt2", "sed_whisper")


def make_sed_whisper(path: Path) -> Path:
    return build_sed_from_whisper(make_whisper(path / "whisper"), path / "sed", torch.float32)


MAKERS = {**FAMILIES, "sed_whisper": make_sed_whisper}


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    audio, rate = sf.read(AUDIO, dtype="float32")
    assert rate == 16000
    return audio


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dtypes")
    return {name: make(root / name) for name, make in MAKERS.items()}


def load(path: Path, dtype: str) -> Decoder:
    spec = ModelSpec(id=str(path), device="cpu", dtype=dtype, source_language="fr")
    dec = Decoder(load_model(spec), "trimmed")
    dec.loop_guard = False  # random weights repeat themselves; compare raw greedy
    return dec


def requests(decoder: Decoder, clip: np.ndarray) -> list[DecodeRequest]:
    """Windows of different lengths, prompts and forced prefixes (the static tests' set)."""
    return static_requests(
        decoder, clip, [0.7, 2.3, 1.0, 3.9, 1.6, 2.9], [9, 30, 6, 24, 14, 40], seed=3
    )


def assert_same_tokens(
    dec: Decoder,
    reqs: list[DecodeRequest],
    solo: dict[int, tuple[int, ...]],
    got: dict[int, tuple[int, ...]],
) -> int:
    """``got == solo``; in bfloat16 a sequence may differ from its first bfloat16 tie on.

    Returns how many sequences differ (at ties).
    """
    assert set(got) == set(solo)
    if dec.m.precision != "bfloat16":
        assert got == solo
        return 0
    ties = 0
    for req in reqs:
        a, b = solo[req.request_id], got[req.request_id]
        if a == b:
            continue
        k = next(
            (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
        )
        assert k < min(len(a), len(b)), (req.request_id, a, b)  # not a different length
        with torch.inference_mode():
            enc = dec.encode(req.audio)
            lang = req.lang if req.lang is not None else dec.detect_language(enc)
            prefix = dec.start_tokens(req.prompt, lang, req.task)
            ids = torch.tensor([[*prefix, *req.forced, *a[:k]]])
            logits = dec.logits(ids, enc, dec.new_cache())[0]
        x, y = float(logits[a[k]]), float(logits[b[k]])
        assert abs(x - y) <= 2 * 2**-7 * max(abs(x), abs(y)), (req.request_id, k, x, y)
        ties += 1
    return ties


def batched(runner: BatchRunner, reqs: list[DecodeRequest]) -> dict[int, tuple[int, ...]]:
    """Windows join in waves of two while others decode."""
    results: dict[int, tuple[int, ...]] = {}
    pending = [Job(r, 0.0) for r in reqs]
    with torch.inference_mode():
        while pending or runner.running:
            wave, pending = pending[:2], pending[2:]
            finished = runner.admit(wave) + runner.step()
            for job, result in finished:
                results[job.req.request_id] = result.tokens
    return results


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("family", sorted(MAKERS))
def test_batched_equals_solo(
    folders: dict[str, Path], clip: np.ndarray, family: str, precision: str
) -> None:
    dec = load(folders[family], precision)
    assert dec.m.precision == precision
    reqs = requests(dec, clip)
    solo = {r.request_id: dec.run(r).tokens for r in reqs}
    ties = assert_same_tokens(dec, reqs, solo, batched(BatchRunner(dec), reqs))
    if family in STATIC_FAMILIES:  # the static step ([engine] compile), uncompiled
        runner = BatchRunner(dec, static=True)
        assert runner.static is not None and runner.static.dtype == dec.m.dtype
        ties += assert_same_tokens(dec, reqs, solo, batched(runner, reqs))
        assert runner.static.steps > 0
    assert ties <= 1  # of 6 (12) sequences; none in int8


@pytest.mark.parametrize("family", ["whisper", "sed_bert", "sed_gpt2"])
def test_int8_swaps_the_linear_layers_only(folders: dict[str, Path], family: str) -> None:
    from transformers.pytorch_utils import Conv1D

    m = load(folders[family], "int8").m
    assert m.precision == "int8" and m.dtype == torch.float32
    modules = list(m.model.modules())
    assert not any(isinstance(x, (torch.nn.Linear, Conv1D)) for x in modules)
    assert sum(isinstance(x, Int8Linear) for x in modules) > 10
    convs = [x for x in modules if isinstance(x, torch.nn.Conv1d)]
    assert convs and all(c.weight.dtype == torch.float32 for c in convs)  # encoders' front ends
    assert all(p.dtype == torch.float32 for p in m.model.parameters())


def test_int8_linear_rows_are_independent_and_close() -> None:
    """Each row is quantized on its own scale: the same row gives the same bits whatever
    else is in the batch (the kernel's own per-tensor scale would not)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    q = Int8Linear.from_module(lin)
    x = torch.randn(5, 7, 64) * torch.logspace(-3, 2, 5)[:, None, None]
    with torch.inference_mode():
        together = q(x)
        alone = torch.cat([q(x[i : i + 1, j : j + 1]) for i in range(5) for j in range(7)])
        assert torch.equal(together.reshape(-1, 48), alone.reshape(-1, 48))
        ref = lin(x)
        err = (together - ref).abs().amax(-1) / ref.abs().amax(-1)
        assert float(err.max()) < 0.05
        assert torch.equal(q(torch.zeros(2, 64)), lin.bias.expand(2, -1))


def test_precision_choices() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("int8", cpu) == "int8"
    assert resolve_dtype("int8", cpu) == torch.float32  # activations
    assert resolve_precision("bf16", cpu) == "bfloat16"
    with pytest.raises(ConfigError, match="CPU only"):
        resolve_precision("int8", torch.device("cuda:0"))
    amx = frozenset({"avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"})
    # auto: bfloat16 where AMX runs it (faster, WER within a point), else float32
    assert frozenset({"amx_bf16"}) == loader.AUTO_BF16_CPU_FLAGS
    assert resolve_precision("auto", cpu, amx) == "bfloat16"
    assert resolve_precision("auto", cpu, frozenset({"avx512_bf16", "avx512_vnni"})) == "float32"
    assert resolve_precision("auto", cpu, frozenset({"avx2", "fma"})) == "float32"


@pytest.mark.slow
def test_whisper_base_int8_transcribes_jfk(streamer_cache_dir: Path) -> None:
    from streamer.audio.resample import load_audio

    spec = ModelSpec(
        cache_dir=str(streamer_cache_dir),
        device="cpu",
        dtype="int8",
        source_language="en",
        target_language="en",
    )
    dec = Decoder(load_model(spec))
    assert dec.m.precision == "int8"
    audio = load_audio(str(REPO_ROOT / "tests" / "data" / "audio" / "jfk.flac"), 16000)
    req = DecodeRequest("s", 0, "final", 0, audio, 0, len(audio), (), (), 60, "en")
    text = b"".join(dec.run(req).pieces).decode().lower()
    assert "ask not what your country can do for you" in text
    assert "what you can do for your country" in text
