"""Whisper's own encoder and decoder as a real ``SpeechEncoderDecoderModel``.

Tiny-model tests check the composition, registration and loader paths fast;
the ``slow`` ones use the converted Whisper base on the real clips: the SED
checkpoint's greedy tokens equal ``WhisperForConditionalGeneration``'s, a
fresh process loads it through both loaders, and the streaming engine's finals
on the SED code path equal those on the Whisper code path.
"""

import asyncio
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import (
    AutoModelForSpeechSeq2Seq,
    SpeechEncoderDecoderModel,
    WhisperForConditionalGeneration,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from streamer.audio.resample import load_audio
from streamer.audio.sources import FileSource
from streamer.config import Config, ModelConfig, StreamingConfig
from streamer.engine import whisper_sed
from streamer.engine.client import EngineClient
from streamer.engine.core import Engine
from streamer.engine.decoding import Decoder
from streamer.engine.loader import ModelSpec, load_model
from streamer.errors import ModelLoadError
from streamer.service.engine_setup import model_spec
from streamer.service.stream_factory import StreamFactory
from streamer.testing.tiny_models import make_whisper

AUDIO = "tests/data/audio"
FR_CLIPS = ("fleurs-fr-003.ogg", "common_voice_fr_17767732.mp3", "common_voice_fr_17301936.mp3")
EN_CLIPS = ("jfk.flac", "LDC93S1_timit_sample.wav", "fleurs-en-004.ogg")


def prompt_ids(gen, lang, task):
    """Whisper's 4-token prompt from the SED checkpoint's generation config."""
    lang_id = gen.lang_to_id[f"<|{lang}|>"]
    return [gen.decoder_start_token_id, lang_id, gen.task_to_id[task], gen.no_timestamps_token_id]


def sed_greedy(model, feats, prompt, **kw):
    out = model.generate(
        input_features=feats,
        decoder_input_ids=torch.tensor([prompt]),
        do_sample=False,
        num_beams=1,
        **kw,
    )
    return out[0, len(prompt) :].tolist()


def strip_eos(tokens, eos):
    return [t for t in tokens if t != eos]


# ------------------------------------------------------------------ tiny (fast)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-sed")
    whisper = make_whisper(root / "whisper")
    # float32 storage: the tiny random weights are not float16-exact
    return whisper, whisper_sed.build_sed_from_whisper(whisper, root / "sed", torch.float32)


def test_composes_the_seed_class_from_whisper_parts(tiny):
    whisper_dir, sed_dir = tiny
    sed = SpeechEncoderDecoderModel.from_pretrained(sed_dir)
    whisper = WhisperForConditionalGeneration.from_pretrained(whisper_dir)
    assert type(sed.encoder) is whisper_sed.WhisperSEDEncoder
    assert type(sed.decoder) is whisper_sed.WhisperSEDDecoder
    assert not hasattr(sed, "enc_to_dec_proj")  # equal widths: no random projection
    n_sed = sum(p.numel() for p in sed.parameters())
    assert n_sed == sum(p.numel() for p in whisper.parameters())
    ours = {f"encoder.{k}": v for k, v in whisper.model.encoder.state_dict().items()}
    ours |= {f"decoder.model.decoder.{k}": v for k, v in whisper.model.decoder.state_dict().items()}
    state = sed.state_dict()
    assert set(ours) <= set(state)
    assert all(torch.equal(state[k], v) for k, v in ours.items())
    assert torch.equal(sed.decoder.proj_out.weight, whisper.proj_out.weight)
    assert sed.config.decoder.num_hidden_layers == whisper.config.decoder_layers
    for key in ("decoder_start_token_id", "pad_token_id", "eos_token_id"):
        assert getattr(sed.config, key) == getattr(whisper.generation_config, key)
        assert getattr(sed.generation_config, key) == getattr(whisper.generation_config, key)
    assert sed.generation_config.lang_to_id == whisper.generation_config.lang_to_id
    assert sed.generation_config.begin_suppress_tokens == list(
        whisper.generation_config.begin_suppress_tokens
    )
    assert "import streamer.engine" in (sed_dir / "README.md").read_text()


def test_tiny_greedy_tokens_equal_whisper_generate(tiny):
    whisper_dir, sed_dir = tiny
    sed = AutoModelForSpeechSeq2Seq.from_pretrained(sed_dir).eval()
    whisper = WhisperForConditionalGeneration.from_pretrained(whisper_dir).eval()
    spec = ModelSpec(id=str(sed_dir), device="cpu", dtype="float32", source_language="fr")
    dec = Decoder(load_model(spec))  # exactness: float32 (auto is bfloat16 on AMX CPUs)
    audio = load_audio(f"{AUDIO}/common_voice_fr_17767732.mp3", 16000)
    feats = dec.features([audio])["input_features"]
    prompt = prompt_ids(sed.generation_config, "fr", "translate")
    with torch.inference_mode():
        a = sed_greedy(sed, feats, prompt, max_new_tokens=12)
        b = whisper.generate(feats, language="fr", task="translate", max_new_tokens=12)
    assert a == b[0].tolist() and len(a) == 12  # tiny models never emit EOS
    assert dec.start_tokens((), "fr") == prompt
    dec.loop_guard = False
    with torch.inference_mode():
        tokens, _ = dec.greedy(dec.encode(audio), prompt, 12)
    assert tokens == a  # the engine's SED code path: decoder + KV cache


def test_loader_uses_whisper_prompt_on_the_sed_path(tiny):
    _, sed_dir = tiny
    m = load_model(ModelSpec(id=str(sed_dir), device="cpu", source_language="fr"))
    assert m.family == "sed" and m.whisper_prompt
    assert "lang_token" not in m.extra  # not the target-language token of other SEDs
    assert set(m.task_to_id) == {"transcribe", "translate"}
    gen = m.model.generation_config
    assert m.suppress_tokens == tuple(gen.suppress_tokens)
    dec = Decoder(m)
    assert not dec.trimmed  # the 30 s padded input, as SpeechEncoderDecoderModel.generate


def _config_only(src, dst, change=None):
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    if change:
        config["encoder"]["model_type"] = change
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_loader_names_the_import_when_not_registered(tiny, tmp_path, monkeypatch):
    _, sed_dir = tiny
    monkeypatch.delitem(CONFIG_MAPPING._extra_content, whisper_sed.ENCODER_MODEL_TYPE)
    with pytest.raises(ModelLoadError) as err:
        load_model(ModelSpec(id=str(sed_dir), device="cpu"))
    message = str(err.value)
    assert "streamer_whisper_encoder" in message and "import streamer.engine" in message
    assert len(message) < 400  # not transformers' list of every known model type


def test_loader_names_a_newer_streamer_for_unknown_streamer_types(tiny, tmp_path):
    _, sed_dir = tiny
    folder = _config_only(sed_dir, tmp_path / "newer", change="streamer_whisper_encoder_v9")
    with pytest.raises(ModelLoadError, match="newer streamer"):
        load_model(ModelSpec(id=str(folder), device="cpu"))


def test_other_unknown_model_types_keep_transformers_message(tiny, tmp_path):
    _, sed_dir = tiny
    folder = _config_only(sed_dir, tmp_path / "other", change="not_a_model_type")
    with pytest.raises(ModelLoadError, match="not_a_model_type") as err:
        load_model(ModelSpec(id=str(folder), device="cpu"))
    message = str(err.value)
    assert "import streamer.engine" not in message and "newer streamer" not in message


def test_rebuild_replaces_the_folder_atomically(tiny, tmp_path):
    whisper_dir, _ = tiny
    out = tmp_path / "sed"
    whisper_sed.build_sed_from_whisper(whisper_dir, out, torch.float32)
    (out / "stale").write_text("x")
    whisper_sed.build_sed_from_whisper(whisper_dir, out)
    assert not (out / "stale").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["sed"]  # no temporary folder left
    with pytest.raises(whisper_sed.ConversionError):
        whisper_sed.build_sed_from_whisper(tmp_path / "missing", tmp_path / "x")


# ------------------------------------------------------------------ Whisper base (slow)


@pytest.fixture(scope="module")
def sed_dir(whisper_base_dir, streamer_cache_dir, tmp_path_factory):
    """Built by tools/make_whisper_sed.py from the cached Whisper base (float16 storage)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tools import make_whisper_sed

    out = tmp_path_factory.mktemp("sed") / "whisper-base-sed"
    args = ["--cache-dir", str(streamer_cache_dir), "--out", str(out)]
    assert make_whisper_sed.main(args) == 0
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert make_whisper_sed.make(streamer_cache_dir, out, "float16", force=False) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime  # kept, not rebuilt
    return out


@pytest.fixture(scope="module")
def models(sed_dir, whisper_base_dir):
    sed = SpeechEncoderDecoderModel.from_pretrained(sed_dir).eval()
    whisper = WhisperForConditionalGeneration.from_pretrained(whisper_base_dir).eval()
    return sed, whisper


@pytest.mark.slow
def test_base_checkpoint_has_whisper_weights_in_fp16_storage(models, sed_dir):
    sed, whisper = models
    n = sum(p.numel() for p in sed.parameters())
    assert n == sum(p.numel() for p in whisper.parameters())
    assert 72.5e6 < n < 72.7e6
    size = (sed_dir / "model.safetensors").stat().st_size
    assert 2 * n < size < 2 * n + 1e6  # float16 on disk, proj_out tied (stored once)
    assert next(sed.parameters()).dtype == torch.float32  # loaded as float32
    sed_state = sed.state_dict()
    for k, v in whisper.model.encoder.state_dict().items():
        assert torch.equal(sed_state[f"encoder.{k}"], v), k
    for k, v in whisper.model.decoder.state_dict().items():
        assert torch.equal(sed_state[f"decoder.model.decoder.{k}"], v), k


@pytest.mark.slow
@pytest.mark.parametrize(
    ("clip", "lang", "task"),
    [(c, "fr", "translate") for c in FR_CLIPS] + [(c, "en", "transcribe") for c in EN_CLIPS],
)
def test_base_greedy_tokens_equal_whisper(models, clip, lang, task):
    sed, whisper = models
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor()
    feats = fe(load_audio(f"{AUDIO}/{clip}", 16000), sampling_rate=16000, return_tensors="pt")
    feats = feats.input_features
    eos = sed.generation_config.eos_token_id
    with torch.inference_mode():
        a = sed_greedy(sed, feats, prompt_ids(sed.generation_config, lang, task))
        b = whisper.generate(feats, language=lang, task=task, do_sample=False, num_beams=1)
    assert strip_eos(a, eos) == strip_eos(b[0].tolist(), eos)
    assert len(strip_eos(a, eos)) >= 10  # a real sentence, not an empty decode


_FRESH = textwrap.dedent(
    """
    import json, sys
    import streamer, streamer.config
    light = "torch" not in sys.modules and "transformers" not in sys.modules
    import streamer.engine  # the registration
    import torch
    from transformers import AutoModelForSpeechSeq2Seq, SpeechEncoderDecoderModel
    from streamer.audio.resample import load_audio
    from transformers import AutoFeatureExtractor
    path, clip = sys.argv[1], sys.argv[2]
    a = SpeechEncoderDecoderModel.from_pretrained(path).eval()
    b = AutoModelForSpeechSeq2Seq.from_pretrained(path).eval()
    same = all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    fe = AutoFeatureExtractor.from_pretrained(path)
    feats = fe(load_audio(clip, 16000), sampling_rate=16000, return_tensors="pt").input_features
    g = b.generation_config
    prompt = [g.decoder_start_token_id, g.lang_to_id["<|fr|>"], g.task_to_id["translate"],
              g.no_timestamps_token_id]
    with torch.inference_mode():
        out = b.generate(input_features=feats, decoder_input_ids=torch.tensor([prompt]))
    print(json.dumps({"light": light, "classes": [type(a).__name__, type(b).__name__],
                      "dtype": str(next(b.parameters()).dtype), "same": same,
                      "tokens": out[0, len(prompt):].tolist()}))
    """
)


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.getcwd())
    env.pop("PYTHONWARNINGS", None)
    return env


@pytest.mark.slow
def test_fresh_process_loads_through_both_loaders(models, sed_dir):
    clip = f"{AUDIO}/common_voice_fr_17767732.mp3"
    run = subprocess.run(
        [sys.executable, "-c", _FRESH, str(sed_dir), clip],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["light"], "a bare `import streamer` must not import torch/transformers"
    assert got["classes"] == ["SpeechEncoderDecoderModel", "SpeechEncoderDecoderModel"]
    assert got["dtype"] == "torch.float32" and got["same"]
    _, whisper = models
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor()
    feats = fe(load_audio(clip, 16000), sampling_rate=16000, return_tensors="pt").input_features
    with torch.inference_mode():
        expected = whisper.generate(feats, language="fr", task="translate")
    eos = whisper.generation_config.eos_token_id
    assert strip_eos(got["tokens"], eos) == strip_eos(expected[0].tolist(), eos)


@pytest.mark.slow
def test_transformers_alone_cannot_load_it(sed_dir, tmp_path):
    """Without streamer's registration transformers rejects the model type; the
    folder's README says what to import (the loader's own message is tested above)."""
    folder = tmp_path / "copy"
    shutil.copytree(sed_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    code = (
        "import sys\nfrom transformers import AutoModelForSpeechSeq2Seq\n"
        "try:\n    AutoModelForSpeechSeq2Seq.from_pretrained(sys.argv[1])\n"
        "except ValueError as e:\n    print(str(e)[:200]); sys.exit(3)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 3, run.stderr[-2000:]
    assert "streamer_whisper_encoder" in run.stdout
    assert "import streamer.engine" in (folder / "README.md").read_text()


# ------------------------------------------------------------------ streaming: SED = Whisper path


def _joined_french(path):
    """Two French clips with 1 s of silence between them: two segments, the second
    decoded after the first one's text as prompt."""
    a = load_audio(f"{AUDIO}/common_voice_fr_17767732.mp3", 16000)
    b = load_audio(f"{AUDIO}/common_voice_fr_17301936.mp3", 16000)
    sf.write(path, np.concatenate([a, np.zeros(16000, np.float32), b]), 16000)
    return path


