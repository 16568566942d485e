"""The static-cache decode step (``compile``) gives the dynamic path's tokens (fp32, CPU)."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from streamer.core.session import DecodeRequest, DecodeResult
from streamer.engine import static_decode
from streamer.engine.core import Engine
from streamer.engine.decoding import Decoder
from streamer.engine.loader import ModelSpec, load_model
from streamer.engine.runner import BatchRunner
from streamer.engine.scheduler import Job, SchedulerLimits
from streamer.engine.whisper_sed import build_sed_from_whisper
from streamer.testing.tiny_models import FAMILIES, make_whisper

from ..conftest import REPO_ROOT

AUDIO = REPO_ROOT / "tests" / "data" / "audio" / "fleurs-en-004.ogg"
STATIC_FAMILIES = ("whisper", "sed_bert", "sed_gpt2", "sed_whisper")


def make_sed_whisper(path: Path) -> Path:
    """The SED built from Whisper's parts (``whisper_sed.py``), tiny, float32."""
    return build_sed_from_whisper(make_whisper(path / "whisper"), path / "sed", torch.float32)


MAKERS = {**FAMILIES, "sed_whisper": make_sed_whisper}


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    audio, rate = sf.read(AUDIO, dtype="float32")
    assert rate == 16000
    return audio


def load(path: Path) -> Decoder:
    loaded = load_model(
        ModelSpec(id=str(path), device="cpu", dtype="float32", source_language="fr")
    )
    dec = Decoder(loaded, "trimmed")
    dec.loop_guard = False  # random weights repeat themselves; compare raw greedy
    return dec


@pytest.fixture(scope="module", params=STATIC_FAMILIES)
def decoder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Decoder:
    return load(MAKERS[request.param](tmp_path_factory.mktemp(request.param)))


@pytest.fixture(scope="module")
def whisper(tiny_whisper: Path) -> Decoder:
    return load(tiny_whisper)


def requests(
    decoder: Decoder, clip: np.ndarray, seconds: list[float], lengths: list[int], seed: int = 1
) -> list[DecodeRequest]:
    """Windows of different lengths, prompts and forced prefixes, like real streams send."""
    rng = np.random.default_rng(seed)
    vocab = [t for t in range(40, 120) if t != decoder.m.eos_token_id]
    out = []
    for i, (sec, n) in enumerate(zip(seconds, lengths, strict=True)):
        start = int(rng.integers(0, len(clip) - int(sec * 16000)))
        audio = clip[start : start + int(sec * 16000)]
        forced = tuple(int(t) for t in rng.choice(vocab, size=(i * 5) % 9))
        prompt = tuple(int(t) for t in rng.choice(vocab, size=(i * 3) % 7))
        lang = None if i % 3 == 0 else "fr"
        out.append(
            DecodeRequest(
                f"s{i}", i, "partial", 0, audio, 0, len(audio), prompt, forced, n, lang=lang
            )
        )
    return out


def run(
    runner: BatchRunner,
    reqs: list[DecodeRequest],
    wave: int,
    drop: tuple[int, int] | None = None,
    every: int = 1,
    full: dict[int, DecodeResult] | None = None,
) -> dict[int, tuple[int, ...]]:
    """Admit ``wave`` requests every ``every`` steps while others decode; drop (step, id).

    Returns each request's tokens; ``full`` receives the whole results."""
    results: dict[int, tuple[int, ...]] = {}
    pending = [Job(r, 0.0) for r in reqs]
    running: list[Job] = []
    step = 0
    while pending or runner.running:
        n = wave if step % every == 0 else 0
        batch, pending = pending[:n], pending[n:]
        running += batch
        with torch.inference_mode():
            finished = runner.admit(batch)
        if drop is not None and step == drop[0]:  # the engine drops outside inference mode
            runner.drop([j for j in running if j.req.request_id == drop[1]])
        with torch.inference_mode():
            finished += runner.step()
        for job, result in finished:
            results[job.req.request_id] = result.tokens
            if full is not None:
                full[job.req.request_id] = result
        step += 1
    return results


Move = tuple[tuple[int, int, int], tuple[int, int, int]]


def static_runner(
    decoder: Decoder, monkeypatch: pytest.MonkeyPatch
) -> tuple[BatchRunner, list[Move]]:
    """A runner on the uncompiled static path, recording each relayout's (before, after) bucket."""
    runner = BatchRunner(decoder, static=True)
    static = runner.static
    assert static is not None and static._compiled is None
    moves: list[Move] = []
    relayout = static._relayout

    def spy(rows: int, need: int, frames: int) -> None:
        before = static.key
        relayout(rows, need, frames)
        moves.append((before, static.key))

    monkeypatch.setattr(static, "_relayout", spy)
    return runner, moves


