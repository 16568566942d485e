"""Targets from the speech decode itself, end to end over /v1/stream (no cascade).

A tiny random SED with an mBART-50 decoder (language tokens ``de_DE``,
``fr_XX``...) stands in for facebook/wav2vec2-xls-r-300m-en-to-15: with
``[translation] targets`` and no translation model the daemon decodes every
window once more per target, from the same encoder pass.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from streamer.config import TranslationConfig, validate_config
from streamer.errors import ConfigError
from streamer.testing.tiny_models import make_sed_mbart

from .test_ingest import make_config, running, stream_clip
from .test_translation_daemon import check_targets


@pytest.fixture(scope="module")
def sed_mbart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_sed_mbart(tmp_path_factory.mktemp("sed") / "sed_mbart")


async def test_two_targets_from_the_speech_decode(sed_mbart: Path) -> None:
    cfg = make_config(sed_mbart)
    cfg = dataclasses.replace(cfg, translation=TranslationConfig(targets="de,fr"))
    validate_config(cfg)  # no translation.model needed for an SED
    async with running(cfg) as app:
        engine = app.engine
        assert engine is not None
        assert engine.translation is None and engine.targets == ("de", "fr")
        events = await stream_clip(app, "alice")
        check_targets(events, ("de", "fr"))  # "target" on each, finals per source final
        source = [e for e in events if "target" not in e]
        assert source and all(e.get("target") is None for e in source)
        finals = [e["text"] for e in events if e["type"] == "final"]
        assert len(set(finals)) == len(finals)  # each target in its own language
        plain = await stream_clip(app, "bob", targets=[])
        assert plain and not [e for e in plain if "target" in e]
        assert engine.stats.translate_requests == 0


def test_targets_without_a_translation_model_on_whisper(tiny_whisper: Path) -> None:
    cfg = dataclasses.replace(
        make_config(tiny_whisper), translation=TranslationConfig(targets="de")
    )
    with pytest.raises(ConfigError, match=r"need translation\.model"):
        validate_config(cfg)  # a Whisper folder cannot decode targets itself


def test_transcribe_targets_from_the_speech_decode(sed_mbart: Path, tmp_path: Path) -> None:
    """``--target-language de,fr`` on a speech model with language tokens: no cascade,
    one subtitle file per language, each target's cues on the source's segments."""
    from streamer import cli

    clip = Path(__file__).resolve().parents[1] / "data" / "audio" / "jfk.flac"
    out = tmp_path / "subs"
    out.mkdir()
    args = ["transcribe", "--model", str(sed_mbart), "--device", "cpu", "--dtype", "float32",
            "--source-language", "en", "--target-language", "de,fr", "--format", "vtt",
            "-o", str(out), str(clip)]  # fmt: skip
    assert cli.main(args) == 0
    files = {p.name: p.read_text(encoding="utf-8") for p in out.iterdir()}
    assert sorted(files) == ["jfk.de.vtt", "jfk.fr.vtt", "jfk.vtt"]
    assert all(text.startswith("WEBVTT\n\n") for text in files.values())
    assert files["jfk.de.vtt"] != files["jfk.fr.vtt"]  # two decodes, not one copied
