"""Incremental KV-cache decoding equals generate() exactly (fp32, CPU, tiny models)."""

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import GenerationMixin

from streamer.core.session import DecodeRequest
from streamer.engine.decoding import Decoder, find_loop
from streamer.engine.loader import ModelSpec, load_model
from streamer.testing.tiny_models import FAMILIES

AUDIO = "tests/data/audio/fleurs-en-004.ogg"


@pytest.fixture(scope="module")
def clip():
    audio, sr = sf.read(AUDIO, dtype="float32")
    assert sr == 16000
    return audio


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def decoder(request, tmp_path_factory):
    path = FAMILIES[request.param](tmp_path_factory.mktemp(request.param))
    loaded = load_model(
        ModelSpec(id=str(path), device="cpu", dtype="float32", source_language="fr")
    )
    dec = Decoder(loaded, "padded")  # generate() runs the stock 30 s Whisper encoder
    dec.loop_guard = False  # random weights repeat themselves; compare raw greedy
    return dec


def reference_generate(
    dec: Decoder, audio, prefix: list[int], n: int, num_beams: int = 1
) -> list[int]:
    """generate(do_sample=False, num_beams=1) continuing ``prefix`` on the same input."""
    feats = dec.features([audio])
    model = dec.model
    kwargs = dict(
        decoder_input_ids=torch.tensor([prefix]),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        num_beams=num_beams,
    )
    kwargs.update(feats)
    if dec.m.family == "whisper":
        # Whisper's own generate() rebuilds the prompt; the generic mixin continues ours
        # with the same suppress processors from the generation config.
        out = GenerationMixin.generate(model, **kwargs)
    else:
        out = model.generate(**kwargs)
    return out[0, len(prefix) :].tolist()


@pytest.mark.parametrize("seconds", [1.0, 3.3])
def test_incremental_decode_equals_generate(decoder, clip, seconds):
    audio = clip[: int(seconds * 16000)]
    prefix = decoder.start_tokens((), "fr")
    enc = decoder.encode(audio)
    ours, looped = decoder.greedy(enc, prefix, 12)
    assert not looped
    assert ours == reference_generate(decoder, audio, prefix, 12)


def test_forced_prefix_continuation_equals_generate(decoder, clip):
    audio = clip[: 2 * 16000]
    start = decoder.start_tokens((), "fr")
    enc = decoder.encode(audio)
    free, _ = decoder.greedy(enc, start, 10)
    forced = free[:4]
    ours, _ = decoder.greedy(enc, start + forced, 6)
    assert ours == reference_generate(decoder, audio, start + forced, 6)
    assert ours == free[4:10]  # forcing the model's own tokens changes nothing


def test_run_returns_pieces_that_spell_the_text(decoder, clip):
    audio = clip[:16000]
    req = DecodeRequest("s", 0, "partial", 0, audio, 0, len(audio), (), (), 8, lang="fr")
    res = decoder.run(req)
    assert len(res.tokens) == len(res.pieces) == 8
    text = b"".join(res.pieces).decode("utf-8", errors="replace").strip()
    expected = decoder.m.tokenizer.decode(list(res.tokens), skip_special_tokens=True).strip()
    assert text.replace(" ", "") == expected.replace(" ", "")


def test_find_loop():
    assert find_loop([1, 2, 3, 4]) is None
    assert find_loop([9] + [5] * 6) == 2
    assert find_loop([1, 2, 3] * 6) == 3
    assert find_loop([1, 2, 3] * 5) is None  # 15 tokens: not yet
    assert find_loop([7, 8] * 3) is None  # "New York, New York" is speech
    phrase = list(range(100, 115))  # a 15-token sentence
    assert find_loop([1, *phrase]) is None
    assert find_loop([1, *phrase, *phrase[:10]]) is None
    assert find_loop([1, *phrase, *phrase]) == 16  # said twice: cut after the first
    assert find_loop([1, *phrase, *phrase, 100]) == 17  # (a rotation of it, twice)


