"""streamer.config_checks: what serve refuses after loading, found without the weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from streamer.config import ConfigReport, check_config
from streamer.config_checks import (
    BUILTIN_FACTS,
    WHISPER_LANGUAGES,
    check_everything,
    check_files,
    check_model,
    family_of,
    model_facts,
)
from streamer.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
AUDIO = ROOT / "tests" / "data" / "audio"
WHISPER_GEN = {
    "lang_to_id": {"<|en|>": 50259, "<|fr|>": 50265},
    "task_to_id": {"transcribe": 50360, "translate": 50359},
    "is_multilingual": True,
}


def report_of(tmp_path: Path, text: str, *overrides: str) -> ConfigReport:
    path = tmp_path / "site.toml"
    path.write_text(text, encoding="utf-8")
    return check_config([path], list(overrides))


def keys(errors: list[ConfigError]) -> list[str | None]:
    return [e.key for e in errors]


def model_folder(tmp_path: Path, name: str = "model", **files: dict[str, Any]) -> Path:
    """A checkpoint folder with the given JSON files (``config``, ``generation_config``, ...)."""
    folder = tmp_path / name
    folder.mkdir()
    for stem, data in files.items():
        (folder / f"{stem}.json").write_text(json.dumps(data), encoding="utf-8")
    return folder


# ---------------------------------------------------------------- the model


def test_whisper_with_target_language_de_is_refused(tmp_path: Path) -> None:
    report = report_of(tmp_path, '[model]\ntarget_language = "de"\n')
    assert report.errors == ()  # every key is fine on its own ...
    errors = check_model(report)  # ... but Whisper translates only into English
    assert keys(errors) == ["model.target_language"]
    assert errors[0].file == str(tmp_path / "site.toml")
    assert "Whisper translates only into English" in str(errors[0])


@pytest.mark.parametrize(
    "model",
    [
        'source_language = "de"\ntarget_language = "de"',  # transcription: fine
        'source_language = "fr"\ntarget_language = "en"',  # translation into English
        'source_language = "auto"\ntarget_language = "en"',
        'source_language = "de"\ntarget_language = "en"\ntask = "transcribe"',
    ],
)
def test_whisper_settings_that_serve_accepts(tmp_path: Path, model: str) -> None:
    assert check_model(report_of(tmp_path, f"[model]\n{model}\n")) == []


def test_whisper_source_language_must_be_a_whisper_language(tmp_path: Path) -> None:
    report = report_of(tmp_path, '[model]\nsource_language = "xx"\ntarget_language = "xx"\n')
    assert keys(check_model(report)) == ["model.source_language"]


def test_builtin_whisper_languages_are_whisper_base_s() -> None:
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    assert len(WHISPER_LANGUAGES) == 99
    assert set(LANGUAGES) - WHISPER_LANGUAGES == {"yue"}  # large-v3 only


def test_unknown_builtin_model(tmp_path: Path) -> None:
    errors = check_model(report_of(tmp_path, '[model]\nid = "builtin:whisper-tiny"\n'))
    assert keys(errors) == ["model.id"] and "unknown builtin model" in str(errors[0])


@pytest.mark.parametrize(
    "config",
    [{"model_type": "whisper"}, {"architectures": ["WhisperForConditionalGeneration"]}],
)
def test_folder_with_a_whisper_config_json_is_whisper(tmp_path: Path, config: dict) -> None:
    folder = model_folder(tmp_path, config=config, generation_config=WHISPER_GEN)
    facts = model_facts(str(folder))
    assert facts is not None and facts.family == "whisper" and facts.whisper_prompt
    assert facts.languages == {"en", "fr"}
    text = '[model]\nid = "./model"\ntarget_language = "de"\n'
    text += '[websocket]\nclient_languages = "fr,de,auto"\n'
    errors = check_model(report_of(tmp_path, text))
    assert keys(errors) == ["model.target_language", "websocket.client_languages"]
    assert "'de' is not a language of this model" in str(errors[1])


def test_folder_whisper_without_generation_config_is_refused(tmp_path: Path) -> None:
    model_folder(tmp_path, config={"model_type": "whisper"})
    errors = check_model(report_of(tmp_path, '[model]\nid = "./model"\n'))
    assert keys(errors) == ["model.id"] and "lacks task_to_id" in str(errors[0])


def test_folder_whisper_languages_come_from_its_generation_config(tmp_path: Path) -> None:
    model_folder(tmp_path, config={"model_type": "whisper"}, generation_config=WHISPER_GEN)
    text = '[model]\nid = "./model"\nsource_language = "de"\ntarget_language = "en"\n'
    assert keys(check_model(report_of(tmp_path, text))) == ["model.source_language"]


def test_sed_without_whisper_prompt_has_a_fixed_language(tmp_path: Path) -> None:
    model_folder(tmp_path, config={"model_type": "speech-encoder-decoder"})
    text = '[model]\nid = "./model"\ntarget_language = "de"\n'  # its decoder picks "de"
    assert check_model(report_of(tmp_path, text)) == []
    errors = check_model(report_of(tmp_path, text + '[websocket]\nclient_tasks = "translate"\n'))
    assert keys(errors) == ["websocket.client_tasks"]
    assert "fixed language and task" in str(errors[0])


def test_sed_with_whisper_prompt_tables_is_checked_like_whisper(tmp_path: Path) -> None:
    model_folder(
        tmp_path,
        config={"model_type": "speech-encoder-decoder"},
        generation_config=WHISPER_GEN,
    )
    facts = model_facts(str(tmp_path / "model"))
    assert facts is not None and facts.family == "sed" and facts.whisper_prompt
    text = '[model]\nid = "./model"\ntarget_language = "de"\n'
    assert keys(check_model(report_of(tmp_path, text))) == ["model.target_language"]


def test_missing_folder_and_folder_without_config_json(tmp_path: Path) -> None:
    errors = check_model(report_of(tmp_path, '[model]\nid = "./nowhere"\n'))
    assert keys(errors) == ["model.id"] and "no such model folder" in str(errors[0])
    (tmp_path / "empty").mkdir()
    errors = check_model(report_of(tmp_path, '[model]\nid = "./empty"\n'))
    assert keys(errors) == ["model.id"] and "no config.json" in str(errors[0])
    model_folder(tmp_path, "broken")
    (tmp_path / "broken" / "config.json").write_text("{", encoding="utf-8")
    errors = check_model(report_of(tmp_path, '[model]\nid = "./broken"\n'))
    assert keys(errors) == ["model.id"] and "cannot read config.json" in str(errors[0])


def test_hub_model_not_in_the_cache_is_not_judged(tmp_path: Path) -> None:
    text = '[model]\nid = "nobody/not-a-cached-model"\ntarget_language = "de"\n'
    assert check_model(report_of(tmp_path, text)) == []


def test_family_of() -> None:
    assert family_of({"model_type": "speech_to_text"}) == "speech2text"
    assert family_of({"architectures": ["SpeechEncoderDecoderModel"]}) == "sed"
    assert family_of({"model_type": "bert", "architectures": ["Whisper"]}) == "generic"
    assert family_of({}) == "generic"


def test_silero_vad_needs_16_khz(tmp_path: Path) -> None:
    model_folder(
        tmp_path,
        config={"model_type": "speech_to_text"},
        preprocessor_config={"sampling_rate": 8000},
    )
    errors = check_model(report_of(tmp_path, '[model]\nid = "./model"\n'))
    assert keys(errors) == ["vad.backend"] and "8000 Hz" in str(errors[0])
    text = '[model]\nid = "./model"\n[vad]\nbackend = "energy"\n'
    assert check_model(report_of(tmp_path, text)) == []


def test_cuda_device_must_exist(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        text, expected = f'[model]\ndevice = "cuda:{torch.cuda.device_count()}"\n', "device(s)"
    else:
        text, expected = '[model]\ndevice = "cuda"\n', "no CUDA device"
    errors = check_model(report_of(tmp_path, text))
    assert keys(errors) == ["model.device"] and expected in str(errors[0])


def test_refused_model_id_skips_the_model_checks(tmp_path: Path) -> None:
    report = report_of(tmp_path, '[model]\nid = ""\ntarget_language = "de"\n')
    assert keys(list(report.errors)) == ["model.id"]
    assert check_model(report) == []
    assert BUILTIN_FACTS.languages == WHISPER_LANGUAGES


# ---------------------------------------------------------------- files


def test_files_that_serve_opens(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("\n", encoding="utf-8")
    (tmp_path / "cert.pem").write_text("not a certificate\n", encoding="utf-8")
    (tmp_path / "key.pem").write_text("not a key\n", encoding="utf-8")
    (tmp_path / "noise.wav").write_bytes(b"RIFF nonsense")
    text = f"""\
