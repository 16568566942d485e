"""The engine thread: results, superseded work, failures that spare the others."""

import dataclasses
import threading

import numpy as np
import pytest
import torch

from streamer.core.session import DecodeRequest
from streamer.engine.core import Engine
from streamer.engine.decoding import Decoder
from streamer.engine.loader import ModelSpec, load_model
from streamer.testing.tiny_models import make_sed_bert


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    path = make_sed_bert(tmp_path_factory.mktemp("sed"))
    return Decoder(load_model(ModelSpec(id=str(path), device="cpu")))


def request(rid, stream="s", supersedes=None, n=6):
    audio = np.random.default_rng(rid).normal(0, 0.1, 16000).astype(np.float32)
    return DecodeRequest(
        stream, rid, "partial", 0, audio, 0, 16000, (), (), n, lang=None, supersedes=supersedes
    )


def collect(engine, reqs, timeout=60):
    results, done = {}, threading.Event()

    def cb(res):
        results[res.request_id] = res
        if len(results) == len(reqs):
            done.set()

    for r in reqs:
        engine.submit(r, cb)
    return results, done


def test_results_come_back_for_every_request(decoder):
    eng = Engine(decoder)
    eng.start()
    try:
        results, done = collect(eng, [request(0), request(1, stream="t")])
        assert done.wait(60)
        assert all(len(r.tokens) == 6 and r.error is None for r in results.values())
        assert eng.stats.requests == 2 and eng.stats.real_time_factor > 0
    finally:
        assert eng.stop()


def test_superseded_request_is_abandoned(decoder):
    eng = Engine(decoder)
    stale = request(0, n=200)
    final = dataclasses.replace(request(1, supersedes=0), kind="final")
    results, done = collect(eng, [stale, final])  # queued before the thread runs
    eng.start()
    try:
        assert done.wait(60)
        assert results[0].error == "cancelled" and results[0].tokens == ()
        assert results[1].error is None and len(results[1].tokens) == 6
        assert eng.cancelled_requests == 1
    finally:
        eng.stop()


def raise_on_calls(decoder, monkeypatch, exc, calls):
    """Make ``encode_batch`` raise ``exc`` on the given call numbers (1-based)."""
    real = decoder.encode_batch
    seen = []

    def flaky(audios):
        seen.append(len(audios))
        if len(seen) in calls:
            raise exc
        return real(audios)

    monkeypatch.setattr(decoder, "encode_batch", flaky)
    return seen


def test_out_of_memory_fails_one_window_and_the_engine_goes_on(decoder, monkeypatch):
    eng = Engine(decoder)
    raise_on_calls(decoder, monkeypatch, torch.OutOfMemoryError("CUDA out of memory (sim)"), {1})
    reqs = [dataclasses.replace(request(i), kind="final") for i in range(2)]
    results, done = collect(eng, reqs)  # one stream: two steps (finals are never replaced)
    eng.start()
    try:
        assert done.wait(60)
        assert results[0].error == "out of memory"
        assert results[1].error is None and len(results[1].tokens) == 6
        assert eng.alive and eng.fatal is None and eng.stats.failed == 1
    finally:
        eng.stop()


def test_repeated_out_of_memory_is_fatal(decoder, monkeypatch):
    eng = Engine(decoder, max_consecutive_oom=2)
    raise_on_calls(decoder, monkeypatch, torch.OutOfMemoryError("CUDA out of memory"), {1, 2})
    fatal = []
    eng.on_fatal = fatal.append
    results, done = collect(eng, [dataclasses.replace(request(i), kind="final") for i in range(3)])
    eng.start()
    try:
        assert done.wait(60)
        assert [results[i].error for i in range(3)] == [
            "out of memory",
            "out of memory",
            "engine stopped",
        ]
        assert not eng.alive and "2 consecutive out-of-memory errors" in str(eng.fatal)
        assert fatal == [eng.fatal]
        with pytest.raises(RuntimeError, match="engine stopped"):
            eng.submit(request(3), lambda r: None)
    finally:
        eng.stop()


def test_accelerator_error_is_fatal_at_once(decoder, monkeypatch):
    eng = Engine(decoder)
    raise_on_calls(
        decoder, monkeypatch, RuntimeError("CUDA error: an illegal memory access\nmore"), {1}
    )
    results, done = collect(eng, [request(0), request(1, stream="t")])
    eng.start()
    try:
        assert done.wait(60)
        assert {r.error for r in results.values()} == {
            "RuntimeError: CUDA error: an illegal memory access\nmore"
        }
        assert not eng.alive
        assert str(eng.fatal) == "RuntimeError: CUDA error: an illegal memory access"
    finally:
        eng.stop()


def test_a_newer_partial_replaces_a_waiting_one(decoder):
    eng = Engine(decoder)
    reqs = [request(0), request(1), request(2)]  # one stream, queued before the first step
    results, done = collect(eng, reqs)
    eng.start()
    try:
        assert done.wait(60)
        # 1 replaced 0 while both waited, then 2 replaced 1: only the newest runs
        assert [results[i].error for i in range(3)] == ["cancelled", "cancelled", None]
        assert eng.cancelled_requests == 2
    finally:
        eng.stop()


@pytest.mark.parametrize("beams", [1, 3])
def test_streams_are_batched_and_equal_to_alone(decoder, beams):
    decoder.num_beams = beams
    try:
        reqs = [request(i, stream=f"s{i}", n=4 + i) for i in range(5)]
        alone = {r.request_id: decoder.run(r).tokens for r in reqs}
        eng = Engine(decoder)
        results, done = collect(eng, reqs)  # all queued before the first step
        eng.start()
        try:
            assert done.wait(60)
            assert {rid: r.tokens for rid, r in results.items()} == alone
            assert eng.stats.max_batch == 5 and eng.stats.steps < sum(4 + i for i in range(5))
            assert eng.lag() == {}  # nothing unfinished at the last step
        finally:
            eng.stop()
    finally:
        decoder.num_beams = 1