def test_loop_guard_cuts_runaway_hypothesis(decoder, clip, monkeypatch):
    """A decoder stuck in a 3-token cycle is cut after the first cycle."""
    vocab = decoder.model.get_output_embeddings().weight.shape[0]
    cycle = [t for t in range(vocab) if t not in decoder.pieces.special][5:8]
    calls = []

    def looping_logits(ids, enc, cache):
        logits = torch.zeros(1, vocab)
        logits[0, cycle[len(calls) % 3]] = 10.0
        calls.append(1)
        return logits

    monkeypatch.setattr(decoder, "logits", looping_logits)
    monkeypatch.setattr(decoder, "loop_guard", True)
    monkeypatch.setattr(decoder, "_suppress", torch.tensor([], dtype=torch.long))
    monkeypatch.setattr(decoder, "_begin_suppress", torch.tensor([], dtype=torch.long))
    out, looped = decoder.greedy(None, [0], 200)
    assert looped
    assert out == cycle
    assert len(calls) < 20  # stopped early, not at the length cap


def test_window_audio_shapes(decoder):
    enc = decoder.encode(np.zeros(8000, dtype=np.float32))
    assert enc.hidden.ndim == 3 and enc.hidden.shape[0] == 1


def test_trimmed_whisper_encoder_equals_stock_on_30_seconds(tmp_path, clip):
    from streamer.testing.tiny_models import make_whisper

    loaded = load_model(ModelSpec(id=str(make_whisper(tmp_path / "w")), device="cpu"))
    padded, trimmed = Decoder(loaded, "padded"), Decoder(loaded, "trimmed")
    audio = np.zeros(30 * 16000, dtype=np.float32)
    audio[: len(clip)] = clip
    with torch.inference_mode():
        a = padded.encode(audio).hidden
        b = trimmed.encode(audio).hidden
        short = trimmed.encode(clip[:16000]).hidden
    assert torch.equal(a, b)
    assert short.shape[1] == 200  # (1 s + 3 s of silence) = 400 mel frames = 200 encoder frames


def test_whisper_input_must_be_known(decoder):
    with pytest.raises(ValueError, match="padded or trimmed"):
        Decoder(decoder.m, "cropped")


def test_beam_search_equals_generate_with_beams(decoder, clip):
    audio = clip[: 2 * 16000]
    prefix = decoder.start_tokens((), "fr")
    ours, _ = decoder.beam(decoder.encode(audio), prefix, 10, 3)
    assert ours == reference_generate(decoder, audio, prefix, 10, num_beams=3)


def test_one_beam_is_greedy(decoder, clip):
    enc = decoder.encode(clip[:16000])
    prefix = decoder.start_tokens((), "fr")
    assert decoder.beam(enc, prefix, 8, 1) == decoder.greedy(enc, prefix, 8)


def test_trimmed_whisper_decode_equals_generate_on_the_same_encoder_states(tmp_path, clip):
    from transformers.modeling_outputs import BaseModelOutput

    from streamer.testing.tiny_models import make_whisper

    loaded = load_model(ModelSpec(id=str(make_whisper(tmp_path / "w")), device="cpu"))
    dec = Decoder(loaded, "trimmed")
    dec.loop_guard = False
    enc = dec.encode(clip[: 2 * 16000])
    prefix = dec.start_tokens((), "fr")
    ours, _ = dec.greedy(enc, prefix, 10)
    out = GenerationMixin.generate(
        dec.model,
        encoder_outputs=BaseModelOutput(last_hidden_state=enc.hidden),
        decoder_input_ids=torch.tensor([prefix]),
        max_new_tokens=10,
        min_new_tokens=10,
        do_sample=False,
        num_beams=1,
    )
    assert ours == out[0, len(prefix) :].tolist()


def test_a_request_may_choose_its_task(decoder):
    m = decoder.m
    if m.family != "whisper":
        assert decoder.start_tokens((), "fr", "translate") == decoder.start_tokens((), "fr")
        return
    sot, fr = m.extra["sot"], m.lang_to_id["fr"]
    translate, transcribe = m.task_to_id["translate"], m.task_to_id["transcribe"]
    notimestamps = m.extra["no_timestamps"]
    # configured: fr -> en, task auto: translate
    assert decoder.start_tokens((), "fr") == [sot, fr, translate, notimestamps]
    assert decoder.start_tokens((), "fr", "transcribe") == [sot, fr, transcribe, notimestamps]
    # English speech with target English: transcribe, unless the request says otherwise
    en = m.lang_to_id["en"]
    assert decoder.start_tokens((), "en", None) == [sot, en, transcribe, notimestamps]
    assert decoder.start_tokens((), "en", "translate") == [sot, en, translate, notimestamps]
