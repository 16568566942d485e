"""The asyncio stream driver on a real (tiny) model, real VAD and real audio files."""

import asyncio
import dataclasses
import json

import numpy as np
import pytest
import soundfile as sf

from streamer.audio.sources import FileSource
from streamer.config import (
    Config,
    ConsoleConfig,
    JsonlConfig,
    ModelConfig,
    SourceConfig,
    StreamingConfig,
    VadConfig,
    WebSocketConfig,
)
from streamer.engine.client import EngineClient
from streamer.engine.core import Engine
from streamer.engine.decoding import Decoder, find_loop
from streamer.engine.loader import ModelSpec, load_model
from streamer.service.app import App
from streamer.service.engine_setup import model_spec
from streamer.service.stream_factory import StreamFactory
from streamer.testing.tiny_models import FAMILIES

CLIP = "tests/data/audio/fleurs-en-004.ogg"


@pytest.fixture
async def engine(tiny_whisper):
    loaded = load_model(
        ModelSpec(id=str(tiny_whisper), device="cpu", source_language="en", target_language="en")
    )
    eng = Engine(Decoder(loaded))
    eng.start()
    yield eng
    eng.stop()


def config(tiny_whisper, **streaming):
    return Config(
        model=ModelConfig(
            id=str(tiny_whisper), device="cpu", source_language="en", target_language="en"
        ),
        streaming=dataclasses.replace(
            StreamingConfig(), chunk_ms=500, max_tokens_per_second=3.0, min_tokens=2, **streaming
        ),
        vad=VadConfig(backend="silero"),
    )


async def run_file(engine, cfg, path, partials=True, realtime=False):
    client = EngineClient(engine)
    events, requests = [], []
    factory = StreamFactory(cfg, client, events.append, partials=partials)
    runner = factory.create("s")
    submit = client.submit

    def spy(req):
        requests.append(req)
        return submit(req)

    client.submit = spy
    await runner.run(FileSource(path, "s", 16000, realtime=realtime).blocks())
    assert await runner.wait_done(60)
    return events, requests


async def test_clip_gives_partials_then_final_with_latency(engine, tiny_whisper):
    # paced in real time: partials only make sense while the segment is still open
    events, requests = await run_file(engine, config(tiny_whisper), CLIP, realtime=True)
    kinds = [e.kind for e in events]
    assert "partial" in kinds and kinds[-1] == "final"
    assert all(e.latency_ms is not None and e.latency_ms >= 0 for e in events)
    assert [e.seq for e in events] == sorted({e.seq for e in events})
    assert all(r.lang == "en" for r in requests)


@pytest.mark.parametrize("family", ["whisper", "sed_bert", "speech2text"])
async def test_final_equals_offline_greedy_decode_without_stabilisation(family, tmp_path):
    """With commits off, each final is generate() on exactly its segment's window."""
    import torch
    from transformers import GenerationMixin

    path = FAMILIES[family](tmp_path / family)
    cfg = config(path, agreement_n=0)
    eng = Engine(Decoder(load_model(model_spec(cfg)), "padded"))  # generate()'s own encoder
    eng.start()
    try:
        events, requests = await run_file(eng, cfg, CLIP)
    finally:
        eng.stop()
    finals = [e for e in events if e.kind == "final"]
    final_reqs = [r for r in requests if r.kind == "final"]
    assert finals and len(finals) == len(final_reqs)
    dec = eng.decoder
    audio, _ = sf.read(CLIP, dtype="float32")
    for ev, req in zip(finals, final_reqs, strict=True):
        assert req.forced == ()
        assert np.array_equal(req.audio, audio[req.start : req.end])
        feats = dec.features([req.audio])
        prefix = dec.start_tokens(req.prompt, "en")
        generate = GenerationMixin.generate if family == "whisper" else type(dec.model).generate
        out = generate(
            dec.model,
            **feats,
            decoder_input_ids=torch.tensor([prefix]),
            max_new_tokens=req.max_new_tokens,
            do_sample=False,
            num_beams=1,
        )[0, len(prefix) :].tolist()
        out = [t for t in out if t != dec.m.eos_token_id]
        cut = find_loop(out)  # the daemon's loop guard; the same cut applies offline
        offline = dec.m.tokenizer.decode(
            out if cut is None else out[:cut], skip_special_tokens=True
        )
        assert ev.text == offline.strip()


