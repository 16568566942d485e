"""What ``streamer check-config`` checks beyond the keys: the model and the files.

``serve`` refuses some configurations only after the model has loaded (Whisper
translates only into English; ``websocket.client_languages`` must be languages
of the model) or when it opens a file (token, TLS, password, audio). These
checks find the same errors without loading weights: the model's family and
languages come from the built-in id or from a folder's (or the hub cache's)
``config.json``, ``generation_config.json`` and ``preprocessor_config.json``,
read as JSON. Nothing here imports torch or transformers at import time (torch
only when ``model.device`` names a CUDA device).

Each check skips keys the configuration already refused, and names the file
that set the key, like every other configuration error.
"""

from __future__ import annotations

import dataclasses
import json
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamer.config import ConfigReport, resolve_audio_path, split_items
from streamer.errors import ConfigError, StreamerError

BUILTIN_WHISPER_BASE = "builtin:whisper-base"

_WHISPER_LANGUAGES = (
    "en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta "
    "no th ur hr bg lt la mi ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk "
    "sq sw gl mr pa si km sn yo so af oc ka be tg sd gu am yi lo uz fo ht ps tk nn mt sa lb "
    "my bo tl mg as tt haw ln ha ba jw su"
)
WHISPER_LANGUAGES = frozenset(_WHISPER_LANGUAGES.split())
"""The 99 languages of Whisper base (multilingual Whisper before large-v3's ``yue``)."""

_Problem = Callable[..., None]  # problem(reason, key, *more keys): adds one error

_FAMILIES = {
    "whisper": "whisper",
    "speech-encoder-decoder": "sed",
    "speech_to_text": "speech2text",
}
_ARCHITECTURES = {
    "Whisper": "whisper",
    "SpeechEncoderDecoder": "sed",
    "Speech2Text": "speech2text",
}


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """What the loader would learn about a checkpoint, read without its weights.

    ``None`` means unknown (a hub model that is not in the local cache): checks
    that need it are skipped.
    """

    family: str  # whisper | sed | speech2text | generic, as the loader names them
    whisper_prompt: bool | None = None  # decoding starts from Whisper's prompt
    languages: frozenset[str] | None = None  # Whisper language tokens, without <| |>
    tasks: frozenset[str] | None = None  # Whisper task tokens
    multilingual: bool = True
    sample_rate: int | None = None
    where: str = ""


BUILTIN_FACTS = ModelFacts(
    "whisper",
    whisper_prompt=True,
    languages=WHISPER_LANGUAGES,
    tasks=frozenset({"transcribe", "translate"}),
    sample_rate=16000,
    where=BUILTIN_WHISPER_BASE,
)


def check_everything(report: ConfigReport) -> list[ConfigError]:
    """Model checks, then file checks (``report.errors`` not included)."""
    return [*check_model(report), *check_files(report)]


# ---------------------------------------------------------------- the model


def family_of(config: dict[str, Any]) -> str:
    """The loader's family from a ``config.json``: ``model_type``, else ``architectures``."""
    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type:
        return _FAMILIES.get(model_type, "generic")
    for arch in config.get("architectures") or ():
        for prefix, family in _ARCHITECTURES.items():
            if isinstance(arch, str) and arch.startswith(prefix):
                return family
    return "generic"


def model_facts(model_id: str) -> ModelFacts | None:
    """Facts about ``model.id``; None when unknown. Raises ``ConfigError`` for an id
    the loader refuses without looking further (unknown builtin, missing folder)."""
    if model_id == BUILTIN_WHISPER_BASE:
        return BUILTIN_FACTS
    if model_id.startswith("builtin:"):
        raise ConfigError(f"unknown builtin model {model_id!r} (known: {BUILTIN_WHISPER_BASE})")
    path = Path(model_id).expanduser()
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise ConfigError(f"not a model folder: {path} has no config.json")
        return _facts(str(path), lambda name: path / name, complete=True)
    if path.is_absolute() or model_id.startswith(("./", "../", "~")):
        raise ConfigError(f"no such model folder: {path}")
    return _hub_facts(model_id)


