"""Tiny checkpoints: they save, reload through the Auto classes and decode the same."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import (
    AutoFeatureExtractor,
    AutoModelForSpeechSeq2Seq,
    AutoProcessor,
    AutoTokenizer,
    SpeechEncoderDecoderModel,
)

from streamer.testing.tiny_models import (
    BUILDERS,
    FAMILIES,
    GENERATE_KWARGS,
    SAMPLING_RATE,
    build_sed_bert,
    build_sed_mbart,
    build_whisper,
    sed_base_config,
)

CLIP = Path(__file__).resolve().parents[1] / "data" / "audio" / "fleurs-en-004.ogg"
NEW_TOKENS = 5


@pytest.fixture(scope="module")
def one_second() -> np.ndarray:
    audio, rate = sf.read(CLIP, dtype="float32")
    assert rate == SAMPLING_RATE and audio.ndim == 1
    clip: np.ndarray = audio[:rate]
    return clip


def greedy(model: Any, features: Any, family: str, new_tokens: int = NEW_TOKENS) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(
            **features,
            do_sample=False,
            num_beams=1,
            max_new_tokens=new_tokens,
            **GENERATE_KWARGS[family],
        )
    assert isinstance(out, torch.Tensor)
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_saved_checkpoint_reloads_and_decodes_the_same(
    family: str, tmp_path: Path, one_second: np.ndarray
) -> None:
    original: Any = BUILDERS[family]()
    path = original.save(tmp_path / family)

    model: Any = AutoModelForSpeechSeq2Seq.from_pretrained(path).eval()
    feature_extractor: Any = AutoFeatureExtractor.from_pretrained(path)  # type: ignore[no-untyped-call]
    tokenizer: Any = AutoTokenizer.from_pretrained(path)
    processor: Any = AutoProcessor.from_pretrained(path)  # type: ignore[no-untyped-call]
    assert type(model) is type(original.model)
    assert type(feature_extractor) is type(original.feature_extractor)
    assert type(tokenizer) is type(original.tokenizer)
    assert type(processor) is type(original.processor)
    assert (path / "preprocessor_config.json").is_file()

    features = feature_extractor(one_second, sampling_rate=SAMPLING_RATE, return_tensors="pt")
    before = original.feature_extractor(
        one_second, sampling_rate=SAMPLING_RATE, return_tensors="pt"
    )
    assert features.keys() == before.keys()
    assert all(torch.equal(features[key], before[key]) for key in features)

    reloaded_tokens = greedy(model, features, family)
    assert torch.equal(reloaded_tokens, greedy(original.model, features, family))

    # Whisper returns only the new tokens, the other families the start token too.
    start = model.generation_config.decoder_start_token_id
    if family == "whisper":
        assert reloaded_tokens.shape == (1, NEW_TOKENS)
    else:
        assert reloaded_tokens.shape == (1, NEW_TOKENS + 1)
        assert reloaded_tokens[0, 0].item() == start
    new = reloaded_tokens[0, -NEW_TOKENS:].tolist()
    assert model.generation_config.eos_token_id not in new
    text = tokenizer.decode(new)
    assert isinstance(text, str) and text


@pytest.mark.parametrize("family", list(FAMILIES))
def test_special_ids_agree_with_tokenizer(family: str) -> None:
    built: Any = BUILDERS[family]()
    tokenizer, generation = built.tokenizer, built.model.generation_config
    config = built.model.config
    text_config = config.decoder if isinstance(built.model, SpeechEncoderDecoderModel) else config
    assert text_config.vocab_size == len(tokenizer)
    assert generation.eos_token_id == tokenizer.eos_token_id == config.eos_token_id
    assert generation.pad_token_id == tokenizer.pad_token_id == config.pad_token_id
    assert generation.decoder_start_token_id == config.decoder_start_token_id
    assert 0 <= generation.decoder_start_token_id < len(tokenizer)
    head = built.model.get_output_embeddings()
    assert head.weight is not built.model.get_input_embeddings().weight
    assert not head.weight[generation.eos_token_id].any()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_output_varies(family: str, one_second: np.ndarray) -> None:
    """Engine tests compare token streams: one repeated token would hide off-by-one bugs."""
    built: Any = BUILDERS[family]()
    features = built.feature_extractor(one_second, sampling_rate=SAMPLING_RATE, return_tensors="pt")
    new = greedy(built.model, features, family, new_tokens=12)[0, -12:].tolist()
    assert len(set(new)) >= 3, new


@pytest.mark.parametrize("family", list(FAMILIES))
def test_makers_are_deterministic_per_seed(family: str, tmp_path: Path) -> None:
    make = FAMILIES[family]
    first = (make(tmp_path / "a") / "model.safetensors").read_bytes()
    again = (make(tmp_path / "b") / "model.safetensors").read_bytes()
    other = (make(tmp_path / "c", seed=1) / "model.safetensors").read_bytes()  # type: ignore[call-arg]
    assert first == again
    assert first != other


def test_building_leaves_the_callers_rng_alone() -> None:
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    build_sed_bert(seed=7)
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize(
    "text", ["hello world, le café est là", "das ist gut 42.", "the stream is it"]
)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_tokenizers_round_trip_text(family: str, text: str) -> None:
    tokenizer: Any = BUILDERS[family]().tokenizer
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids or tokenizer.unk_token_id == tokenizer.eos_token_id
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("family", ["sed_gpt2", "whisper"])
def test_byte_level_tokens_split_multibyte_characters(family: str) -> None:
    tokenizer: Any = BUILDERS[family]().tokenizer
    text = "Grüße, è 日本 café"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    for char, n_bytes in (("è", 2), ("日", 3)):
        pieces = tokenizer(char, add_special_tokens=False)["input_ids"]
        assert len(pieces) == n_bytes
        assert all(tokenizer.decode([piece]) == "\ufffd" for piece in pieces)
    # Words of the small vocabulary after a space are single tokens.
    for word in (" café", " the", " nicht"):
        assert len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1


def test_whisper_generate_uses_the_language_and_task_prompt(one_second: np.ndarray) -> None:
    built: Any = build_whisper()
    tokenizer, model = built.tokenizer, built.model
    tokenizer.set_prefix_tokens(language="fr", task="translate")
    prompt = tokenizer.prefix_tokens
    assert tokenizer.convert_ids_to_tokens(prompt) == [
        "<|startoftranscript|>",
        "<|fr|>",
        "<|translate|>",
        "<|notimestamps|>",
    ]
    generation = model.generation_config
    assert generation.lang_to_id["<|fr|>"] == prompt[1]
    assert generation.task_to_id["translate"] == prompt[2]
    assert generation.no_timestamps_token_id == prompt[3] == len(tokenizer) - 1

    features = built.feature_extractor(one_second, sampling_rate=SAMPLING_RATE, return_tensors="pt")
    tokens = greedy(model, features, "whisper", new_tokens=1)
    with torch.no_grad():
        logits = model(
            input_features=features["input_features"], decoder_input_ids=torch.tensor([prompt])
        ).logits[0, -1]
    logits[generation.begin_suppress_tokens] = -torch.inf
    assert tokens[0, 0].item() == int(logits.argmax())

    # Without a language, generate() detects one among lang_to_id and still runs.
    with torch.no_grad():
        detected = model.generate(**features, max_new_tokens=2, do_sample=False)
    assert detected.shape == (1, 2)


def test_size_overrides_reach_the_configs() -> None:
    whisper = build_whisper(d_model=48, decoder_layers=3).model.config
    assert (whisper.d_model, whisper.decoder_layers, whisper.encoder_layers) == (48, 3, 2)

    sed: Any = build_sed_bert(encoder_num_hidden_layers=3, decoder_hidden_size=64).model
    assert sed.config.encoder.num_hidden_layers == 3
    assert sed.config.decoder.hidden_size == 64
    assert sed.enc_to_dec_proj.in_features == 48 and sed.enc_to_dec_proj.out_features == 64

    with pytest.raises(ValueError, match="d_modle"):
        build_whisper(d_modle=48)
    with pytest.raises(ValueError, match="encoder_"):
        build_sed_bert(hidden_size=64)
    with pytest.raises(ValueError, match="vocab_size"):
        build_sed_bert(decoder_vocab_size=99)


def test_mbart_decoder_layers_keep_generate_working() -> None:
    model: Any = build_sed_mbart(decoder_decoder_layers=3).model
    assert model.config.decoder.decoder_layers == model.config.decoder.encoder_layers == 3
    assert model.generation_config.forced_eos_token_id is None
    with torch.no_grad():
        out = model.generate(input_values=torch.zeros(1, 8000), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 4)


def test_base_config_has_base_size() -> None:
    with torch.device("meta"):
        model: Any = SpeechEncoderDecoderModel(config=sed_base_config())
    params = sum(p.numel() for p in model.parameters())
    assert 250e6 < params < 262e6
    assert model.config.encoder.feat_extract_norm == "layer"
    assert (model.config.encoder.hidden_size, model.config.decoder.hidden_size) == (768, 768)
    assert model.config.decoder.vocab_size == 30_522
