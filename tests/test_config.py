"""Tests of streamer.config: defaults, layering, overrides, validation, dumping."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamer.config import (
    Config,
    ConfigErrors,
    ConsoleConfig,
    JsonlConfig,
    LoggingConfig,
    ModelConfig,
    ServiceConfig,
    SourceConfig,
    StreamingConfig,
    VadConfig,
    WebSocketConfig,
    check_config,
    config_to_dict,
    default_config,
    dump_toml,
    load_config,
    replace_section,
    resolve_audio_path,
    resolve_cache_dir,
    validate_config,
)
from streamer.errors import EX_CONFIG, ConfigError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TOML = ROOT / "configs" / "default.toml"
MICROPHONE_TOML = ROOT / "configs" / "microphone.toml"
SECTION_CLASSES = {
    "model": ModelConfig,
    "streaming": StreamingConfig,
    "vad": VadConfig,
    "websocket": WebSocketConfig,
    "console": ConsoleConfig,
    "jsonl": JsonlConfig,
    "logging": LoggingConfig,
    "service": ServiceConfig,
}
FILE_KEYS = {"type", "stream", "path", "pace", "block_ms"}
MIC_KEYS = {"type", "stream", "device", "sample_rate", "channels", "block_ms", "required"}


def write(tmp_path: Path, text: str, name: str = "c.toml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def load_text(tmp_path: Path, text: str) -> Config:
    return load_config([write(tmp_path, text)])


def error_of(tmp_path: Path, text: str) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config([path])
    assert info.value.file == str(path)
    return info.value


# ---------------------------------------------------------------- defaults


def test_empty_config_is_the_embedded_default(tmp_path):
    cfg = load_text(tmp_path, "")
    assert cfg == load_config() == default_config() == Config()
    assert cfg.model.id == "builtin:whisper-base"
    assert cfg.sources == (SourceConfig(type="file", stream="demo", path="builtin:demo"),)
    assert (cfg.websocket.enabled, cfg.websocket.host, cfg.websocket.port) == (
        True,
        "127.0.0.1",
        8765,
    )


def test_default_toml_equals_defaults():
    assert load_config([DEFAULT_TOML]) == default_config()


def test_default_toml_documents_every_key():
    text = DEFAULT_TOML.read_text(encoding="utf-8")
    doc = tomllib.loads(text)
    assert set(doc) == {f.name for f in dataclasses.fields(Config)}
    for name, cls in SECTION_CLASSES.items():
        assert set(doc[name]) == {f.name for f in dataclasses.fields(cls)}, name
    assert [set(table) for table in doc["sources"]] == [FILE_KEYS]
    # keys of the other source type appear in the commented example
    for key in {f.name for f in dataclasses.fields(SourceConfig)} - FILE_KEYS:
        assert re.search(rf"^#\s*{key}\s*=", text, re.M), key
    assert {f.name for f in dataclasses.fields(SourceConfig)} == FILE_KEYS | MIC_KEYS


def test_microphone_example(tmp_path):
    cfg = load_config([ROOT / "configs" / "microphone.toml"])
    (source,) = cfg.sources
    assert source.type == "microphone" and source.stream == "mic0" and source.required
    assert cfg.console.enabled and cfg.websocket.enabled
    assert set(tomllib.loads(MICROPHONE_TOML.read_text())["sources"][0]) == MIC_KEYS


def test_config_is_frozen():
    cfg = default_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.id = "x"  # type: ignore[misc]


def test_builtin_audio_is_bundled():
    path = resolve_audio_path("builtin:demo")
    assert path.name == "demo_fr.ogg" and path.is_file()
    assert resolve_audio_path("/x/y.wav") == Path("/x/y.wav")
    with pytest.raises(ConfigError, match="did you mean 'builtin:demo'"):
        resolve_audio_path("builtin:dmeo")


def test_cache_dir_precedence(monkeypatch, tmp_path):
    for var in ("STREAMER_CACHE_DIR", "CACHE_DIRECTORY", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_cache_dir() == tmp_path / ".cache" / "streamer"
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    assert resolve_cache_dir("") == Path("/xdg/streamer")
    monkeypatch.setenv("CACHE_DIRECTORY", "/var/cache/streamer:/other")
    assert resolve_cache_dir("") == Path("/var/cache/streamer")
    monkeypatch.setenv("STREAMER_CACHE_DIR", "/s")
    assert resolve_cache_dir("") == Path("/s")
    assert resolve_cache_dir("/explicit") == Path("/explicit")


# ---------------------------------------------------------------- types and ranges


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("streaming", "chunk_ms", '"500"', 'expected integer, got "500" (string)'),
        ("streaming", "chunk_ms", "500.0", "expected integer, got 500.0 (float)"),
        ("streaming", "agreement_n", "true", "expected integer, got true (boolean)"),
        ("streaming", "left_context_s", '"1"', 'expected float, got "1" (string)'),
        ("vad", "enabled", "1", "expected boolean, got 1 (integer)"),
        ("model", "id", "3", "expected string, got 3 (integer)"),
        ("model", "id", "[1, 2]", "expected string, got [1, 2] (array)"),
        ("websocket", "host", "{a = 1}", "(table)"),
        ("streaming", "max_window_s", "inf", "expected a finite number, got inf"),
        ("vad", "threshold", "nan", "expected a finite number, got nan"),
    ],
)
def test_wrong_type(tmp_path, section, key, value, expected):
    err = error_of(tmp_path, f"[{section}]\n{key} = {value}\n")
    assert err.key == f"{section}.{key}"
    assert expected in err.reason
    assert str(err).startswith(f"{err.file}: {section}.{key}: ")
    assert err.exit_code == EX_CONFIG


def test_int_is_accepted_for_float(tmp_path):
    cfg = load_text(tmp_path, "[streaming]\nleft_context_s = 2\nmax_segment_s = 10\n")
    assert cfg.streaming.left_context_s == 2.0
    assert type(cfg.streaming.left_context_s) is float


@pytest.mark.parametrize(
    ("section", "key", "bad", "good"),
    [
        ("model", "num_beams", "0", "1"),
        ("streaming", "chunk_ms", "99", "100"),
        ("streaming", "left_context_s", "-0.1", "0.0"),
        ("streaming", "max_segment_s", "0.0", "0.5"),
        ("streaming", "max_window_s", "0", "29.0"),
        ("streaming", "endpoint_silence_ms", "99", "100"),
        ("streaming", "agreement_n", "-1", "0"),
        ("streaming", "max_tokens_per_second", "0.0", "0.1"),
        ("streaming", "min_tokens", "0", "1"),
        ("streaming", "prompt_max_tokens", "-1", "0"),
        ("vad", "threshold", "0.0", "0.01"),
        ("vad", "threshold", "1.0", "0.99"),
        ("vad", "min_speech_ms", "-1", "0"),
        ("websocket", "port", "-1", "0"),
        ("websocket", "port", "65536", "65535"),
        ("websocket", "max_subscribers", "0", "1"),
        ("websocket", "queue_finals", "0", "1"),
    ],
)
def test_ranges(tmp_path, section, key, bad, good):
    extra = "max_segment_s = 1.0\n" if key == "max_window_s" else ""
    err = error_of(tmp_path, f"[{section}]\n{extra}{key} = {bad}\n")
    assert err.key == f"{section}.{key}"
    assert re.search(r"must be [<>]=? ", err.reason) and f"got {bad}" in err.reason
    cfg = load_text(tmp_path, f"[{section}]\n{extra}{key} = {good}\n")
    assert getattr(getattr(cfg, section), key) == tomllib.loads(f"v = {good}")["v"]


@pytest.mark.parametrize(
    ("section", "key", "value", "fragment"),
    [
        ("model", "device", "gpu", "must match"),
        ("model", "device", "cuda:x", "must match"),
        ("model", "dtype", "fp8", "expected one of auto, float32, float16, bfloat16"),
        ("model", "task", "transcibe", "did you mean 'transcribe'?"),
        ("model", "source_language", "french", "must match"),
        ("model", "target_language", "auto", "must match"),
        ("model", "id", "  ", "must not be empty"),
        ("streaming", "whisper_input", "trim", "did you mean 'trimmed'?"),
        ("vad", "backend", "webrtc", "expected one of silero, energy"),
        ("logging", "level", "verbose", "expected one of debug, info, warning, error"),
        ("logging", "format", "jsonl", "did you mean 'json'?"),
        ("websocket", "host", "", "must match"),
    ],
)
def test_bad_choice_or_pattern(tmp_path, section, key, value, fragment):
    err = error_of(tmp_path, f'[{section}]\n{key} = "{value}"\n')
    assert err.key == f"{section}.{key}"
    assert fragment in err.reason


def test_aliases_and_case_are_normalised(tmp_path):
    cfg = load_text(
        tmp_path,
        '[model]\ndtype = "FP16"\ndevice = "CUDA:1"\nsource_language = "DE"\n'
        'task = "Translate"\n[logging]\nlevel = "warn"\n'
        '[[sources]]\ntype = "mic"\n',
    )
    assert cfg.model.dtype == "float16"
    assert (cfg.model.device, cfg.model.source_language, cfg.model.task) == (
        "cuda:1",
        "de",
        "translate",
    )
    assert cfg.logging.level == "warning"
    assert cfg.sources[0].type == "microphone"
    for alias, name in (("fp32", "float32"), ("bf16", "bfloat16"), ("bfloat16", "bfloat16")):
        assert load_config(overrides=[f"model.dtype={alias}"]).model.dtype == name
    assert load_config(overrides=["model.source_language=auto"]).model.source_language == "auto"


# ---------------------------------------------------------------- unknown names, syntax


def test_unknown_key_suggests(tmp_path):
    err = error_of(tmp_path, "[streaming]\nchunk_msec = 500\n")
    assert err.key == "streaming.chunk_msec"
    assert "unknown key 'chunk_msec' in [streaming]; did you mean 'chunk_ms'?" in err.reason


def test_unknown_key_without_close_match_lists_keys(tmp_path):
    err = error_of(tmp_path, "[console]\nzzz = 1\n")
    assert "known keys: enabled, partials" in err.reason


def test_unknown_section_suggests(tmp_path):
    err = error_of(tmp_path, '[modle]\nid = "x"\n')
    assert err.key == "modle"
    assert "unknown section 'modle'; did you mean 'model'?" in err.reason


def test_top_level_key_points_to_its_section(tmp_path):
    err = error_of(tmp_path, "chunk_ms = 500\n")
    assert "did you mean 'streaming.chunk_ms'?" in err.reason


def test_unknown_source_key_suggests(tmp_path):
    err = error_of(tmp_path, '[[sources]]\ntype = "file"\npaht = "a.wav"\n')
    assert err.key == "sources[0].paht"
    assert "did you mean 'path'?" in err.reason


def test_section_must_be_a_table(tmp_path):
    err = error_of(tmp_path, "model = 3\n")
    assert err.key == "model" and "expected a table [model]" in err.reason


@pytest.mark.parametrize(
    "text", ['[sources]\ntype = "file"\n', "sources = [1]\n", 'sources = "a"\n']
)
def test_sources_must_be_an_array_of_tables(tmp_path, text):
    err = error_of(tmp_path, text)
    assert err.key == "sources" and "array of tables" in err.reason


def test_toml_syntax_error_names_file_and_line(tmp_path):
    err = error_of(tmp_path, '[model]\nid = "x"\ndevice = = 1\n')
    assert "invalid TOML" in err.reason and "line 3" in err.reason


def test_missing_config_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="cannot read config file") as info:
        load_config([path])
    assert info.value.file == str(path)


# ---------------------------------------------------------------- sources


def test_source_defaults_and_stream_names(tmp_path):
    audio = write(tmp_path, "", "a.wav")
    cfg = load_text(
        tmp_path,
        f'[[sources]]\ntype = "file"\npath = "{audio}"\n'
        '[[sources]]\ntype = "microphone"\n'
        '[[sources]]\ntype = "microphone"\ndevice = 2\nrequired = false\n'
        '[[sources]]\ntype = "file"\npace = "fast"\n',
    )
    assert [s.stream for s in cfg.sources] == ["file0", "mic0", "mic1", "file1"]
    assert cfg.sources[2].device == "2" and cfg.sources[2].required is False
    assert cfg.sources[3].path == "builtin:demo" and cfg.sources[3].pace == "fast"
    assert cfg.sources[1] == SourceConfig(type="microphone", stream="mic0")


def test_empty_sources_list(tmp_path):
    assert load_text(tmp_path, "sources = []\n").sources == ()


def test_source_needs_a_type(tmp_path):
    err = error_of(tmp_path, '[[sources]]\ntype = "file"\n[[sources]]\nstream = "x"\n')
    assert err.key == "sources[1].type" and "needs type" in err.reason


@pytest.mark.parametrize(
    ("kind", "key", "value"),
    [
        ("file", "device", '"hw:0"'),
        ("file", "sample_rate", "16000"),
        ("file", "channels", "2"),
        ("file", "required", "false"),
        ("microphone", "path", '"a.wav"'),
        ("microphone", "pace", '"fast"'),
    ],
)
def test_key_of_the_other_source_type(tmp_path, kind, key, value):
    err = error_of(tmp_path, f'[[sources]]\ntype = "{kind}"\n{key} = {value}\n')
    assert err.key == f"sources[0].{key}"
    assert "sources only; this source has type" in err.reason


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("type", '"network"', "expected one of file, microphone"),
        ("stream", '"a b"', "must match"),
        ("stream", f'"{"x" * 65}"', "must match"),
        ("stream", '""', "must match"),
        ("block_ms", "0", "must be >= 1"),
        ("channels", "0", "must be >= 1"),
        ("sample_rate", "-1", "must be >= 0"),
    ],
)
def test_bad_source_values(tmp_path, key, value, fragment):
    kind = "microphone" if key in {"channels", "sample_rate"} else "file"
    type_line = "" if key == "type" else f'type = "{kind}"\n'
    err = error_of(tmp_path, f"[[sources]]\n{type_line}{key} = {value}\n")
    assert err.key == f"sources[0].{key}" and fragment in err.reason


def test_duplicate_stream_ids(tmp_path):
    err = error_of(
        tmp_path,
        '[[sources]]\ntype = "microphone"\n[[sources]]\ntype = "microphone"\nstream = "mic0"\n',
    )
    assert err.key == "sources[1].stream"
    assert "duplicate stream id 'mic0' (also sources[0])" in err.reason


def test_missing_audio_file(tmp_path):
    err = error_of(tmp_path, '[[sources]]\ntype = "file"\npath = "missing.wav"\n')
    assert err.key == "sources[0].path"
    assert f"no such audio file: {tmp_path / 'missing.wav'}" in err.reason


def test_unknown_builtin_audio(tmp_path):
    err = error_of(tmp_path, '[[sources]]\ntype = "file"\npath = "builtin:other"\n')
    assert err.key == "sources[0].path" and "unknown builtin audio" in err.reason


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    (tmp_path / "site" / "audio").mkdir(parents=True)
    (tmp_path / "site" / "audio" / "a.wav").write_bytes(b"")
    (tmp_path / "b.wav").write_bytes(b"")
    path = write(
        tmp_path,
        '[model]\nid = "./ckpt"\ncache_dir = "cache"\n[jsonl]\npath = "out/events.jsonl"\n'
        '[[sources]]\ntype = "file"\npath = "audio/a.wav"\n'
        '[[sources]]\ntype = "file"\npath = "../b.wav"\n',
        "site/c.toml",
    )
    cfg = load_config([path])
    site = tmp_path / "site"
    assert cfg.sources[0].path == str(site / "audio" / "a.wav")
    assert cfg.sources[1].path == str(tmp_path / "b.wav")
    assert cfg.jsonl.path == str(site / "out" / "events.jsonl")
    assert cfg.model.cache_dir == str(site / "cache")
    assert cfg.model.id == str(site / "ckpt")


def test_special_values_are_not_paths(tmp_path):
    cfg = load_text(tmp_path, '[model]\nid = "openai/whisper-small"\n[jsonl]\npath = "-"\n')
    assert cfg.model.id == "openai/whisper-small"
    assert cfg.jsonl.path == "-" and cfg.model.cache_dir == ""
    assert cfg.sources[0].path == "builtin:demo"


# ---------------------------------------------------------------- window rule


def test_window_rule(tmp_path):
    ok = load_text(tmp_path, "[streaming]\nleft_context_s = 5.0\nmax_segment_s = 25.0\n")
    assert ok.streaming.left_context_s + ok.streaming.max_segment_s == ok.streaming.max_window_s
    err = error_of(tmp_path, "[streaming]\nleft_context_s = 5.0\nmax_segment_s = 25.5\n")
    assert err.key == "streaming.max_segment_s"
    assert "exceeds max_window_s (30 s)" in err.reason


def test_backlog_bound_must_hold_a_whole_segment(tmp_path):
    ok = load_text(tmp_path, "[streaming]\nmax_backlog_s = 15.0\n")
    assert ok.streaming.max_backlog_s == ok.streaming.max_segment_s == 15.0
    err = error_of(tmp_path, "[streaming]\nmax_backlog_s = 14.5\n")
    assert err.key == "streaming.max_backlog_s"
    assert "below max_segment_s (15 s)" in err.reason


def test_window_rule_names_the_layer_that_broke_it(tmp_path):
    base = write(tmp_path, "[streaming]\nmax_segment_s = 20.0\n", "base.toml")
    site = write(tmp_path, "[streaming]\nmax_window_s = 18.0\n", "site.toml")
    with pytest.raises(ConfigError) as info:
        load_config([base, site])
    assert info.value.file == str(site) and info.value.key == "streaming.max_segment_s"
    with pytest.raises(ConfigError) as info:
        load_config([base], ["streaming.max_window_s=10"])
    assert info.value.file == "--set"


# ---------------------------------------------------------------- layering and overrides


def test_layering_later_keys_win(tmp_path):
    first = write(
        tmp_path,
        '[model]\nid = "a/b"\ndevice = "cpu"\n[streaming]\nchunk_ms = 500\n'
        '[[sources]]\ntype = "microphone"\n[[sources]]\ntype = "microphone"\n',
        "1.toml",
    )
    second = write(tmp_path, '[model]\ndevice = "cuda"\n[[sources]]\ntype = "file"\n', "2.toml")
    cfg = load_config([first, second])
    assert (cfg.model.id, cfg.model.device, cfg.streaming.chunk_ms) == ("a/b", "cuda", 500)
    assert [s.stream for s in cfg.sources] == ["file0"]  # sources replaced as a whole
    assert load_config([second, first]).model.device == "cpu"


def test_error_names_the_layer_that_set_the_key(tmp_path):
    first = write(tmp_path, "[streaming]\nchunk_ms = 50\n", "1.toml")
    second = write(tmp_path, "[streaming]\nagreement_n = 3\n", "2.toml")
    with pytest.raises(ConfigError) as info:
        load_config([first, second])
    assert info.value.file == str(first) and info.value.key == "streaming.chunk_ms"
    assert load_config([first, second], ["streaming.chunk_ms=200"]).streaming.chunk_ms == 200


def test_overrides_parse_toml_scalars(tmp_path):
    cfg = load_config(
        overrides=[
            "streaming.chunk_ms=500",
            "streaming.left_context_s = 1.5",
            "vad.enabled=false",
            "websocket.host=0.0.0.0",
            "model.id=openai/whisper-small",
            "console.partials = false",
            "jsonl.path=-",
        ]
    )
    assert cfg.streaming.chunk_ms == 500 and cfg.streaming.left_context_s == 1.5
    assert cfg.vad.enabled is False and cfg.console.partials is False
    assert cfg.websocket.host == "0.0.0.0" and cfg.model.id == "openai/whisper-small"
    assert cfg.jsonl.path == "-"
    # a string key keeps the text even when it parses as another TOML type
    assert load_config(overrides=["model.id=1234"]).model.id == "1234"
    assert load_config(overrides=['model.id="a b"']).model.id == "a b"
    assert load_config(overrides=["model.id=a=b"]).model.id == "a=b"


def test_override_type_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["vad.enabled=yes"])
    assert info.value.file == "--set" and info.value.key == "vad.enabled"
    assert 'expected boolean, got "yes" (string)' in info.value.reason


@pytest.mark.parametrize(
    ("override", "key", "fragment"),
    [
        ("streaming.chunkms=5", "streaming.chunkms", "did you mean 'chunk_ms'?"),
        ("stream.chunk_ms=5", "stream", "did you mean 'streaming'?"),
        ("sources[0].paht=x", "sources[0].paht", "did you mean 'path'?"),
        ("sources[3].pace=fast", "sources[3].pace", "no such source: 1 configured"),
        ("streaming.chunk_ms", None, "expected section.key=value"),
        ("streaming=5", None, "expected section.key=value"),
        ("sources.pace=fast", None, "expected sources[N].key=value"),
    ],
)
def test_bad_overrides(override, key, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    assert info.value.file == "--set" and info.value.key == key
    assert fragment in info.value.reason


def test_source_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.wav").write_bytes(b"")
    cfg = load_config(overrides=["sources[0].path=x.wav", "sources.0.pace=fast"])
    assert cfg.sources[0].path == str(tmp_path / "x.wav") and cfg.sources[0].pace == "fast"
    assert cfg.sources[0].stream == "demo"
    mic = load_config([MICROPHONE_TOML], ["sources[0].device=2", "sources[0].required=false"])
    assert mic.sources[0].device == "2" and mic.sources[0].required is False
    with pytest.raises(ConfigError, match="file sources only") as info:
        load_config(overrides=["sources[0].type=microphone"])
    assert info.value.key == "sources[0].path"


# ---------------------------------------------------------------- dumping


def rich_config(tmp_path: Path) -> Config:
    audio = write(tmp_path, "", 'audio dir/a "quoted" é.wav')
    text = f"""
