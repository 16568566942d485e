"""The cascade's text translation: loading, KV-cache decoding equal to generate(), batching.

Tiny random Marian (pair and multi-target), M2M100, NLLB (M2M100 architecture
with NLLB's tokenizer) and mBART-50 checkpoints are built from configs, saved
and loaded from disk. Tokens are compared, not text: ``decode`` is swapped for
the token ids, since random models emit special tokens that text would hide.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from streamer.core.translation import TranslateRequest, TranslateResult
from streamer.engine.translate_runner import TranslateLimits, TranslationWorker
from streamer.engine.translation import TextModel, TranslationSpec, Translator, load_translator
from streamer.errors import ConfigError
from streamer.testing.tiny_translation import make_m2m100, make_marian, make_mbart50, make_nllb

TEXTS = ("hello world.", "the stream is speech, and it is the world!", "le café est la")

#: family -> (maker, extra maker kwargs, targets, the token that names a target)
FAMILIES = {
    "marian_multi": (make_marian, {"targets": ("de", "fr")}, ("de", "fr")),
    "m2m100": (make_m2m100, {}, ("de", "fr")),
    "nllb": (make_nllb, {}, ("de", "fr")),
    "mbart50": (make_mbart50, {}, ("de", "fr")),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mt")
    out = {name: make(root / name, **kw) for name, (make, kw, _) in FAMILIES.items()}
    for target in ("de", "fr"):  # opus-mt style: one model per pair
        make_marian(root / f"opus-en-{target}", seed={"de": 1, "fr": 2}[target])
    out["marian_pair"] = root / "opus-en-{target}"
    return out


@pytest.fixture(autouse=True)
def token_text(monkeypatch):
    """Translations come back as their token ids ("12 7 40")."""
    monkeypatch.setattr(TextModel, "decode", lambda self, toks: " ".join(map(str, toks)))


def load(checkpoints, name, targets=("de", "fr"), **kw) -> Translator:
    kw = {"max_length_ratio": 0.5, "min_tokens": 4, **kw}  # short decodes: random models
    spec = TranslationSpec(
        str(checkpoints[name]), targets, "en", device="cpu", dtype="float32", **kw
    )
    return load_translator(spec)


def run(worker: TranslationWorker, reqs: list[TranslateRequest]) -> dict[int, TranslateResult]:
    out: dict[int, TranslateResult] = {}
    for req in reqs:
        worker.submit(req, lambda r: out.__setitem__(r.request_id, r), 0.0)
    with torch.inference_mode():
        while not worker.idle:
            for callback, result in worker.step():
                callback(result)
    return out


def generate_tokens(translator: Translator, target: str, text: str) -> str:
    """``generate(do_sample=False, num_beams=1)`` on one source, as token ids after the prefix."""
    plan = translator.plans[target]
    m = plan.model
    ids = m.source_ids(plan.source_prefix + text, translator.source_code(plan, None))
    limit = translator.max_new_tokens(plan, len(ids))
    kw = {"forced_bos_token_id": plan.start[1]} if len(plan.start) > 1 else {}
    out = m.model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
        max_new_tokens=limit + len(plan.start) - 1,
        do_sample=False,
        num_beams=1,
        **kw,
    )[0].tolist()
    assert out[: len(plan.start)] == list(plan.start)
    new = out[len(plan.start) :]
    if m.eos_token_id in new:
        new = new[: new.index(m.eos_token_id)]
    return " ".join(map(str, new))


@pytest.mark.parametrize("family", [*FAMILIES, "marian_pair"])
def test_each_alone_equals_generate(checkpoints, family):
    translator = load(checkpoints, family)
    worker = TranslationWorker(translator)
    for target in translator.targets:
        for i, text in enumerate(TEXTS):
            req = TranslateRequest("s", i, "final", (text,), (target,))
            result = run(worker, [req])[i]
            assert result.error is None
            assert result.translations[target] == (generate_tokens(translator, target, text),)


def test_conventions_of_each_family(checkpoints):
    """How each checkpoint names its target (README: supported architectures)."""
    plans = {name: load(checkpoints, name).plans for name in [*FAMILIES, "marian_pair"]}
    marian = plans["marian_multi"]["fr"]
    assert marian.source_prefix == ">>fr<< " and len(marian.start) == 1
    for name, code in (("m2m100", "__fr__"), ("nllb", "fra_Latn"), ("mbart50", "fr_XX")):
        plan = plans[name]["fr"]
        assert plan.source_prefix == "" and len(plan.start) == 2
        assert plan.model.tokenizer.convert_ids_to_tokens(plan.start[1]) == code
        assert plan.src_code is not None  # the source carries its language token
    pair = plans["marian_pair"]
    assert pair["de"].model is not pair["fr"].model and pair["de"].source_prefix == ""


@pytest.mark.parametrize("family", ["marian_multi", "m2m100", "nllb", "mbart50", "marian_pair"])
def test_batched_rows_equal_each_alone(checkpoints, family):
    """Several texts x targets in one request, requests admitted together and while
    others run (groups merge): every row decodes as it does alone."""
    translator = load(checkpoints, family)
    alone = {
        (t, text): run(
            TranslationWorker(translator), [TranslateRequest("s", 0, "final", (text,), (t,))]
        )[0].translations[t][0]
        for t in translator.targets
        for text in TEXTS
    }
    worker = TranslationWorker(translator)
    results: dict[int, TranslateResult] = {}
    reqs = [
        TranslateRequest("a", 1, "final", TEXTS, ("de", "fr")),
        TranslateRequest("b", 2, "partial", TEXTS[1:], ("fr",)),
    ]
    late = TranslateRequest("c", 3, "final", TEXTS[::-1], ("de", "fr"))
    for req in reqs:
        worker.submit(req, lambda r: results.__setitem__(r.request_id, r), 0.0)
    with torch.inference_mode():
        steps = 0
        while not worker.idle or late is not None:
            if steps == 2 and late is not None:  # joins rows already running
                worker.submit(late, lambda r: results.__setitem__(r.request_id, r), 0.0)
                late = None
            for callback, result in worker.step():
                callback(result)
            steps += 1
    for rid, texts, targets in (
        (1, TEXTS, ("de", "fr")),
        (2, TEXTS[1:], ("fr",)),
        (3, TEXTS[::-1], ("de", "fr")),
    ):
        got = results[rid].translations
        assert set(got) == set(targets)
        for t in targets:
            assert got[t] == tuple(alone[(t, text)] for text in texts)
    # one encoder pass per distinct source: a forced-BOS model shares it across targets
    assert worker.rows_decoded > 0


def test_finals_first_and_partials_superseded(checkpoints):
    translator = load(checkpoints, "m2m100")
    worker = TranslationWorker(translator, TranslateLimits(max_rows=64, max_admit_rows=1))
    order: list[int] = []
    results: dict[int, TranslateResult] = {}

    def cb(r):
        results[r.request_id] = r
        order.append(r.request_id)

    worker.submit(TranslateRequest("s", 0, "partial", ("hello",), ("de",)), cb, 0.0)
    worker.submit(TranslateRequest("s", 1, "partial", ("hello world",), ("de",)), cb, 1.0)
    worker.submit(TranslateRequest("t", 2, "final", ("the world",), ("de",)), cb, 2.0)
    with torch.inference_mode():
        first = worker.step()
        assert [r.request_id for _, r in first] == [0]  # superseded: answered at once
        assert first[0][1].error == "superseded"
        first[0][0](first[0][1])
        assert worker.running == 1 and worker.waiting == 1  # the final went first
        while not worker.idle:
            for callback, result in worker.step():
                callback(result)
    assert results[1].error is None and results[2].error is None
    assert worker.superseded == 1


def test_unknown_target_and_model_without_language_tokens(checkpoints):
    worker = TranslationWorker(load(checkpoints, "nllb"))
    got = run(worker, [TranslateRequest("s", 0, "final", ("hi",), ("xx",))])
    assert got[0].error == "no translation model for target 'xx'"
    one_pair = str(checkpoints["marian_pair"]).replace("{target}", "de")
    with pytest.raises(ConfigError, match="one model per target"):
        load_translator(TranslationSpec(one_pair, ("de", "fr"), "en", device="cpu"))


def test_engine_thread_serves_translations(checkpoints, tmp_path):
    """Translation requests go through the engine thread beside speech windows."""
    from streamer.engine.core import Engine
    from streamer.engine.decoding import Decoder
    from streamer.engine.loader import ModelSpec, load_model
    from streamer.testing.tiny_models import make_sed_bert

    decoder = Decoder(load_model(ModelSpec(id=str(make_sed_bert(tmp_path / "sed")), device="cpu")))
    translator = load(checkpoints, "mbart50")
    engine = Engine(decoder, translator=translator)
    assert engine.targets == ("de", "fr")
    results: dict[int, TranslateResult] = {}
    done = threading.Event()

    def cb(r):
        results[r.request_id] = r
        if len(results) == 2:
            done.set()

    engine.start()
    try:
        engine.submit_translation(TranslateRequest("s", 0, "final", TEXTS, ("de", "fr")), cb)
        engine.submit_translation(TranslateRequest("t", 1, "partial", TEXTS[:1], ("fr",)), cb)
        assert done.wait(60)
    finally:
        assert engine.stop()
    alone = run(
        TranslationWorker(translator), [TranslateRequest("s", 0, "final", TEXTS, ("de", "fr"))]
    )
    assert results[0].translations == alone[0].translations
    assert results[1].error is None and engine.stats.translate_requests == 2