[websocket]
auth_token_file = "token"
tls_cert = "cert.pem"
tls_key = "key.pem"

[jsonl]
path = "no-such-folder/events.jsonl"

[[sources]]
type = "file"
path = "noise.wav"

[[sources]]
type = "file"
path = "{AUDIO / "jfk.flac"}"
"""
    errors = check_files(report_of(tmp_path, text))
    assert keys(errors) == [
        "sources[0].path",
        "websocket.auth_token_file",
        "websocket.tls_cert",
        "jsonl.path",
    ]
    assert all(e.file == str(tmp_path / "site.toml") for e in errors)
    assert "is empty" in str(errors[1]) and "cannot load TLS certificate" in str(errors[2])


def test_websocket_files_are_not_read_when_it_is_off(tmp_path: Path) -> None:
    text = '[websocket]\nenabled = false\nauth_token_file = "/nonexistent/token"\n'
    assert check_files(report_of(tmp_path, text)) == []


def test_mqtt_settings_and_files(tmp_path: Path) -> None:
    text = """\
[mqtt]
enabled = true
prefix = "/streamer"
username = "u"
password_file = "missing-password"
tls = true
tls_ca = "missing-ca.pem"
"""
    errors = check_files(report_of(tmp_path, text))
    assert keys(errors) == ["mqtt.password_file", "mqtt.prefix", "mqtt.tls_ca"]
    assert "cannot read password file" in str(errors[0])
    assert "cannot load TLS files" in str(errors[2])


def test_mqtt_errors_of_config_py_are_not_repeated(tmp_path: Path) -> None:
    report = report_of(tmp_path, '[mqtt]\nenabled = true\npassword = "p"\n')
    assert keys(list(report.errors)) == ["mqtt.username"]
    assert check_files(report) == []


# ---------------------------------------------------------------- together


def test_good_configs_pass(tmp_path: Path) -> None:
    for path in (ROOT / "configs" / "default.toml", None):
        report = check_config([path] if path else [])
        assert report.errors == () and check_everything(report) == [], path


def test_several_kinds_of_error_at_once(tmp_path: Path) -> None:
    text = """\
[model]
target_language = "de"

[streaming]
chunk_ms = 5

[websocket]
client_languages = "fr,xx"
auth_token_file = "missing-token"
"""
    report = report_of(tmp_path, text)
    errors = [*report.errors, *check_everything(report)]
    assert keys(errors) == [
        "streaming.chunk_ms",
        "model.target_language",
        "websocket.client_languages",
        "websocket.auth_token_file",
    ]


def test_no_torch_or_transformers_at_import() -> None:
    import subprocess

    code = (
        "import sys, streamer.config_checks\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