[model]
id = 'C:\\models\\w "x"'
device = "cuda:1"
dtype = "bf16"
source_language = "auto"
target_language = "de"
task = "transcribe"
num_beams = 4
cache_dir = "/tmp/cache"
[streaming]
chunk_ms = 250
left_context_s = 1.25
max_segment_s = 8.0
max_window_s = 10.0
endpoint_silence_ms = 400
agreement_n = 3
max_tokens_per_second = 1e-3
min_tokens = 2
prompt_max_tokens = 0
whisper_input = "padded"
[vad]
enabled = false
backend = "energy"
threshold = 0.125
min_speech_ms = 0
[[sources]]
type = "file"
stream = "lecture.1"
path = '{audio}'
pace = "fast"
block_ms = 20
[[sources]]
type = "microphone"
device = "USB\\tmic"
sample_rate = 48000
channels = 2
block_ms = 50
required = false
[websocket]
enabled = false
host = "::1"
port = 0
max_subscribers = 3
queue_finals = 7
[console]
enabled = false
partials = false
[jsonl]
path = "-"
[logging]
level = "debug"
format = "journal"
[service]
keep_serving = true
"""
    return load_text(tmp_path, text)


def test_dump_round_trip(tmp_path):
    cfg = rich_config(tmp_path)
    assert cfg != default_config()
    assert all(getattr(cfg, name) != getattr(default_config(), name) for name in SECTION_CLASSES)
    dumped = dump_toml(cfg)
    assert tomllib.loads(dumped) == config_to_dict(cfg)
    assert load_config([write(tmp_path, dumped, "dumped/again.toml")]) == cfg


@pytest.mark.parametrize("sources", ["", "sources = []\n"])
def test_dump_round_trip_defaults_and_no_sources(tmp_path, sources):
    cfg = load_text(tmp_path, sources)
    dumped = dump_toml(cfg)
    assert load_config([write(tmp_path, dumped, "d.toml")]) == cfg


def test_config_to_dict_keeps_only_the_source_types_keys():
    data = config_to_dict(load_config([MICROPHONE_TOML]))
    assert set(data["sources"][0]) == MIC_KEYS
    assert set(config_to_dict(default_config())["sources"][0]) == FILE_KEYS


@settings(max_examples=150, deadline=None)
@given(st.text(min_size=1).filter(lambda s: s.strip() and not s.startswith((".", "~"))))
def test_dump_escapes_any_string(text):
    cfg = replace_section(default_config(), "model", id=text)
    dumped = dump_toml(cfg)
    assert tomllib.loads(dumped)["model"]["id"] == text


# ---------------------------------------------------------------- programmatic changes


def test_replace_section_checks_values():
    cfg = replace_section(default_config(), "model", dtype="fp16", num_beams=2)
    assert cfg.model.dtype == "float16" and cfg.model.num_beams == 2
    assert cfg.streaming == default_config().streaming
    with pytest.raises(ConfigError, match="did you mean 'num_beams'"):
        replace_section(cfg, "model", num_beam=2)
    with pytest.raises(ConfigError, match="did you mean 'model'"):
        replace_section(cfg, "modl", id="x")
    with pytest.raises(ConfigError, match="exceeds max_window_s") as info:
        replace_section(cfg, "streaming", max_segment_s=31)
    assert info.value.file is None and info.value.key == "streaming.max_segment_s"


def test_validate_config_catches_constructed_configs():
    twins = (SourceConfig(stream="a"), SourceConfig(stream="a"))
    with pytest.raises(ConfigError, match="duplicate stream id"):
        validate_config(dataclasses.replace(default_config(), sources=twins))
    validate_config(default_config())
    with pytest.raises(ConfigError, match="must be >= 100") as info:
        validate_config(
            dataclasses.replace(default_config(), streaming=StreamingConfig(chunk_ms=5))
        )
    assert info.value.key == "streaming.chunk_ms" and info.value.file is None
    with pytest.raises(ConfigError, match="expected boolean") as info:
        validate_config(Config(sources=(SourceConfig(required=1),)))  # type: ignore[arg-type]
    assert info.value.key == "sources[0].required"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[mqtt]\npassword = "x"\n', "mqtt.username"),
        ('[mqtt]\ntls_ca = "ca.pem"\n', "mqtt.tls_ca"),
        ("[mqtt]\nreconnect_min_s = 5.0\nreconnect_max_s = 1.0\n", "mqtt.reconnect_max_s"),
        ('[mqtt]\nprotocol = "4"\n', "mqtt.protocol"),
        ("[mqtt]\nfinal_qos = 3\n", "mqtt.final_qos"),
        ('[websocket]\ntls_cert = "c.pem"\n', "websocket.tls_cert"),
        ('[websocket]\nclient_tasks = "transcribe,summarize"\n', "websocket.client_tasks"),
        ('[websocket]\nallowed_origins = "evil"\n', "websocket.allowed_origins"),
    ],
)
def test_mqtt_and_websocket_rules(tmp_path, text, key):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config([path])
    assert err.value.key == key


def test_list_keys_are_normalised(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[websocket]\nclient_languages = " fr, de ,,en"\n')
    cfg = load_config([path])
    assert cfg.websocket.client_languages == "fr,de,en"


# ---------------------------------------------------------------- every error at once

SEVERAL_ERRORS = """\
[model]
idd = "x"
dtype = "fp64"

