"""The configuration's sections: one frozen dataclass per TOML table, with defaults.

Each field's rules (bounds, choices, aliases, pattern, path, source type) live
in its ``metadata`` (``_f``), next to its default; ``streamer.config`` reads
them to load, check and document the configuration (and re-exports every
section). ``Config()`` is the embedded default.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "BUILTIN_AUDIO",
    "AdmissionConfig",
    "Config",
    "ConsoleConfig",
    "EngineConfig",
    "JsonlConfig",
    "LoggingConfig",
    "ModelConfig",
    "MqttConfig",
    "ServiceConfig",
    "SourceConfig",
    "StreamingConfig",
    "TranslationConfig",
    "VadConfig",
    "WebSocketConfig",
    "WyomingConfig",
]

_T = TypeVar("_T")

_DATA_DIR = Path(__file__).resolve().parent / "data" / "audio"
BUILTIN_AUDIO: Mapping[str, str] = {"builtin:demo": "demo_fr.ogg"}
"""Bundled clips a file source may name instead of a path."""

_FILE = ("file",)
_MIC = ("microphone",)
_LANG = r"[a-z]{2,3}"
#: A translation target: a language code, or a model's own code (deu_Latn, de_DE).
_TARGET = r"[a-z]{2,3}([_-][A-Za-z]{2,4})?"


def _f(default: _T, **rules: Any) -> _T:
    """A dataclass field whose validation rules travel in its metadata."""
    return field(default=default, metadata=rules)


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Which checkpoint runs, where, and what it is asked to do."""

    id: str = _f("builtin:whisper-base", nonempty=True, model_path=True)
    device: str = _f("auto", pattern=r"auto|cpu|cuda(:\d+)?", lower=True)
    dtype: str = _f(
        "auto",
        choices=("auto", "float32", "float16", "bfloat16", "int8"),
        aliases={"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"},
    )
    source_language: str = _f("fr", pattern=f"auto|{_LANG}", lower=True)
    target_language: str = _f("en", pattern=_LANG, lower=True)
    task: str = _f("auto", choices=("auto", "transcribe", "translate"))
    num_beams: int = _f(1, min=1)
    cache_dir: str = _f("", path=True)
    alignment_heads: str = _f("", items=r"\d+:\d+")


@dataclass(frozen=True, slots=True)
class StreamingConfig:
    """Sliding window, endpointing and stabiliser settings of every stream."""

    chunk_ms: int = _f(1000, min=100)
    first_chunk_ms: int = _f(0, min=0)
    left_context_s: float = _f(0.0, min=0.0)
    max_segment_s: float = _f(15.0, gt=0.0)
    max_window_s: float = _f(30.0, gt=0.0)
    endpoint_silence_ms: int = _f(600, min=100)
    agreement_n: int = _f(2, min=0)
    policy: str = _f(
        "local_agreement",
        choices=("local_agreement", "alignatt"),
        aliases={"la": "local_agreement", "localagreement": "local_agreement"},
    )
    alignatt_frames: int = _f(25, min=1)
    alignatt_agreement: int = _f(1, min=1)
    partial_holdback_words: int = _f(1, min=0)
    word_timestamps: bool = _f(True)
    short_final_tokens_per_s: float = _f(0.5, min=0.0)
    max_tokens_per_second: float = _f(8.0, gt=0.0)
    min_tokens: int = _f(8, min=1)
    prompt_max_tokens: int = _f(64, min=0)
    whisper_input: str = _f("trimmed", choices=("padded", "trimmed"))
    max_backlog_s: float = _f(30.0, gt=0.0)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Batching: how many windows the engine admits and decodes per step."""

    max_running: int = _f(32, min=1)
    max_admit: int = _f(8, min=1)
    max_admit_audio_s: float = _f(240.0, gt=0.0)
    max_prefill_tokens: int = _f(4096, min=1)
    max_consecutive_oom: int = _f(5, min=1)
    compile: bool = _f(False)


@dataclass(frozen=True, slots=True)
class VadConfig:
    """Voice activity detection, which drives endpointing."""

    enabled: bool = _f(True)
    backend: str = _f("silero", choices=("silero", "energy"))
    threshold: float = _f(0.5, gt=0.0, lt=1.0)
    min_speech_ms: int = _f(250, min=0)


@dataclass(frozen=True, slots=True)
class SourceConfig:
    """One audio source; the defaults are the default source (the demo clip)."""

    type: str = _f("file", choices=("file", "microphone"), aliases={"mic": "microphone"})
    stream: str = _f("demo", pattern=r"[A-Za-z0-9_.-]{1,64}")
    path: str = _f("builtin:demo", nonempty=True, path=True, kinds=_FILE)
    pace: str = _f("realtime", choices=("realtime", "fast"), kinds=_FILE)
    device: str = _f("", int_as_str=True, kinds=_MIC)
    sample_rate: int = _f(0, min=0, kinds=_MIC)
    channels: int = _f(1, min=1, kinds=_MIC)
    block_ms: int = _f(100, min=1)
    required: bool = _f(True, kinds=_MIC)


@dataclass(frozen=True, slots=True)
class WebSocketConfig:
    """The caption/audio WebSocket server (also serves the page and probes)."""

    enabled: bool = _f(True)
    host: str = _f("127.0.0.1", pattern=r"\S+")
    port: int = _f(8765, min=0, max=65535)
    max_subscribers: int = _f(64, min=1)
    queue_finals: int = _f(256, min=1)
    max_streams: int = _f(16, min=1)
    max_frame_bytes: int = _f(1 << 20, min=1024)
    max_audio_rate: float = _f(2.0, min=1.0)
    audio_burst_s: float = _f(5.0, min=0.0)
    idle_timeout_s: float = _f(30.0, gt=0.0)
    ping_interval_s: float = _f(20.0, min=0.0)
    ping_timeout_s: float = _f(20.0, min=0.0)
    auth_token_file: str = _f("", path=True)
    allowed_origins: str = _f("", items=r"\*|https?://[^\s,/]+(:\d+)?")
    server_names: str = _f("", items=r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?")
    max_unauthenticated: int = _f(16, min=1)
    max_unauthenticated_per_address: int = _f(4, min=1)
    auth_timeout_s: float = _f(5.0, gt=0.0)
    client_languages: str = _f("", items=f"auto|{_LANG}")
    client_tasks: str = _f("", items="transcribe|translate")
    client_targets: str = _f("", items=_TARGET)
    tls_cert: str = _f("", path=True)
    tls_key: str = _f("", path=True)


@dataclass(frozen=True, slots=True)
class TranslationConfig:
    """The cascade: captions in further languages, translated from the speech model's text."""

    targets: str = _f("", items=_TARGET)
    model: str = _f("", model_path=True)
    max_rows: int = _f(64, min=1)
    max_admit_rows: int = _f(32, min=1)


