"""The streaming decoder on the real (converted) Whisper base."""

import dataclasses

import pytest

from streamer.audio.resample import load_audio
from streamer.core.session import DecodeRequest
from streamer.engine.decoding import Decoder
from streamer.engine.loader import ModelSpec, load_model

pytestmark = pytest.mark.slow

FR = "tests/data/audio/common_voice_fr_17767732.mp3"
EN = "tests/data/audio/jfk.flac"


@pytest.fixture(scope="module")
def whisper(streamer_cache_dir):
    spec = ModelSpec(cache_dir=str(streamer_cache_dir), device="cpu", source_language="auto")
    return Decoder(load_model(spec))


def request(audio, lang, forced=(), max_new=60):
    return DecodeRequest("s", 0, "final", 0, audio, 0, len(audio), (), tuple(forced), max_new, lang)


def test_detects_the_spoken_language(whisper):
    for path, lang in ((EN, "en"), (FR, "fr")):
        enc = whisper.encode(load_audio(path, 16000))
        assert whisper.detect_language(enc) == lang


def test_translates_french_with_detected_language(whisper):
    res = whisper.run(request(load_audio(FR, 16000), None))
    assert res.lang == "fr"
    text = b"".join(res.pieces).decode()
    assert "national assembly" in text.lower()


def test_byte_pieces_spell_accented_text_exactly(whisper, monkeypatch):
    # transcribing French keeps the accents that byte-level BPE splits over tokens
    monkeypatch.setattr(
        whisper.m, "spec", dataclasses.replace(whisper.m.spec, target_language="fr")
    )
    audio = load_audio(FR, 16000)
    res = whisper.run(request(audio, "fr"))
    text = b"".join(res.pieces).decode("utf-8")
    assert text == whisper.m.tokenizer.decode(list(res.tokens), skip_special_tokens=True)
    assert "é" in text
