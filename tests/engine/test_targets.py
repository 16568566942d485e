"""Several targets from one speech decode: an mBART-decoder SED's language token picks each.

A tiny random SED (wav2vec2 + mBART-50 decoder with fairseq language codes) is
the stand-in for facebook/wav2vec2-xls-r-300m-en-to-15. Batched target rows
must give each target the tokens of decoding it alone (fp32), with one encoder
pass per window.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from streamer.core.multi_target import MultiTargetSession
from streamer.core.session import DecodeRequest, DecodeResult, SessionSettings, StreamSession
from streamer.engine.decoding import Decoder
from streamer.engine.loader import ModelSpec, decodable_targets, load_model
from streamer.engine.runner import BatchRunner
from streamer.engine.scheduler import Job
from streamer.testing.tiny_models import make_sed_mbart, make_whisper
from streamer.types import Hypothesis

from ..conftest import REPO_ROOT

AUDIO = REPO_ROOT / "tests" / "data" / "audio" / "fleurs-en-004.ogg"
TARGETS = ("de", "fr", "es", "en")  # "en" is the model's own: answered by the request's row


@pytest.fixture(scope="module")
def sed_mbart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_sed_mbart(tmp_path_factory.mktemp("sed") / "sed_mbart")


@pytest.fixture(scope="module")
def decoder(sed_mbart: Path) -> Decoder:
    spec = ModelSpec(id=str(sed_mbart), device="cpu", dtype="float32", target_language="en")
    dec = Decoder(load_model(spec))
    dec.loop_guard = False  # random weights repeat themselves; compare raw greedy
    return dec


def requests(decoder: Decoder) -> list[DecodeRequest]:
    """Windows of different lengths; each target row with its own prompt and commits."""
    clip, rate = sf.read(AUDIO, dtype="float32")
    assert rate == 16000
    rng = np.random.default_rng(1)
    vocab = [t for t in range(40, 120) if t != decoder.m.eos_token_id]
    out = []
    for i, seconds in enumerate([1.3, 2.6, 0.8, 3.1]):
        start = int(rng.integers(0, len(clip) - int(seconds * 16000)))
        audio = clip[start : start + int(seconds * 16000)]
        req = DecodeRequest(f"s{i}", i, "partial", 0, audio, 0, len(audio), (), (), 9)
        rows = []
        for j, target in enumerate(TARGETS):
            if target == "en":  # the same prefix as the request: must not decode twice
                rows.append(dataclasses.replace(req, target=target))
                continue
            forced = tuple(int(t) for t in rng.choice(vocab, size=(i + j) % 3))
            prompt = tuple(int(t) for t in rng.choice(vocab, size=(i * 2 + j) % 4))
            rows.append(
                dataclasses.replace(
                    req,
                    prompt=prompt,
                    forced=forced,
                    target=target,
                    max_new_tokens=5 + (i + 2 * j) % 7,
                )
            )
        out.append(dataclasses.replace(req, target_rows=tuple(rows)))
    return out


def test_language_tokens_of_a_multilingual_decoder(decoder: Decoder, tmp_path: Path) -> None:
    m = decoder.m
    vocab = m.tokenizer.get_vocab()
    tokens = decodable_targets(m, ("de", "fr", "de_DE"))
    assert tokens == {"de": vocab["de_DE"], "fr": vocab["fr_XX"], "de_DE": vocab["de_DE"]}
    assert decodable_targets(m, ("de", "xx")) is None  # a target without a token: cascade
    start = decoder.start_tokens((), None, None, "fr")
    assert start == [int(m.model.generation_config.decoder_start_token_id), vocab["fr_XX"]]
    assert decoder.start_tokens((), None) == [*start[:1], vocab["en_XX"]]
    whisper = load_model(ModelSpec(id=str(make_whisper(tmp_path / "w")), device="cpu",
                                   dtype="float32", source_language="en"))  # fmt: skip
    assert decodable_targets(whisper, ("de",)) is None  # Whisper translates into English only


def test_target_rows_batched_equal_each_alone(decoder: Decoder) -> None:
    reqs = requests(decoder)
    solo: dict[tuple[int, str | None], DecodeResult] = {}
    for req in reqs:
        solo[(req.request_id, None)] = decoder.run(dataclasses.replace(req, target_rows=()))
        for row in req.target_rows:
            solo[(req.request_id, row.target)] = decoder.run(row)
    assert len({solo[(0, t)].tokens for t in TARGETS}) > 2  # the token picks the language

    runner = BatchRunner(decoder)
    windows: list[int] = []
    encode = decoder.encode_batch

    def counting(audios: list[np.ndarray]) -> object:
        windows.extend(len(a) for a in audios)
        return encode(audios)

    results: dict[int, DecodeResult] = {}
    pending = list(reqs)
    steps = 0
    try:
        decoder.encode_batch = counting  # type: ignore[method-assign,assignment]
        with torch.inference_mode():
            while pending or runner.running:
                wave, pending = pending[:2], pending[2:]  # rows join others mid-decode
                for job, result in runner.admit([Job(r, 0.0) for r in wave]):
                    results[job.req.request_id] = result
                for job, result in runner.step():
                    results[job.req.request_id] = result
                steps += 1
    finally:
        del decoder.encode_batch  # type: ignore[method-assign]
    assert sorted(windows) == sorted(len(r.audio) for r in reqs)  # one encoder pass per window
    assert steps < sum(r.max_new_tokens for req in reqs for r in req.target_rows)
    for req in reqs:
        got = results[req.request_id]
        assert got.tokens == solo[(req.request_id, None)].tokens
        assert list(got.targets) == list(TARGETS)
        for target in TARGETS:
            expected = solo[(req.request_id, target)]
            answer = got.targets[target]
            assert answer.tokens == expected.tokens, (req.request_id, target)
            assert answer.pieces == expected.pieces
        assert got.targets["en"].tokens == got.tokens
    assert decoder.run(reqs[1]).targets["fr"] == solo[(1, "fr")]  # alone, rows included


def test_dropping_a_request_drops_its_target_rows(decoder: Decoder) -> None:
    reqs = [dataclasses.replace(r, max_new_tokens=12) for r in requests(decoder)[:2]]
    runner = BatchRunner(decoder)
    jobs = [Job(r, 0.0) for r in reqs]
    done: list[int] = []
    with torch.inference_mode():
        done += [j.req.request_id for j, _ in runner.admit(jobs)]
        runner.drop([jobs[0]])
        while runner.running:
            done += [j.req.request_id for j, _ in runner.step()]
    assert done == [1]
    assert runner.clear() == []


def drive(session: StreamSession, decoder: Decoder, audio: np.ndarray) -> list[Hypothesis]:
    """Feed ``audio`` in 0.25 s blocks, answering every request at once (``Decoder.run``)."""
    events: list[Hypothesis] = []

    def pump() -> None:
        while requests := session.requests_to_send():
            for req in requests:
                session.receive_result(decoder.run(req))
        events.extend(session.events_received())

    for i in range(0, len(audio), 4000):
        session.receive_audio(audio[i : i + 4000])
        pump()
    session.receive_end()
    pump()
    assert session.done
    return events


def test_session_targets_leave_the_source_unchanged(decoder: Decoder) -> None:
    """The same audio and answers with and without targets: identical source events; each
    target's own stabilised partials (committed append-only) and a final per segment."""
    clip, _ = sf.read(AUDIO, dtype="float32")
    settings = SessionSettings(vad=False, max_segment=3 * 16000, max_window=4 * 16000,
                               max_tokens_per_second=2.0, min_tokens=2)  # fmt: skip
    alone = drive(StreamSession("s", settings), decoder, clip)
    both = drive(MultiTargetSession("s", settings, ("de", "fr")), decoder, clip)
    source = [dataclasses.replace(e, seq=0) for e in both if e.target is None]
    assert source == [dataclasses.replace(e, seq=0) for e in alone]  # seq: targets' too
    assert [e.seq for e in both] == list(range(1, len(both) + 1))
    finals = {e.segment for e in alone if e.kind == "final"}
    assert len(finals) >= 2
    for target in ("de", "fr"):
        got = [e for e in both if e.target == target]
        assert {e.segment for e in got if e.kind == "final"} == finals
        committed: dict[int, str] = {}
        for event in got:
            assert event.lang == "fr" or event.lang is None
            before = committed.get(event.segment, "")
            text = event.committed if event.kind == "partial" else event.text
            assert text.startswith(before), (before, event)
            if event.kind == "partial":
                committed[event.segment] = event.committed
        assert any(e.committed for e in got if e.kind == "partial")  # it did stabilise
    de = [e.text for e in both if e.target == "de" and e.kind == "final"]
    assert de != [e.text for e in alone if e.kind == "final"]  # its own language