def test_static_step_equals_dynamic(
    decoder: Decoder, clip: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows join in waves and leave mid-flight: slots, length and frames grow."""
    runner, _ = static_runner(decoder, monkeypatch)
    seconds = [0.7, 1.0, 2.3, 3.9, 1.6, 2.9, 0.5, 3.2, 1.2, 2.0]
    lengths = [70, 9, 40, 25, 88, 6, 33, 61, 14, 50]
    reqs = requests(decoder, clip, seconds, lengths)
    dynamic = run(BatchRunner(decoder), reqs, wave=2, drop=(5, 4))
    got = run(runner, reqs, wave=2, drop=(5, 4))
    assert 4 not in got and len(got) == len(reqs) - 1
    assert got == dynamic
    static = runner.static
    assert static is not None
    # every token after the first (chosen from the prefill) came from a static step
    assert static.steps >= max(len(t) for t in got.values()) - 1
    assert len({s for s, _, _ in static.shapes}) > 1  # slots grew
    assert len({n for _, n, _ in static.shapes}) > 1  # length grew past a bucket
    if not (decoder.m.family == "sed" and decoder.m.whisper_prompt):  # not all 30 s windows
        assert len({f for _, _, f in static.shapes}) > 1  # frames grew


def test_static_step_reads_the_alignment_of_the_dynamic_path(
    decoder: Decoder, clip: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Peaks, AlignAtt stops and spans from static steps equal the dynamic path's."""
    runner, _ = static_runner(decoder, monkeypatch)
    reqs = requests(decoder, clip, [0.7, 2.3, 1.0, 3.9, 1.6, 2.9], [30, 9, 40, 25, 60, 6])
    reqs = [
        dataclasses.replace(r, words=True, alignatt_frames=(0, 4)[r.request_id % 2]) for r in reqs
    ]
    dynamic: dict[int, DecodeResult] = {}
    static: dict[int, DecodeResult] = {}
    assert run(runner, reqs, wave=2, full=static) == run(
        BatchRunner(decoder), reqs, wave=2, full=dynamic
    )
    assert runner.static is not None and runner.static.steps > 0
    for rid, want in dynamic.items():
        got = static[rid]
        assert got.peaks == want.peaks and len(got.peaks) == len(got.tokens), rid
        assert len(got.spans) == len(want.spans) == len(reqs[rid].forced) + len(got.tokens)


def test_write_column_wraps_by_compaction(
    decoder: Decoder, clip: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows that start late: the write column reaches the end and shifts back in place."""
    runner, moves = static_runner(decoder, monkeypatch)
    reqs = requests(decoder, clip, [1.0, 2.0, 1.5, 0.8], [30, 40, 30, 40])
    assert run(runner, reqs, wave=1, every=20) == run(BatchRunner(decoder), reqs, 1, every=20)
    assert any(a == b for a, b in moves)  # compacted within its bucket


def test_unsupported_family_falls_back_once(
    tmp_path_factory: pytest.TempPathFactory, clip: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    dec = load(FAMILIES["sed_mbart"](tmp_path_factory.mktemp("mbart")))
    static_decode._logged.clear()
    with caplog.at_level(logging.INFO, logger=static_decode.__name__):
        runners = [BatchRunner(dec, compile=True) for _ in range(2)]
    assert all(r.static is None for r in runners)
    lines = [r for r in caplog.records if "static decode path unavailable" in r.getMessage()]
    assert len(lines) == 1 and "mbart" in lines[0].getMessage()
    reqs = requests(dec, clip, [1.0, 2.0], [8, 8])
    assert run(runners[0], reqs, wave=1) == {r.request_id: dec.run(r).tokens for r in reqs}


def test_engine_passes_compile_through(
    whisper: Decoder, clip: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Engine(compile=True)`` decodes on the static path (compiler stubbed: cheap);
    a running row superseded mid-decode is dropped from its slot."""
    compiled: list[object] = []

    def fake_compile(fn: object, **kwargs: object) -> object:
        compiled.append(kwargs)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    reqs = requests(whisper, clip, [0.7, 1.5, 2.2, 1.1], [12, 30, 8, 20])
    stale = dataclasses.replace(reqs[1], request_id=10, max_new_tokens=400)
    newer = dataclasses.replace(reqs[1], request_id=11, kind="final", supersedes=10)
    eng = Engine(whisper, compile=True, limits=SchedulerLimits(max_running=3))
    assert compiled == [{"dynamic": False, "mode": "default"}]
    results: dict[int, DecodeResult] = {}
    done = threading.Event()

    def callback(res: DecodeResult) -> None:
        results[res.request_id] = res
        if res.request_id == 2:  # the shortest ended: the stale one is mid-decode
            eng.submit(newer, callback)
        if len(results) == len(reqs) + 2:
            done.set()

    for r in [stale, *reqs]:
        eng.submit(r, callback)
    eng.start()
    try:
        assert done.wait(60)
    finally:
        assert eng.stop()
    assert results.pop(10).error == "cancelled" and eng.cancelled_requests == 1
    assert {rid: r.tokens for rid, r in results.items()} == {
        r.request_id: whisper.run(r).tokens for r in [*reqs, newer]
    }
    static = eng.runner.static
    assert eng.stats.static_steps > 0 and eng.stats.compiled_shapes >= 1
    assert static is not None and static.running == 0
    assert max(s for s, _, _ in static.shapes) <= 4  # max_running 3: at most 4 slots


def test_compile_failure_and_bucket_cap_fall_back_to_eager(
    whisper: Decoder,
    clip: np.ndarray,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A compiler error runs the step eagerly; buckets past the cap are not compiled."""
    calls: list[tuple[int, int, int]] = []

    def fake_compile(fn: Callable[..., torch.Tensor], **kwargs: object) -> object:
        def compiled(*args: torch.Tensor) -> torch.Tensor:
            calls.append((args[0].shape[0], args[2].shape[1], args[3].shape[1]))
            if broken:
                raise RuntimeError("no C++ compiler")
            return fn(*args)

        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    reqs = requests(whisper, clip, [0.7, 1.5, 2.2, 3.1], [12, 30, 8, 20])
    expected = run(BatchRunner(whisper), reqs, wave=1)
    for broken in (True, False):
        runner = BatchRunner(whisper, compile=True)
        static = runner.static
        assert static is not None
        static.max_shapes = 1
        calls.clear()
        with caplog.at_level(logging.INFO, logger=static_decode.__name__):
            assert run(runner, reqs, wave=1) == expected
        assert len(static.shapes) > 1 and static.steps > 20
        if broken:  # tried once, then eager for good
            assert len(calls) == 1 and static._compiled is None and not static.compile_seconds
            assert "torch.compile of the static decode step failed" in caplog.text
        else:  # the first bucket compiled, later ones eager
            assert set(static.compile_seconds) == set(calls) and len(set(calls)) == 1
            assert "1 buckets compiled; later ones run eagerly" in caplog.text


def compiled_equals_dynamic(dec: Decoder, clip: np.ndarray) -> None:
    """The compiled step's tokens equal the dynamic path's, in one shape bucket."""
    reqs = requests(dec, clip, [1.0, 1.8, 0.6, 1.3, 2.0, 0.9], [30, 12, 44, 8, 40, 26])
    reqs = [dataclasses.replace(r, prompt=r.prompt[:3], words=r.request_id % 2 == 0) for r in reqs]
    want: dict[int, DecodeResult] = {}
    got: dict[int, DecodeResult] = {}
    dynamic = run(BatchRunner(dec), reqs, wave=4, drop=(3, 1), every=14, full=want)
    runner = BatchRunner(dec, compile=True, max_rows=4)
    compiled = run(runner, reqs, wave=4, drop=(3, 1), every=14, full=got)
    assert {rid: r.peaks for rid, r in got.items()} == {rid: r.peaks for rid, r in want.items()}
    static = runner.static
    assert static is not None and static._compiled is not None
    assert compiled == dynamic and 1 not in compiled
    assert set(static.compile_seconds) == static.shapes == {(4, 64, 256)}
    assert static.steps > 44 and static.relayouts >= 2  # joined, then compacted in place


# torch's compiler stack imports code that uses the deprecated torch.jit.script_method
TORCH_JIT_WARNING = "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"


@pytest.mark.filterwarnings(TORCH_JIT_WARNING)
def test_compiled_step_equals_dynamic(whisper: Decoder, clip: np.ndarray) -> None:
    """A real ``torch.compile``, kept to one shape bucket (4 slots, 64 columns, 256 frames).

    One family only, to keep CI time down (the cold compile takes 20-30 s on 2 cores);
    the uncompiled static step is checked against the dynamic path for every family.
    """
    compiled_equals_dynamic(whisper, clip)


@pytest.mark.gpu
@pytest.mark.filterwarnings(TORCH_JIT_WARNING)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_step_equals_dynamic(tiny_whisper: Path, clip: np.ndarray) -> None:
    """On CUDA the step is captured as CUDA graphs (``reduce-overhead``), buffers pooled."""
    spec = ModelSpec(id=str(tiny_whisper), device="cuda", dtype="float32", source_language="fr")
    dec = Decoder(load_model(spec), "trimmed")
    dec.loop_guard = False
    compiled_equals_dynamic(dec, clip)


def test_config_key_turns_the_static_step_on(
    tiny_whisper: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``[engine] compile`` reaches the runner the daemon starts."""
    from streamer.config import Config, EngineConfig, ModelConfig
    from streamer.service.engine_setup import start_engine

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    model = ModelConfig(id=str(tiny_whisper), device="cpu", source_language="en")
    for on in (False, True):
        engine = start_engine(Config(model=model, engine=EngineConfig(compile=on)))
        try:
            assert (engine.runner.static is not None) is on
        finally:
            assert engine.stop()