@pytest.mark.parametrize("kind", ["silence", "white_noise", "tone"])
async def test_non_speech_produces_no_captions(engine, tiny_whisper, tmp_path, kind):
    rng = np.random.default_rng(0)
    n = 16000 * 4
    audio = {
        "silence": np.zeros(n),
        "white_noise": rng.normal(0, 0.1, n),
        "tone": 0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / 16000),
    }[kind].astype(np.float32)
    path = tmp_path / f"{kind}.wav"
    sf.write(path, audio, 16000)
    events, requests = await run_file(engine, config(tiny_whisper), path)
    assert events == [] and requests == []


async def test_app_runs_a_file_to_the_end(tiny_whisper, tmp_path):
    out = tmp_path / "events.jsonl"
    cfg = dataclasses.replace(
        config(tiny_whisper),
        sources=(SourceConfig(type="file", stream="f", path=CLIP, pace="fast"),),
        websocket=WebSocketConfig(port=0),
        console=ConsoleConfig(enabled=False),
        jsonl=JsonlConfig(path=str(out)),
    )
    app = App(cfg)
    code = await asyncio.wait_for(app.run(), 120)
    assert code == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines and lines[-1]["type"] == "final" and lines[-1]["stream"] == "f"
    assert app.server is None  # closed at shutdown


TIMIT = "tests/data/audio/LDC93S1_timit_sample.wav"


async def test_a_stalled_engine_holds_the_input_back_then_the_stream_catches_up(
    engine, tiny_whisper, tmp_path
):
    """Backpressure end to end: the device stops, the file is no longer read past the
    backlog bound, and once it resumes the waiting segments are decoded together."""
    import threading

    speech, rate = sf.read(TIMIT, dtype="float32")
    gap = np.zeros(rate, dtype=np.float32)
    path = tmp_path / "five.wav"
    sf.write(path, np.concatenate([np.concatenate([speech, gap]) for _ in range(5)]), rate)
    cfg = config(tiny_whisper, max_segment_s=10.0, max_backlog_s=12.0)
    gate = threading.Event()
    conv = engine.decoder.m.model.get_encoder().conv1  # every encoder pass runs it
    hook = conv.register_forward_pre_hook(lambda *_: gate.wait(60) and None)
    client = EngineClient(engine)
    requests = []
    submit = client.submit
    client.submit = lambda req: (requests.append(req), submit(req))[1]
    factory = StreamFactory(cfg, client, lambda e: None, partials=False)
    runner = factory.create("s")
    task = asyncio.create_task(runner.run(FileSource(path, "s", 16000, realtime=False).blocks()))
    try:
        async with asyncio.timeout(30):
            while not (runner.session.behind and runner.held_seconds == 0.0 and not task.done()):
                await asyncio.sleep(0.01)
            held_at = runner.session.buffer.end
            # the reader is parked: no more audio is taken while the engine is stalled
            for _ in range(50):
                await asyncio.sleep(0.01)
            assert runner.session.buffer.end == held_at < 5 * (len(speech) + rate)
            assert 12.0 < runner.backlog_seconds < 13.0
    finally:
        gate.set()
    await asyncio.wait_for(task, 60)
    assert await runner.wait_done(60)
    hook.remove()
    assert runner.held_seconds > 0 and not runner.session.behind
    finals = [r for r in requests if r.kind == "final"]
    assert [r.segment for r in finals] == list(range(len(finals)))
    assert runner.session.merged_segments >= 1 and len(finals) <= 4
    spans = [(r.end - r.start) / rate for r in finals]
    assert max(spans) > len(speech) / rate + 1.0  # one final window holds two utterances
