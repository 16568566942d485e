"""Loading checkpoints of every family from disk through the one loader."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from streamer.engine.loader import (
    ModelSpec,
    cpu_flags,
    load_model,
    resolve_checkpoint,
    resolve_device,
    resolve_dtype,
    whisper_task,
)
from streamer.errors import ConfigError, ModelLoadError
from streamer.testing.tiny_models import make_sed_bert, make_speech2text, make_whisper


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "sed": make_sed_bert(root / "sed"),
        "whisper": make_whisper(root / "whisper"),
        "speech2text": make_speech2text(root / "s2t"),
    }


@pytest.mark.parametrize("family", ["sed", "whisper", "speech2text"])
def test_each_family_loads_from_a_folder(checkpoints, family):
    m = load_model(ModelSpec(id=str(checkpoints[family]), device="cpu", dtype="float32"))
    assert m.family == family
    assert m.device == torch.device("cpu") and m.dtype == torch.float32
    assert next(m.model.parameters()).dtype == torch.float32
    assert not m.model.training
    assert m.sample_rate == 16000
    assert isinstance(m.eos_token_id, int)
    assert m.tokenizer is not None and m.feature_extractor is not None


def test_whisper_languages_and_tasks(checkpoints):
    m = load_model(ModelSpec(id=str(checkpoints["whisper"]), device="cpu", source_language="fr"))
    assert "fr" in m.lang_to_id and "en" in m.lang_to_id
    assert set(m.task_to_id) == {"transcribe", "translate"}
    assert m.extra["sot"] == m.model.generation_config.decoder_start_token_id


def test_whisper_cannot_translate_into_german(checkpoints):
    spec = ModelSpec(id=str(checkpoints["whisper"]), source_language="fr", target_language="de")
    with pytest.raises(ConfigError, match="only into English"):
        load_model(spec)


def test_whisper_unknown_source_language(checkpoints):
    spec = ModelSpec(id=str(checkpoints["whisper"]), source_language="xx")
    with pytest.raises(ConfigError, match="not a language"):
        load_model(spec)


def test_half_precision_loads_on_cpu(checkpoints):
    m = load_model(ModelSpec(id=str(checkpoints["sed"]), device="cpu", dtype="bf16"))
    assert next(m.model.parameters()).dtype == torch.bfloat16


def test_task_rule():
    assert whisper_task("fr", "en", "auto") == "translate"
    assert whisper_task("en", "en", "auto") == "transcribe"
    assert whisper_task("fr", "en", "transcribe") == "transcribe"


def test_missing_checkpoint_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="no such model folder"):
        load_model(ModelSpec(id=str(tmp_path / "nope"), device="cpu"))
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # for the loader's hint
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import
    with pytest.raises(ModelLoadError, match=r"cannot load 'org/not-cached'.*HF_HUB_OFFLINE"):
        load_model(ModelSpec(id="org/not-cached", device="cpu"))


def test_corrupt_checkpoint_is_a_clear_error(checkpoints, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(checkpoints["sed"], bad)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError):
        load_model(ModelSpec(id=str(bad), device="cpu"))


def test_truncated_safetensors_without_a_manifest_names_the_file(checkpoints, tmp_path):
    """Any HF folder: not safetensors' bare "Error while deserializing header"."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(checkpoints["whisper"], bad)
    weights = bad / "model.safetensors"
    size = weights.stat().st_size
    os.truncate(weights, size // 2)
    with pytest.raises(ModelLoadError) as err:
        load_model(ModelSpec(id=str(bad), device="cpu"))
    message = str(err.value)
    assert "\n" not in message
    assert f"{weights} is truncated ({size // 2} of {size} bytes)" in message
    assert "deserializing" not in message


def test_a_manifest_in_a_user_folder_is_checked(checkpoints, tmp_path):
    import shutil

    from streamer.engine.cache_manifest import write_manifest

    folder = tmp_path / "mine"
    shutil.copytree(checkpoints["whisper"], folder)
    write_manifest(folder)
    assert load_model(ModelSpec(id=str(folder), device="cpu")).family == "whisper"
    weights = folder / "model.safetensors"
    with open(weights, "r+b") as fh:  # same size: would load and decode garbage
        fh.seek(weights.stat().st_size // 2)
        fh.write(os.urandom(1000))
    with pytest.raises(ModelLoadError) as err:
        load_model(ModelSpec(id=str(folder), device="cpu"))
    message = str(err.value)
    assert "\n" not in message
    assert f"{weights} is corrupt" in message


def test_devices_and_dtypes():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in {"cpu", "cuda"}
    on_amx = "amx_bf16" in cpu_flags()
    assert resolve_dtype("auto", torch.device("cpu")) == (
        torch.bfloat16 if on_amx else torch.float32
    )
    assert resolve_dtype("fp16", torch.device("cpu")) == torch.float16
    with pytest.raises(ConfigError):
        resolve_dtype("int3", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA"):
            resolve_device("cuda:0")


def test_unknown_builtin():
    with pytest.raises(ConfigError, match="unknown builtin"):
        resolve_checkpoint("builtin:nothing")
    assert resolve_checkpoint("org/model") == "org/model"


def test_sed_target_language_picks_the_decoders_language_token(tmp_path):
    from streamer.engine.decoding import Decoder
    from streamer.testing.tiny_models import make_sed_mbart

    path = make_sed_mbart(tmp_path / "mbart")
    m = load_model(ModelSpec(id=str(path), device="cpu", target_language="fr"))
    fr = m.tokenizer.convert_tokens_to_ids("fr_XX")
    assert m.extra["lang_token"] == fr
    start = m.model.generation_config.decoder_start_token_id
    assert Decoder(m).start_tokens((), None) == [start, fr]
    de = load_model(ModelSpec(id=str(path), device="cpu", target_language="de"))
    assert de.extra["lang_token"] == m.tokenizer.convert_tokens_to_ids("de_DE")


#: Logs a transformers warning before and after ``load_model`` ran (and failed:
#: the hook runs before the checkpoint is looked for), our JSON format on stdout.
TRANSFORMERS_LOGS = textwrap.dedent(
    """
    import sys
    from transformers.utils import logging as hf_logging
    from streamer.engine.loader import ModelSpec, load_model
    from streamer.errors import ModelLoadError
    from streamer.service.logs import setup_logging

    setup_logging("info", "json", stream=sys.stdout)
    hf_logging.get_logger("transformers.x").warning("before the hook")
    try:
        load_model(ModelSpec(id="/nonexistent/model", device="cpu"))
    except ModelLoadError:
        pass
    hf_logging.get_logger("transformers.x").warning("after the hook password=%s", "hunter22")
    """
)


def test_transformers_records_go_through_our_handler_once_a_model_loads():
    # transformers lets its records propagate by itself when $CI is set: not here
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    done = subprocess.run(
        [sys.executable, "-c", TRANSFORMERS_LOGS],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env=env,
    )
    # before: transformers' own handler, its format, on the raw stderr
    assert "[transformers] before the hook" in done.stderr
    assert "after the hook" not in done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines() if "the hook" in line]
    assert len(lines) == 1, done.stdout
    (record,) = lines
    assert record["logger"] == "transformers.x"
    assert record["level"] == "warning"
    assert record["message"] == "after the hook password=***"  # our secret filter ran
