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


def test_out_of_memory_fails_one_window_and_the_engine_goes_on(decoder, monkeypatch):
    eng = Engine(decoder)
    real_run = decoder.run
    calls = []

    def flaky(req, cancelled):
        calls.append(req.request_id)
        if req.request_id == 0:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_run(req, cancelled)

    monkeypatch.setattr(decoder, "run", flaky)
    results, done = collect(eng, [request(0), request(1)])
    eng.start()
    try:
        assert done.wait(60)
        assert results[0].error == "out of memory"
        assert results[1].error is None
        assert eng.alive and eng.fatal is None
    finally:
        eng.stop()