@dataclass(frozen=True, slots=True)
class AdmissionConfig:
    """Refusing new streams while the engine cannot serve one more in real time."""

    enabled: bool = _f(True)
    max_engine_load: float = _f(0.9, gt=0.0, max=1.0)
    max_lag_s: float = _f(5.0, gt=0.0)
    load_window_s: float = _f(10.0, min=1.0)
    warmup_streams: int = _f(4, min=1)


@dataclass(frozen=True, slots=True)
class MqttConfig:
    """MQTT output (README "MQTT"); off unless enabled."""

    enabled: bool = _f(False)
    host: str = _f("localhost", nonempty=True)
    port: int = _f(1883, min=1, max=65535)
    client_id: str = _f("")
    username: str = _f("")
    password: str = _f("")
    password_file: str = _f("", path=True)
    tls: bool = _f(False)
    tls_ca: str = _f("", path=True)
    tls_cert: str = _f("", path=True)
    tls_key: str = _f("", path=True)
    protocol: str = _f("auto", choices=("auto", "5", "3.1.1"))
    prefix: str = _f("streamer", pattern=r"[^#+\s]+")
    node: str = _f("", pattern=r"|[A-Za-z0-9_.-]{1,64}")
    partials: bool = _f(True)
    partial_qos: int = _f(0, min=0, max=2)
    final_qos: int = _f(1, min=0, max=2)
    partial_expiry_s: int = _f(5, min=0)
    keepalive_s: int = _f(30, min=5)
    reconnect_min_s: float = _f(0.5, gt=0.0)
    reconnect_max_s: float = _f(30.0, gt=0.0)
    outbox_size: int = _f(1000, min=1)
    flush_timeout_s: float = _f(5.0, min=0.0)
    hermes: bool = _f(False)
    hermes_site_id: str = _f("")


@dataclass(frozen=True, slots=True)
class WyomingConfig:
    """Wyoming ASR server for Home Assistant (README "Wyoming"); off unless enabled."""

    enabled: bool = _f(False)
    host: str = _f("127.0.0.1", pattern=r"\S+")
    port: int = _f(10300, min=0, max=65535)


@dataclass(frozen=True, slots=True)
class ConsoleConfig:
    """Human-readable captions on stdout."""

    enabled: bool = _f(True)
    partials: bool = _f(True)


@dataclass(frozen=True, slots=True)
class JsonlConfig:
    """One JSON event per line, for pipes and archives."""

    path: str = _f("", path=True)


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    """Log verbosity and format (journal: systemd priority prefixes)."""

    level: str = _f(
        "info", choices=("debug", "info", "warning", "error"), aliases={"warn": "warning"}
    )
    format: str = _f("auto", choices=("auto", "human", "journal", "json"))


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """Process lifetime and state."""

    keep_serving: bool = _f(False)
    # seq reservations; "": $STATE_DIRECTORY, $XDG_STATE_HOME/streamer, ~/.local/state/streamer
    state_dir: str = _f("", path=True)


@dataclass(frozen=True, slots=True)
class Config:
    """The whole effective configuration; ``Config()`` is the embedded default."""

    model: ModelConfig = field(default_factory=ModelConfig)
    streaming: StreamingConfig = field(default_factory=StreamingConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    vad: VadConfig = field(default_factory=VadConfig)
    sources: tuple[SourceConfig, ...] = field(default_factory=lambda: (SourceConfig(),))
    websocket: WebSocketConfig = field(default_factory=WebSocketConfig)
    translation: TranslationConfig = field(default_factory=TranslationConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    wyoming: WyomingConfig = field(default_factory=WyomingConfig)
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    jsonl: JsonlConfig = field(default_factory=JsonlConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