[streaming]
chunk_ms = "fast"
left_context_s = 10.0
max_segment_s = 25.0

[websocket]
port = 70000

[[sources]]
type = "file"
path = "missing.wav"
pace = "slow"
"""


def test_check_config_lists_every_independent_error(tmp_path):
    path = write(tmp_path, SEVERAL_ERRORS)
    report = check_config([path], ["vad.treshold=0.3", "engine.max_running=0"])
    keys = [e.key for e in report.errors]
    assert keys == [
        "model.idd",  # unknown keys first, as the file is read
        "vad.treshold",  # then --set
        "model.dtype",  # then values, section by section
        "streaming.chunk_ms",
        "engine.max_running",
        "websocket.port",
        "sources[0].pace",
        "streaming.max_segment_s",  # then the rules across keys
        "sources[0].path",
    ]
    files = [e.file for e in report.errors]
    assert files == [str(path), "--set", str(path), str(path), "--set", *[str(path)] * 4]
    assert "did you mean 'threshold'" in str(report.errors[1])
    assert "no such audio file" in str(report.errors[-1])
    # load_config still raises: the first error, saying how many more there are
    with pytest.raises(ConfigErrors) as info:
        load_config([path], ["vad.treshold=0.3", "engine.max_running=0"])
    assert info.value.key == "model.idd" and info.value.file == str(path)
    assert len(info.value.errors) == 9 and "and 8 more error(s)" in str(info.value)
    assert info.value.exit_code == EX_CONFIG


def test_one_error_is_raised_as_before(tmp_path):
    path = write(tmp_path, '[model]\nidd = "x"\n')
    with pytest.raises(ConfigError) as info:
        load_config([path])
    assert type(info.value) is ConfigError and "more error" not in str(info.value)


def test_a_refused_value_does_not_trigger_rules_about_it(tmp_path):
    """max_segment_s refused: no window or backlog rule about its default stand-in."""
    text = '[streaming]\nmax_segment_s = "long"\nmax_window_s = 10.0\nmax_backlog_s = 5.0\n'
    report = check_config([write(tmp_path, text)])
    assert [e.key for e in report.errors] == ["streaming.max_segment_s"]
    assert report.refused == {"streaming.max_segment_s"}
    assert not report.ok("streaming.max_segment_s") and report.ok("streaming.chunk_ms")


def test_a_source_without_type_does_not_hide_the_others(tmp_path):
    text = '[[sources]]\npath = "a.wav"\n\n[[sources]]\ntype = "file"\npath = "b.wav"\n'
    report = check_config([write(tmp_path, text)])
    assert [e.key for e in report.errors] == ["sources[0].type", "sources[1].path"]
    assert not report.ok("sources[0].path") and report.ok("sources[1].path")


def test_an_unreadable_file_does_not_hide_the_next(tmp_path):
    bad = write(tmp_path, "[model\n", "bad.toml")
    good = write(tmp_path, "[streaming]\nchunk_ms = 5\n", "next.toml")
    report = check_config([bad, tmp_path / "missing.toml", good])
    assert [(e.file, e.key) for e in report.errors] == [
        (str(bad), None),
        (str(tmp_path / "missing.toml"), None),
        (str(good), "streaming.chunk_ms"),
    ]


def test_a_good_config_has_no_errors():
    report = check_config([DEFAULT_TOML])
    assert report.errors == () and report.refused == frozenset()
    assert report.config == load_config([DEFAULT_TOML])


def test_validate_config_reports_every_error():
    bad = Config(streaming=StreamingConfig(chunk_ms=5, min_tokens=0))
    with pytest.raises(ConfigErrors) as info:
        validate_config(bad)
    assert [e.key for e in info.value.errors] == ["streaming.chunk_ms", "streaming.min_tokens"]