def _hub_facts(repo: str) -> ModelFacts | None:
    """Facts from the Hugging Face cache, or None when the model is not cached."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None

    def cached(name: str) -> Path | None:
        try:
            found = try_to_load_from_cache(repo, name)
        except Exception:  # an id that is not a valid repo id: the loader will say so
            return None
        return Path(found) if isinstance(found, str) else None

    if cached("config.json") is None:
        return None
    return _facts(repo, cached, complete=False)


def _facts(where: str, file: Callable[[str], Path | None], complete: bool) -> ModelFacts:
    """Facts from the JSON files that ``file(name)`` finds (a path, or None).

    ``complete``: a file it does not find does not exist (a folder), rather than
    is not cached (the hub cache holds what was downloaded).
    """
    config = _read_json(file("config.json"), where)
    if config is None:
        raise ConfigError(f"not a model folder: {where} has no config.json")
    family = family_of(config)
    pre = _read_json(file("preprocessor_config.json"), where) or {}
    rate = pre.get("sampling_rate")
    gen = _read_json(file("generation_config.json"), where)
    if gen is None and not complete:
        prompt = True if family == "whisper" else None if family == "sed" else False
        return ModelFacts(family, prompt, sample_rate=rate if isinstance(rate, int) else None)
    gen = gen or {}
    lang_to_id = gen.get("lang_to_id") or {}
    task_to_id = gen.get("task_to_id") or {}
    whisper_prompt = family == "whisper" or (family == "sed" and bool(lang_to_id and task_to_id))
    return ModelFacts(
        family,
        whisper_prompt=whisper_prompt,
        languages=frozenset(str(k).strip("<|>") for k in lang_to_id),
        tasks=frozenset(task_to_id),
        multilingual=bool(gen.get("is_multilingual", True)),
        sample_rate=rate if isinstance(rate, int) else None,
        where=where,
    )


def _read_json(path: Path | None, where: str) -> dict[str, Any] | None:
    if path is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"cannot read {path.name} of {where}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"cannot read {path.name} of {where}: not a JSON object")
    return data


def whisper_task(source: str, target: str, task: str) -> str:
    """Transcribe when the source language is the target, else translate (as the loader)."""
    if task != "auto":
        return task
    return "transcribe" if source == target else "translate"


def check_model(report: ConfigReport) -> list[ConfigError]:
    """What the loader, the decoder and ``ingest_policy`` refuse after a load."""
    found: list[ConfigError] = []

    def problem(reason: str, *keys: str) -> None:
        exc = report.error(reason, *keys)
        if exc is not None:
            found.append(exc)

    cfg = report.config
    m = cfg.model
    _check_device(m.device, problem)
    if not report.ok("model.id", "model.cache_dir"):
        return found
    try:
        facts = model_facts(m.id)
    except ConfigError as exc:
        problem(exc.reason, "model.id")
        return found
    if facts is None:
        return found
    if facts.whisper_prompt:
        _check_whisper(report, facts, problem)
    ws = cfg.websocket
    if ws.enabled and facts.whisper_prompt is not None and facts.tasks is not None:
        _check_client_choices(ws.client_languages, ws.client_tasks, facts, problem)
    if cfg.vad.enabled and cfg.vad.backend == "silero" and facts.sample_rate not in (None, 16000):
        problem(
            f"Silero VAD runs on 16 kHz audio and this model takes {facts.sample_rate} Hz; "
            'use backend = "energy" or enabled = false',
            "vad.backend",
            "vad.enabled",
            "model.id",
        )
    return found


def _check_whisper(report: ConfigReport, facts: ModelFacts, problem: _Problem) -> None:
    m = report.config.model
    languages = facts.languages or frozenset()
    if m.source_language != "auto" and languages and m.source_language not in languages:
        problem(
            f"{m.source_language!r} is not a language of this Whisper model",
            "model.source_language",
            "model.id",
        )
    task = whisper_task(m.source_language, m.target_language, m.task)
    if task == "translate" and m.target_language != "en":
        problem(
            "Whisper translates only into English; set target_language = 'en' "
            "or target_language = source_language to transcribe",
            "model.target_language",
            "model.source_language",
            "model.task",
            "model.id",
        )
    if facts.tasks is not None and not facts.tasks and facts.multilingual:
        problem(f"{facts.where}: Whisper generation config lacks task_to_id", "model.id")


def _check_client_choices(languages: str, tasks: str, facts: ModelFacts, problem: _Problem) -> None:
    """``ingest_policy``: what WebSocket clients may choose must be the model's."""
    chosen_languages, chosen_tasks = set(split_items(languages)), set(split_items(tasks))
    model_tasks = (facts.tasks or frozenset()) & {"transcribe", "translate"}
    if not facts.whisper_prompt:
        model_tasks = frozenset()
    if (chosen_languages or chosen_tasks) and not model_tasks:
        key = "websocket.client_languages" if chosen_languages else "websocket.client_tasks"
        reason = "this model has a fixed language and task; clients cannot choose them"
        problem(reason, key, "model.id")
        return
    model_languages = facts.languages | {"auto"} if facts.languages else frozenset()
    unknown = sorted(chosen_languages - model_languages)
    if unknown:
        names = ", ".join(map(repr, unknown))
        verb = "is not a language" if len(unknown) == 1 else "are not languages"
        problem(f"{names} {verb} of this model", "websocket.client_languages", "model.id")
    unknown = sorted(chosen_tasks - model_tasks)
    if unknown:
        reason = f"{unknown[0]!r} is not a task of this model"
        problem(reason, "websocket.client_tasks", "model.id")


