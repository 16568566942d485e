"""The evaluation tool: data sets, long streams, and whole runs on a tiny Whisper."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tools import evaluate
from tools.evaluate import Clip, group_sets, join_stream, main

AUDIO = Path(__file__).resolve().parents[1] / "data" / "audio"


# ------------------------------------------------------------------ data handling


def test_sets_group_by_folder_and_language(tmp_path):
    def clip(name, lang):
        return Clip(name, tmp_path / name, lang, "x")

    clips = [
        clip("en/a.flac", "en"),
        clip("fleurs/de.ogg", "de"),
        clip("fleurs/fr.ogg", "fr"),
        clip("fleurs/fr2.ogg", "fr"),
        clip("fr-en/z.mp3", "fr"),
        clip("top.wav", "it"),
    ]
    sets = group_sets(clips)
    assert {k: [c.name for c in v] for k, v in sets.items()} == {
        "en": ["en/a.flac"],
        "fleurs-de": ["fleurs/de.ogg"],
        "fleurs-fr": ["fleurs/fr.ogg", "fleurs/fr2.ogg"],
        "fr-en": ["fr-en/z.mp3"],
        "it": ["top.wav"],
    }


def test_long_stream_gaps_are_seeded_and_bounded():
    audios = [np.ones(100, np.float32), np.ones(50, np.float32), np.ones(10, np.float32)]
    a, gaps = join_stream(audios, 1000, np.random.default_rng(7))
    b, gaps2 = join_stream(audios, 1000, np.random.default_rng(7))
    assert gaps == gaps2 and np.array_equal(a, b)
    assert len(gaps) == 2 and all(0.3 <= g <= 2.0 for g in gaps)
    assert len(a) == 160 + sum(round(g * 1000) for g in gaps)
    assert a[100 : 100 + round(gaps[0] * 1000)].max() == 0.0  # silence between clips


# ------------------------------------------------------------------ whole runs


@pytest.fixture
def restore_threads():
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def write_manifest(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, lang, extra in rows:
        (folder / name).symlink_to(AUDIO / name)
        lines.append(json.dumps({"path": name, "lang": lang, **extra}))
    path = folder / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def finite(value):
    return isinstance(value, int | float) and math.isfinite(value)


def check_run(agg):
    """Numbers of an aggregate are finite and in sane ranges."""
    lat = agg["latency_ms"]
    for key in ("final", "partial", "first_partial"):
        s = lat[key]
        if s["n"]:
            assert all(finite(s[k]) for k in ("mean", "p50", "p95", "max")), s
            assert 0 <= s["p50"] <= s["p95"] <= s["max"] < 60_000, s
    assert lat["final"]["n"] >= 1
    assert finite(lat["laal_mean"])
    assert finite(agg["normalized_erasure"]) and agg["normalized_erasure"] >= 0
    c = agg["compute"]
    assert finite(c["rtf"]) and 0 < c["rtf"] < 50
    assert c["rtf"] == pytest.approx(c["decode_rtf"] + c["vad_rtf"], abs=1e-3)


def test_main_writes_a_report_for_transcription_and_consistency(
    tmp_path, tiny_whisper, restore_threads
):
    manifest = write_manifest(
        tmp_path / "audio",
        [
            ("LDC93S1_timit_sample.wav", "en", {"text": "she had your dark suit"}),
            ("fleurs-en-004.ogg", "en", {"text": "many people don't think about them"}),
            ("common_voice_fr_17767732.mp3", "fr", {"text": "no english reference"}),
        ],
    )
    out = tmp_path / "report.json"
    argv = [
        "--manifest", str(manifest),
        "--set", f"model.id={tiny_whisper}",
        "--set", "model.device=cpu",
        "--set", "vad.backend=silero",
        "--set", "streaming.chunk_ms=500",
        "--set", "streaming.max_tokens_per_second=3",
        "--set", "streaming.min_tokens=2",
        "--threads", "1",
        "--output", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["tool"] == "tools/evaluate.py" and report["version"] == evaluate.VERSION
    assert report["model"]["family"] == "whisper" and report["model"]["id"] == str(tiny_whisper)
    assert report["config"]["streaming"]["chunk_ms"] == 500
    assert report["config"]["vad"]["backend"] == "silero" and report["config"]["block_ms"] == 100
    assert report["machine"]["torch_threads"] == 1 and report["machine"]["cpu_count"] >= 1
    assert set(report["sets"]) == {"en", "fr"}

    en = report["sets"]["en"]
    assert (en["task"], en["output_lang"]) == ("transcribe", "en")
    agg = en["clips"]["aggregate"]
    assert agg["files"] == 2 and agg["offline"]["modes"] == ["single-window"]
    q = agg["quality"]
    assert q["basis"] == "reference" and q["metric"] == "wer"
    assert finite(q["streaming"]["wer"]) and finite(q["offline"]["wer"])
    assert q["streaming"]["ref_words"] == 5 + 7  # pooled; the normaliser reads "do not"
    check_run(agg)
    rows = en["clips"]["files"]
    assert [r["name"] for r in rows] == ["LDC93S1_timit_sample.wav", "fleurs-en-004.ogg"]
    for r in rows:
        assert r["hypothesis"] == " ".join(f["text"] for f in r["finals"])
        assert r["duration_s"] > 2 and r["offline"]["mode"] == "single-window"
        assert all(f["emitted_s"] >= f["end"] for f in r["finals"])
    long = en["long_stream"]
    assert long["clips"] == [r["name"] for r in rows] and len(long["gaps_s"]) == 1
    assert long["row"]["reference"] == "she had your dark suit many people don't think about them"
    assert long["row"]["duration_s"] == pytest.approx(
        sum(r["duration_s"] for r in rows) + long["gaps_s"][0], abs=0.01
    )
    check_run(long["aggregate"])

    fr = report["sets"]["fr"]  # Whisper translates fr -> en; the manifest has no translation
    assert fr["task"] == "translate" and fr["long_stream"] is None  # one clip: no long stream
    q = fr["clips"]["aggregate"]["quality"]
    assert q["basis"] == "offline" and "streaming" not in q
    assert finite(q["consistency"]["chrf"]) and 0 <= q["consistency"]["chrf"] <= 100
    check_run(fr["clips"]["aggregate"])


def test_offline_decode_of_long_audio_is_vad_segmented(tiny_whisper, restore_threads):
    import torch

    from streamer.audio.resample import load_audio
    from streamer.config import load_config
    from streamer.engine.decoding import Decoder
    from streamer.engine.loader import ModelSpec, load_model

    torch.set_num_threads(1)
    cfg = load_config(overrides=["vad.backend=silero", "streaming.min_tokens=2"])
    decoder = Decoder(load_model(ModelSpec(id=str(tiny_whisper), device="cpu")))
    ev = evaluate.Evaluator(cfg, decoder, block_ms=100)
    clip = load_audio(AUDIO / "jfk.flac", 16000)
    audio, _ = join_stream([clip, clip, clip], 16000, np.random.default_rng(0))
    assert len(audio) > 30 * 16000
    text, mode, seconds = ev.offline(audio, "en")
    assert mode == "vad-segmented" and text and seconds > 0
    text_short, mode_short, _ = ev.offline(clip, "en")
    assert mode_short == "single-window" and text_short


def test_bad_config_is_reported_without_loading_a_model(capsys):
    assert main(["--set", "streaming.chunk_ms=5", "--output", "/nonexistent/x.json"]) == 2
    assert "chunk_ms" in capsys.readouterr().err


def test_unknown_set_names_the_known_ones():
    with pytest.raises(SystemExit, match="known"):
        main(["--manifest", str(AUDIO / "manifest.jsonl"), "--sets", "nope"])