async def _stream_finals(model_id, path):
    cfg = Config(
        model=ModelConfig(id=model_id, device="cpu", source_language="fr", target_language="en"),
        streaming=dataclasses.replace(StreamingConfig(), whisper_input="padded"),
    )
    loaded = load_model(model_spec(cfg))
    engine = Engine(Decoder(loaded, cfg.streaming.whisper_input))
    engine.start()
    try:
        client = EngineClient(engine)
        events, requests = [], []
        submit = client.submit

        def spy(req):
            requests.append(req)
            return submit(req)

        client.submit = spy
        runner = StreamFactory(cfg, client, events.append, partials=False).create("s")
        await runner.run(FileSource(path, "s", 16000, realtime=False).blocks())
        assert await runner.wait_done(240)
    finally:
        assert await asyncio.to_thread(engine.stop)
    finals = [(e.text, e.start, e.end, e.lang) for e in events if e.kind == "final"]
    return loaded.family, finals, [(r.audio.shape, r.prompt, r.lang) for r in requests]


@pytest.mark.slow
async def test_streaming_finals_on_the_sed_path_equal_the_whisper_path(
    sed_dir, whisper_base_dir, tmp_path
):
    path = _joined_french(tmp_path / "fr2.wav")
    fam_w, finals_w, reqs_w = await _stream_finals(str(whisper_base_dir), path)
    fam_s, finals_s, reqs_s = await _stream_finals(str(sed_dir), path)
    assert (fam_w, fam_s) == ("whisper", "sed")
    assert len(finals_w) >= 2 and any(prompt for _, prompt, _ in reqs_w[1:])
    assert reqs_s == reqs_w
    assert finals_s == finals_w
    assert "national assembly" in finals_s[0][0].lower()