def _check_device(device: str, problem: _Problem) -> None:
    """A CUDA device must exist here (torch is imported only for a CUDA device)."""
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if match is None:
        return
    import torch

    if not torch.cuda.is_available():
        problem(f"{device!r}: no CUDA device is available here", "model.device")
        return
    count, index = torch.cuda.device_count(), int(match.group(1) or 0)
    if index >= count:
        problem(f"{device!r}: this machine has {count} CUDA device(s)", "model.device")


# ---------------------------------------------------------------- files


def check_files(report: ConfigReport) -> list[ConfigError]:
    """Files that ``serve`` opens before it is ready: audio, token, TLS, password, JSONL."""
    found: list[ConfigError] = []

    def problem(reason: str, *keys: str) -> None:
        exc = report.error(reason, *keys)
        if exc is not None:
            found.append(exc)

    def refused(exc: ConfigError, key: str) -> None:
        problem(exc.reason, exc.key or key)

    cfg = report.config
    _check_audio(report, problem)
    ws = cfg.websocket
    if ws.enabled:
        from streamer.service.app import load_ws_token, make_ssl_context

        if ws.auth_token_file:
            try:
                load_ws_token(ws.auth_token_file)
            except ConfigError as exc:
                refused(exc, "websocket.auth_token_file")
        if ws.tls_cert and ws.tls_key and report.ok("websocket.tls_key"):
            try:
                make_ssl_context(ws.tls_cert, ws.tls_key)
            except ConfigError as exc:
                refused(exc, "websocket.tls_cert")
    if cfg.mqtt.enabled:
        found += _check_mqtt(report)
    if cfg.jsonl.path and cfg.jsonl.path != "-":
        folder = Path(cfg.jsonl.path).parent
        if not folder.is_dir():
            problem(f"no such folder: {folder}", "jsonl.path")
    return found


def _check_audio(report: ConfigReport, problem: _Problem) -> None:
    from streamer.audio.resample import probe_audio

    for index, source in enumerate(report.config.sources):
        key = f"sources[{index}].path"
        if source.type != "file" or not report.ok(key):
            continue
        try:
            path = resolve_audio_path(source.path)
            if path.is_file():  # a missing file is a rule of config.py's
                probe_audio(path)
        except StreamerError as exc:
            problem(getattr(exc, "reason", str(exc)), key)


def _check_mqtt(report: ConfigReport) -> list[ConfigError]:
    """The sink's settings as ``App._make_mqtt`` builds them, and its TLS files."""
    from streamer.sinks.mqtt import MqttSettings, resolve_password

    c = report.config.mqtt
    if any((e.key or "").startswith("mqtt.") for e in report.errors):
        return []  # the sink would repeat the rules config.py has reported
    found: list[ConfigError] = []
    try:
        password = resolve_password(c.password, c.password_file)
    except ConfigError as exc:
        found.append(exc if exc.file else _keyed(report, exc, "mqtt.password_file"))
        password = None
    names = {f.name for f in dataclasses.fields(MqttSettings)}
    values = {f.name: getattr(c, f.name) for f in dataclasses.fields(c) if f.name in names}
    values.update(username=c.username or None, password=password)
    if not c.client_id:
        values.pop("client_id", None)
    try:
        MqttSettings(**values)
    except ConfigError as exc:
        found.append(_keyed(report, exc, "mqtt.enabled"))
    if c.tls:
        try:
            ctx = ssl.create_default_context(cafile=c.tls_ca or None)
            if c.tls_cert:
                ctx.load_cert_chain(c.tls_cert, c.tls_key or None)
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            files = ", ".join(p for p in (c.tls_ca, c.tls_cert, c.tls_key) if p)
            key = "mqtt.tls_cert" if c.tls_cert else "mqtt.tls_ca"
            error = ConfigError(f"cannot load TLS files ({files}): {reason}")
            found.append(_keyed(report, error, key))
    return found


def _keyed(report: ConfigReport, exc: ConfigError, fallback: str) -> ConfigError:
    """``exc`` named after the config file that set its key."""
    key = exc.key or fallback
    return report.error(exc.reason, key) or ConfigError(exc.reason, key=key)
