"""Batched decoding equals decoding each window alone, for every model family (fp32, CPU)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import soundfile as sf

from streamer.core.session import DecodeRequest
from streamer.engine.decoding import Decoder
from streamer.engine.loader import ModelSpec, load_model
from streamer.engine.runner import BatchRunner
from streamer.engine.scheduler import Job
from streamer.testing.tiny_models import FAMILIES

from ..conftest import REPO_ROOT

AUDIO = REPO_ROOT / "tests" / "data" / "audio" / "fleurs-en-004.ogg"


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    audio, rate = sf.read(AUDIO, dtype="float32")
    assert rate == 16000
    return audio


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def decoder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Decoder:
    path = FAMILIES[request.param](tmp_path_factory.mktemp(request.param))
    loaded = load_model(
        ModelSpec(id=str(path), device="cpu", dtype="float32", source_language="fr")
    )
    dec = Decoder(loaded, "trimmed")
    dec.loop_guard = False  # random weights repeat themselves; compare raw greedy
    return dec


def requests(decoder: Decoder, clip: np.ndarray) -> list[DecodeRequest]:
    """Windows of different lengths, prompts and forced prefixes, like real streams send."""
    rng = np.random.default_rng(0)
    vocab = [t for t in range(40, 120) if t != decoder.m.eos_token_id]
    out = []
    for i, seconds in enumerate([0.7, 2.3, 1.0, 3.9, 1.6, 2.9, 0.5, 3.2]):
        start = int(rng.integers(0, len(clip) - int(seconds * 16000)))
        audio = clip[start : start + int(seconds * 16000)]
        forced = tuple(int(t) for t in rng.choice(vocab, size=i % 4))
        prompt = tuple(int(t) for t in rng.choice(vocab, size=(i * 3) % 7))
        lang = None if i % 3 == 0 else "fr"
        out.append(
            DecodeRequest(
                f"s{i}",
                i,
                "partial",
                0,
                audio,
                0,
                len(audio),
                prompt,
                forced,
                6 + (i * 5) % 11,
                lang=lang,
            )
        )
    return out


def run_batched(
    decoder: Decoder, reqs: list[DecodeRequest], steps: list[int] | None = None
) -> dict:
    """Each request's result from the batch runner; sequences join in waves of 3 while
    others are mid-decode. ``steps`` receives the number of steps taken."""
    import torch

    runner = BatchRunner(decoder)
    assert runner.batchable
    results = {}
    pending = list(reqs)
    taken = 0
    with torch.inference_mode():
        while pending or runner.running:
            wave, pending = pending[:3], pending[3:]
            for job, result in runner.admit([Job(r, 0.0) for r in wave]):
                results[job.req.request_id] = result
            for job, result in runner.step():
                results[job.req.request_id] = result
            taken += 1
    if steps is not None:
        steps.append(taken)
    return results


def test_batched_tokens_equal_solo(decoder: Decoder, clip: np.ndarray) -> None:
    reqs = requests(decoder, clip)
    solo = {r.request_id: decoder.run(r) for r in reqs}
    steps: list[int] = []
    results = run_batched(decoder, reqs, steps=steps)
    assert steps[0] < sum(r.max_new_tokens for r in reqs)  # they really ran together
    for rid, expected in solo.items():
        got = results[rid]
        assert got.tokens == expected.tokens, rid
        assert got.pieces == expected.pieces and got.lang == expected.lang


def test_dropped_rows_leave_the_others_exact(decoder: Decoder, clip: np.ndarray) -> None:
    import torch

    reqs = [dataclasses.replace(r, max_new_tokens=12) for r in requests(decoder, clip)[:4]]
    solo = {r.request_id: decoder.run(r).tokens for r in reqs}
    runner = BatchRunner(decoder)
    jobs = [Job(r, 0.0) for r in reqs]
    results = {}
    with torch.inference_mode():
        runner.admit(jobs)
        runner.step()
        runner.drop([jobs[1]])
        while runner.running:
            for job, result in runner.step():
                results[job.req.request_id] = result.tokens
    assert set(results) == {0, 2, 3}
    for rid, tokens in results.items():
        assert tokens == solo[rid]


def test_windows_of_different_lengths_share_an_encoder_pass(
    decoder: Decoder, clip: np.ndarray
) -> None:
    """Mask-exact encoders (wav2vec2 with layer norm) batch any lengths; others by bucket."""
    import torch

    reqs = requests(decoder, clip)
    solo = {r.request_id: decoder.run(r).tokens for r in reqs}
    calls: list[list[int]] = []
    encode_batch = decoder.encode_batch

    def spy(audios: list[np.ndarray]) -> list:  # type: ignore[type-arg]
        calls.append([len(a) for a in audios])
        return encode_batch(audios)

    decoder.encode_batch = spy  # type: ignore[method-assign]
    try:
        runner = BatchRunner(decoder)
        results = {}
        with torch.inference_mode():
            for job, result in runner.admit([Job(r, 0.0) for r in reqs]):
                results[job.req.request_id] = result.tokens
            while runner.running:
                for job, result in runner.step():
                    results[job.req.request_id] = result.tokens
    finally:
        del decoder.encode_batch
    assert results == solo
    mixed = [c for c in calls if len(set(c)) > 1]
    if decoder.pads_exactly:
        assert decoder.m.family == "sed"
        # power-of-two buckets: ≤ 0.5 s, ≤ 1 s, ≤ 2 s, ≤ 4 s: four passes for eight windows
        assert sorted(map(sorted, calls)) == [[8000], [11200, 16000], [25600],
                                              [36800, 46400, 51200, 62400]], calls  # fmt: skip
    elif decoder.trimmed:
        assert mixed  # trimmed Whisper: windows of one whole-second bucket
    else:
        assert not mixed and len(calls) == len(reqs)


def test_beam_search_batched_equals_beam_search_alone(decoder: Decoder, clip: np.ndarray) -> None:
    """k rows per window, reordered every step; windows join mid-flight and one is dropped."""
    import torch

    reqs = [dataclasses.replace(r, max_new_tokens=8) for r in requests(decoder, clip)[:6]]
    decoder.num_beams = 3
    try:
        solo = {r.request_id: decoder.run(r) for r in reqs}
        runner = BatchRunner(decoder)
        assert runner.batchable and runner.beams == 3
        jobs = [Job(r, 0.0) for r in reqs]
        results = {}
        rows_seen = []
        with torch.inference_mode():
            for job, result in runner.admit(jobs[:4]):
                results[job.req.request_id] = result
            rows_seen.append(sum(len(g.jobs) for g in runner.groups))
            for job, result in runner.step():
                results[job.req.request_id] = result
            runner.drop([jobs[1]])
            for job, result in runner.admit(jobs[4:]):
                results[job.req.request_id] = result
            while runner.running:
                rows_seen.append(sum(len(g.jobs) for g in runner.groups))
                for job, result in runner.step():
                    results[job.req.request_id] = result
        assert not runner._searches
    finally:
        decoder.num_beams = 1
    assert set(results) == {0, 2, 3, 4, 5}
    assert max(rows_seen) >= 9  # three windows or more decoding together, three rows each
    for rid, got in results.items():
        expected = solo[rid]
        assert got.tokens == expected.tokens, rid
        assert got.pieces == expected.pieces and got.lang == expected.lang


def test_batched_alignment_equals_solo(
    decoder: Decoder, clip: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attention rows, peaks and AlignAtt stops come out of the batch as they do alone.

    Word spans warp over the rows; random weights attend almost uniformly, so
    last-bit differences can move a warping path: the rows are compared (to
    float rounding), the spans for shape.
    """
    import torch

    reqs = [
        dataclasses.replace(r, words=True, alignatt_frames=(0, 3, 40)[r.request_id % 3])
        for r in requests(decoder, clip)
    ]
    rows: dict[str, dict[int, torch.Tensor]] = {"solo": {}, "batched": {}}
    path = "solo"
    result = Decoder.result

    def keep_rows(self: Decoder, req: DecodeRequest, *args: object) -> object:
        rows[path][req.request_id] = args[-1]  # type: ignore[assignment]
        return result(self, req, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(Decoder, "result", keep_rows)
    solo = {r.request_id: decoder.run(r) for r in reqs}
    path = "batched"
    results = run_batched(decoder, reqs)
    for rid, expected in solo.items():
        got = results[rid]
        req = reqs[rid]
        assert got.tokens == expected.tokens, rid
        torch.testing.assert_close(rows["batched"][rid], rows["solo"][rid], atol=1e-5, rtol=1e-4)
        assert got.peaks == expected.peaks and len(got.peaks) == len(got.tokens), rid
        assert len(got.spans) == len(req.forced) + len(got.tokens)
        assert got.frame_samples == decoder.frame_samples > 0
        frames = got.audio_frames
        assert frames == -(-len(req.audio) // decoder.frame_samples)
        assert all(0 <= a <= b <= frames for a, b in got.spans)
        assert [a for a, _ in got.spans] == sorted(a for a, _ in got.spans)
        if req.alignatt_frames and len(got.tokens) < req.max_new_tokens and not got.looped:
            # stopped early at a late-attending token, or ran to the end of text
            late = [p >= frames - req.alignatt_frames for p in got.peaks]
            assert not any(late[:-1]), rid
        plain = decoder.run(dataclasses.replace(req, words=False, alignatt_frames=0))
        assert plain.tokens[: len(got.tokens)] == got.tokens  # reading attention changes nothing
