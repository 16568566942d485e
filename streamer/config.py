"""Configuration: frozen dataclasses per section, loaded from layered TOML.

Every key has a default, so no file at all is a complete configuration. Files
merge in order, key by key (later wins); ``[[sources]]`` is replaced as a whole
by the last file that has it (``sources = []``: none). ``--set section.key=v``
and ``--set sources[N].key=v`` come last. Relative paths (source ``path``,
``jsonl.path``, ``model.cache_dir``; ``model.id`` when it starts with ``./``,
``../`` or ``~``) resolve against the directory of the file that set them
(the working directory for ``--set``). Mistakes raise a ``ConfigError`` naming
file, key and reason, with a "did you mean" hint: a daemon that silently
ignores a misspelt key is worse than one that refuses to start.
``check_config`` goes on after an error and returns every one (``streamer
check-config``; ``streamer.config_checks`` adds the model's and the files'),
``load_config`` raises the first.

Sources are one ``SourceConfig`` class with the keys of both types; keys of the
other type keep their defaults and are ignored, and setting one is an error.
Each field's rules (bounds, choices, aliases, pattern, path, source type) live
in its ``metadata``, next to its default.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import operator
import os
import re
import tomllib
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from streamer.config_sections import (
    _DATA_DIR,
    BUILTIN_AUDIO,
    AdmissionConfig,
    Config,
    ConsoleConfig,
    EngineConfig,
    JsonlConfig,
    LoggingConfig,
    ModelConfig,
    MqttConfig,
    ServiceConfig,
    SourceConfig,
    StreamingConfig,
    TranslationConfig,
    VadConfig,
    WebSocketConfig,
    WyomingConfig,
)
from streamer.errors import ConfigError

__all__ = [
    "BUILTIN_AUDIO",
    "AdmissionConfig",
    "Config",
    "ConfigErrors",
    "ConfigReport",
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
    "check_config",
    "config_to_dict",
    "default_config",
    "dump_toml",
    "load_config",
    "may_pick_language",
    "raise_errors",
    "replace_section",
    "resolve_audio_path",
    "resolve_cache_dir",
    "split_items",
    "validate_config",
]

_T = TypeVar("_T")

_SECTIONS: dict[str, type[Any]] = {
    f.name: typing.get_type_hints(Config)[f.name]
    for f in dataclasses.fields(Config)
    if f.name != "sources"
}
_TOP_LEVEL = [f.name for f in dataclasses.fields(Config)]


def _field_table(cls: type[Any]) -> dict[str, tuple[dataclasses.Field[Any], type[Any]]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


_FIELDS = {cls: _field_table(cls) for cls in (*_SECTIONS.values(), SourceConfig)}


def default_config() -> Config:
    """The embedded default: demo model, bundled clip, WebSocket on localhost."""
    return Config()


# ---------------------------------------------------------------- helpers


def resolve_audio_path(value: str) -> Path:
    """Map a source ``path`` to a file: ``builtin:NAME`` to the bundled clip."""
    if value.startswith("builtin:"):
        name = BUILTIN_AUDIO.get(value)
        if name is None:
            known = ", ".join(BUILTIN_AUDIO)
            raise ConfigError(
                f"unknown builtin audio {value!r}{_hint(value, BUILTIN_AUDIO)} (known: {known})"
            )
        return _DATA_DIR / name
    return Path(value).expanduser()


def resolve_cache_dir(cache_dir: str = "") -> Path:
    """The model cache folder: the configured one, else STREAMER_CACHE_DIR,
    systemd's CACHE_DIRECTORY, then ``$XDG_CACHE_HOME/streamer``."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if env := os.environ.get("STREAMER_CACHE_DIR"):
        return Path(env).expanduser()
    if env := os.environ.get("CACHE_DIRECTORY"):
        return Path(env.split(":")[0])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "streamer"


def _hint(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


_TYPE_NAMES = {bool: "boolean", int: "integer", float: "float", str: "string"}


def _got(value: object) -> str:
    """A value as TOML writes it, and its TOML type, for error messages."""
    kinds = {list: "array", dict: "table", **_TYPE_NAMES}
    shown = _toml_scalar(value) if isinstance(value, bool | int | float | str) else repr(value)
    return f"{shown} ({kinds.get(type(value), type(value).__name__)})"


def _err(reason: str, origin: _Origin, key: str | None = None) -> ConfigError:
    return ConfigError(reason, file=origin.label, key=key)


# ---------------------------------------------------------------- layers


@dataclass(frozen=True, slots=True)
class _Origin:
    """Where a raw value came from: file label (None = default), base dir, layer."""

    label: str | None
    base: Path
    layer: int


_Value = tuple[Any, _Origin]


@dataclass(slots=True)
class _RawSource:
    origin: _Origin
    values: dict[str, _Value]


@dataclass(slots=True)
class _Raw:
    """Merged, not yet validated values, each with its origin."""

    sections: dict[str, dict[str, _Value]] = field(
        default_factory=lambda: {name: {} for name in _SECTIONS}
    )
    sources: list[_RawSource] | None = None


class ConfigErrors(ConfigError):
    """Several errors at once; reads as the first (``errors`` holds them all)."""

    def __init__(self, errors: Sequence[ConfigError]) -> None:
        first, more = errors[0], len(errors) - 1
        hint = f" (and {more} more error(s): streamer check-config lists all)" if more else ""
        super().__init__(first.reason + hint, file=first.file, key=first.key)
        self.errors = tuple(errors)


def raise_errors(errors: Sequence[ConfigError]) -> None:
    """Raise the one error, or ``ConfigErrors`` for several; nothing for none."""
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ConfigErrors(errors)


@dataclass(slots=True)
class _Problems:
    """Errors found so far, and the keys (``section.key``, ``sources[N]``) they refused."""

    errors: list[ConfigError] = field(default_factory=list)
    refused: set[str] = field(default_factory=set)

    def add(self, exc: ConfigError, *refused: str) -> None:
        self.errors.append(exc)
        self.refused.update(refused or ([exc.key] if exc.key else []))


@dataclass(frozen=True, slots=True)
class ConfigReport:
    """What ``check_config`` found: every error, and the configuration with each
    refused value at its default (a broken source as a placeholder microphone)."""

    config: Config
    errors: tuple[ConfigError, ...]
    refused: frozenset[str]
    locate: Callable[[str], _Origin | None]

    def ok(self, *keys: str) -> bool:
        """Whether none of ``keys`` (nor its section or source) was refused."""
        for key in keys:
            head = key.partition(".")[0]
            if {key, head, head.partition("[")[0]} & self.refused:
                return False
        return True

    def error(self, reason: str, *keys: str) -> ConfigError | None:
        """An error about ``keys`` (naming the first) from the file that set the
        latest of them; None when one of them was refused already."""
        if not self.ok(*keys):
            return None
        origins = [o for o in map(self.locate, keys) if o is not None]
        latest = max(origins, key=lambda o: o.layer, default=None)
        return ConfigError(reason, file=latest.label if latest else None, key=keys[0])


def _read_toml(path: Path, label: str) -> dict[str, Any]:
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror or exc}", file=label) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text: {exc}", file=label) from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}", file=label) from exc


def _merge_document(
    raw: _Raw, doc: Mapping[str, Any], origin: _Origin, problems: _Problems
) -> None:
    """Fold one parsed file into ``raw``; structural errors name the file."""
    for name, value in doc.items():
        if name == "sources":
            try:
                raw.sources = _raw_sources(value, origin, problems)
            except ConfigError as exc:
                problems.add(exc)
        elif name in _SECTIONS:
            if not isinstance(value, dict):
                problems.add(_err(f"expected a table [{name}], got {_got(value)}", origin, name))
                continue
            fields = _FIELDS[_SECTIONS[name]]
            for key, item in value.items():
                if key not in fields:
                    problems.add(_unknown_key(name, key, fields, origin, f"{name}.{key}"))
                else:
                    raw.sections[name][key] = (item, origin)
        else:
            problems.add(_unknown_section(name, origin))


def _raw_sources(value: object, origin: _Origin, problems: _Problems) -> list[_RawSource]:
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise _err(f"expected an array of tables [[sources]], got {_got(value)}", origin, "sources")
    fields = _FIELDS[SourceConfig]
    result = []
    for index, table in enumerate(value):
        for key in table:
            if key not in fields:
                full = f"sources[{index}].{key}"
                problems.add(_unknown_key("[[sources]]", key, fields, origin, full))
        values = {k: (v, origin) for k, v in table.items() if k in fields}
        result.append(_RawSource(origin, values))
    return result


def _unknown_key(where: str, key: str, known: Iterable[str], at: _Origin, full: str) -> ConfigError:
    known = list(known)
    hint = _hint(key, known) or f" (known keys: {', '.join(known)})"
    where = where if where.startswith("[") else f"[{where}]"
    return _err(f"unknown key {key!r} in {where}{hint}", at, full)


def _unknown_section(name: str, at: _Origin) -> ConfigError:
    hint = _hint(name, _TOP_LEVEL)
    if not hint:
        owners = [s for s, cls in _SECTIONS.items() if name in _FIELDS[cls]]
        if owners:
            hint = f"; keys belong in a section: did you mean '{owners[0]}.{name}'?"
        else:
            hint = f" (known sections: {', '.join(_TOP_LEVEL)})"
    return _err(f"unknown section {name!r}{hint}", at, name)


_INDEXED = re.compile(r"\[(\d+)\]")


def _parse_scalar(text: str) -> object:
    """A ``--set`` value: a TOML scalar if it parses as one, else the text."""
    text = text.strip()
    try:
        doc = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        return text
    value = doc.get("v")
    if len(doc) != 1 or not isinstance(value, bool | int | float | str):
        return text
    return value


def _apply_override(raw: _Raw, text: str, origin: _Origin) -> None:
    """Apply one ``section.key=value`` (or ``sources[N].key=value``)."""
    lhs, eq, rhs = text.partition("=")
    dotted = _INDEXED.sub(r".\1", lhs.strip())
    parts = dotted.split(".")
    if not eq or not all(parts):
        raise _err(f"expected section.key=value or sources[N].key=value, got {text!r}", origin)
    if parts[0] == "sources":
        if len(parts) != 3 or not parts[1].isdigit():
            raise _err(f"expected sources[N].key=value, got {text!r}", origin)
        index, key = int(parts[1]), parts[2]
        fields = _FIELDS[SourceConfig]
        full = f"sources[{index}].{key}"
        if key not in fields:
            raise _unknown_key("[[sources]]", key, fields, origin, full)
        if raw.sources is None:
            raw.sources = [_default_raw_source()]
        if index >= len(raw.sources):
            raise _err(f"no such source: {len(raw.sources)} configured", origin, full)
        target = raw.sources[index].values
    else:
        if parts[0] not in _SECTIONS:
            raise _unknown_section(parts[0], origin)
        if len(parts) != 2:
            raise _err(f"expected section.key=value, got {text!r}", origin)
        key = parts[1]
        fields = _FIELDS[_SECTIONS[parts[0]]]
        if key not in fields:
            raise _unknown_key(parts[0], key, fields, origin, dotted)
        target = raw.sections[parts[0]]
    value = _parse_scalar(rhs)
    if fields[key][1] is str and not isinstance(value, str):
        value = rhs.strip()  # e.g. model.id=1234 or jsonl.path=2024-01-01
    target[key] = (value, origin)


def _default_raw_source() -> _RawSource:
    origin = _Origin(None, Path.cwd(), -1)
    default = SourceConfig()
    values = {k: (getattr(default, k), origin) for k in ("type", "stream", "path")}
    return _RawSource(origin, values)


# ---------------------------------------------------------------- coercion

_BOUNDS = (
    ("min", ">=", operator.ge),
    ("max", "<=", operator.le),
    ("gt", ">", operator.gt),
    ("lt", "<", operator.lt),
)


def _coerce(
    f: dataclasses.Field[Any], typ: type[Any], value: Any, origin: _Origin, key: str
) -> Any:
    """Check one value against its field's type and rules; return it normalised."""
    rules = f.metadata

    def fail(reason: str) -> ConfigError:
        return _err(reason, origin, key)

    expected = _TYPE_NAMES[typ]
    got = f"got {_got(value)}"
    if typ is str and rules.get("int_as_str") and type(value) is int:
        value = str(value)
    if typ is float and type(value) is int:
        value = float(value)
    if "items" in rules and type(value) is list and all(type(v) is str for v in value):
        value = ",".join(value)  # a TOML array for a list key: targets = ["de", "fr"]
    if type(value) is not typ:
        raise fail(f"expected {expected}, {got}")
    if typ is float and not math.isfinite(value):
        raise fail(f"expected a finite number, {got}")
    for rule, sign, ok in _BOUNDS:
        if rule in rules and not ok(value, rules[rule]):
            raise fail(f"must be {sign} {rules[rule]}, {got}")
    if "choices" in rules:
        choices: tuple[str, ...] = rules["choices"]
        word = value.strip().lower()
        word = rules.get("aliases", {}).get(word, word)
        if word not in choices:
            raise fail(f"expected one of {', '.join(choices)}; {got}{_hint(word, choices)}")
        value = word
    if rules.get("lower"):
        value = value.strip().lower()
    if "pattern" in rules and not re.fullmatch(rules["pattern"], value):
        raise fail(f"must match {rules['pattern']}, {got}")
    if "items" in rules:
        bad = [item for item in split_items(value) if not re.fullmatch(rules["items"], item)]
        if bad:
            raise fail(f"item {bad[0]!r} must match {rules['items']} (comma-separated list)")
        value = ",".join(split_items(value))
    if rules.get("nonempty") and not value.strip():
        raise fail(f"must not be empty, {got}")
    if rules.get("path"):
        value = _resolve_relative(value, origin.base)
    if rules.get("model_path") and value.startswith(("./", "../", ".\\", "..\\", "~")):
        value = _resolve_relative(value, origin.base)
    return value


def split_items(value: str) -> tuple[str, ...]:
    """The items of a comma-separated list key (blanks dropped)."""
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _resolve_relative(value: str, base: Path) -> str:
    if value in ("", "-") or value.startswith("builtin:"):
        return value
    path = Path(os.path.expandvars(value)).expanduser()
    if not path.is_absolute():
        path = base / path
    return os.path.normpath(path)


def _build_section(
    cls: type[_T], values: Mapping[str, _Value], prefix: str, problems: _Problems
) -> _T:
    fields = _FIELDS[cls]
    kwargs = {}
    for key, (value, origin) in values.items():
        try:
            kwargs[key] = _coerce(*fields[key], value, origin, f"{prefix}.{key}")
        except ConfigError as exc:
            problems.add(exc)
    return cls(**kwargs)


def _build_source(
    index: int, raw: _RawSource, counters: dict[str, int], problems: _Problems
) -> SourceConfig:
    fields = _FIELDS[SourceConfig]
    prefix = f"sources[{index}]"
    try:
        if "type" not in raw.values:
            raise _err(
                'each [[sources]] table needs type = "file" or "microphone"',
                raw.origin,
                f"{prefix}.type",
            )
        type_value, type_origin = raw.values["type"]
        kind = _coerce(*fields["type"], type_value, type_origin, f"{prefix}.type")
    except ConfigError as exc:  # the other keys mean nothing without a type
        problems.add(exc, prefix)
        return SourceConfig(type="microphone", stream=prefix)  # a placeholder no rule sees
    kwargs: dict[str, Any] = {}
    for key, (value, origin) in raw.values.items():
        kinds = fields[key][0].metadata.get("kinds")
        try:
            if kinds and kind not in kinds:
                reason = f"{key!r} applies to {kinds[0]} sources only"
                raise _err(f"{reason}; this source has type {kind!r}", origin, f"{prefix}.{key}")
            kwargs[key] = _coerce(*fields[key], value, origin, f"{prefix}.{key}")
        except ConfigError as exc:
            problems.add(exc)
    if "stream" not in kwargs:
        short = "mic" if kind == "microphone" else kind
        kwargs["stream"] = f"{short}{counters.get(kind, 0)}"
    counters[kind] = counters.get(kind, 0) + 1
    return SourceConfig(**kwargs)


def _build(raw: _Raw, problems: _Problems) -> ConfigReport:
    sections = {
        name: _build_section(cls, raw.sections[name], name, problems)
        for name, cls in _SECTIONS.items()
    }
    cfg = Config(**sections)
    if raw.sources is not None:
        counters: dict[str, int] = {}
        sources = tuple(_build_source(i, s, counters, problems) for i, s in enumerate(raw.sources))
        cfg = dataclasses.replace(cfg, sources=sources)
    report = ConfigReport(cfg, (), frozenset(problems.refused), _locator(raw))
    errors = (*problems.errors, *_validate(report))
    return dataclasses.replace(report, errors=errors)


def _locator(raw: _Raw) -> Callable[[str], _Origin | None]:
    """Find which layer set a key (for errors about combinations of keys)."""

    def locate(key: str) -> _Origin | None:
        head, _, name = key.rpartition(".")
        match = re.fullmatch(r"sources\[(\d+)\]", head)
        if match and raw.sources is not None:
            source = raw.sources[int(match.group(1))]
            found = source.values.get(name)
            return found[1] if found else source.origin
        found = raw.sections.get(head, {}).get(name)
        return found[1] if found else None

    return locate


# ---------------------------------------------------------------- validation


def may_pick_language(model_id: str) -> bool:
    """Whether the speech model may decode translation targets itself (no cascade).

    Only a speech-encoder-decoder's decoder picks its language by a token
    (``streamer.core.multi_target``); whether it has a token for every target
    is known once it is loaded (the daemon refuses to start otherwise). A
    builtin (Whisper) or a local folder of another type cannot; a hub id is
    given the benefit of the doubt here.
    """
    if model_id.startswith("builtin:"):
        return False
    config = Path(model_id).expanduser() / "config.json"
    if not config.is_file():
        return not Path(model_id).expanduser().is_dir()
    try:
        import json

        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return False
    return bool(model_type == "speech-encoder-decoder")


def validate_config(cfg: Config) -> None:
    """Check a ``Config`` built in code as strictly as one loaded from a file."""
    origin = _Origin(None, Path.cwd(), 0)
    named = [(name, getattr(cfg, name)) for name in _SECTIONS]
    named += [(f"sources[{i}]", source) for i, source in enumerate(cfg.sources)]
    problems = _Problems()
    for name, section in named:
        for key, (f, typ) in _FIELDS[type(section)].items():
            try:
                _coerce(f, typ, getattr(section, key), origin, f"{name}.{key}")
            except ConfigError as exc:
                problems.add(exc)
    report = ConfigReport(cfg, (), frozenset(problems.refused), lambda key: None)
    raise_errors([*problems.errors, *_validate(report)])


def _validate(report: ConfigReport) -> list[ConfigError]:
    """Rules that span several keys (each skipped when one of its keys was refused)."""
    cfg, found = report.config, []

    def problem(reason: str, *keys: str) -> None:
        exc = report.error(reason, *keys)
        if exc is not None:
            found.append(exc)

    s = cfg.streaming
    if s.left_context_s + s.max_segment_s > s.max_window_s:
        problem(
            f"left_context_s + max_segment_s ({s.left_context_s:g} + {s.max_segment_s:g} s) "
            f"exceeds max_window_s ({s.max_window_s:g} s)",
            "streaming.max_segment_s",
            "streaming.left_context_s",
            "streaming.max_window_s",
        )
    if s.max_backlog_s < s.max_segment_s:
        problem(
            f"max_backlog_s ({s.max_backlog_s:g} s) is below max_segment_s "
            f"({s.max_segment_s:g} s): one long segment would hold the input back",
            "streaming.max_backlog_s",
            "streaming.max_segment_s",
        )
    ws = cfg.websocket
    if bool(ws.tls_cert) != bool(ws.tls_key):
        problem("TLS needs both tls_cert and tls_key", "websocket.tls_cert", "websocket.tls_key")
    tr = cfg.translation
    if (tr.targets or ws.client_targets) and not tr.model and not may_pick_language(cfg.model.id):
        key = "translation.targets" if tr.targets else "websocket.client_targets"
        problem("translation targets need translation.model (a translation checkpoint)",
                key, "translation.model")  # fmt: skip
    wy = cfg.wyoming
    if wy.enabled and not ws.enabled:
        problem(
            "the Wyoming server needs websocket.enabled: its requests are client streams "
            "with the [websocket] limits (max_streams, max_audio_rate, idle_timeout_s)",
            "wyoming.enabled",
            "websocket.enabled",
        )
    elif wy.enabled and wy.port and wy.port == ws.port:
        problem(f"wyoming.port is websocket.port ({ws.port})", "wyoming.port", "websocket.port")
    mq = cfg.mqtt
    if (mq.password or mq.password_file) and not mq.username:
        problem(
            "a password needs a username", "mqtt.username", "mqtt.password", "mqtt.password_file"
        )
    for key in ("tls_ca", "tls_cert", "tls_key"):
        if getattr(mq, key) and not mq.tls:
            problem(f"{key} is set but tls = false", f"mqtt.{key}", "mqtt.tls")
    if mq.reconnect_max_s < mq.reconnect_min_s:
        problem(
            "reconnect_max_s is below reconnect_min_s",
            "mqtt.reconnect_max_s",
            "mqtt.reconnect_min_s",
        )
    seen: dict[str, int] = {}
    for index, source in enumerate(cfg.sources):
        key = f"sources[{index}]"
        if source.stream in seen:
            problem(
                f"duplicate stream id {source.stream!r} (also sources[{seen[source.stream]}])",
                f"{key}.stream",
            )
        seen[source.stream] = index
        if source.type != "file":
            continue
        try:
            path = resolve_audio_path(source.path)
        except ConfigError as exc:
            problem(exc.reason, f"{key}.path")
            continue
        if not path.is_file():
            problem(f"no such audio file: {path}", f"{key}.path")
    return found


# ---------------------------------------------------------------- public entry points


def load_config(paths: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> Config:
    """Merge ``paths`` in order over the defaults, then ``overrides``; validate.

    Raises the first error found (``ConfigErrors``, which reads as the first,
    when there are several)."""
    report = check_config(paths, overrides)
    raise_errors(report.errors)
    return report.config


def check_config(paths: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> ConfigReport:
    """``load_config`` that goes on after an error: every error, in file order.

    A file that cannot be read or parsed adds nothing; a refused value keeps
    its default, and the rules about several keys skip keys that were refused.
    """
    raw, problems = _Raw(), _Problems()
    for layer, path in enumerate(paths):
        path = Path(path)
        origin = _Origin(str(path), path.absolute().parent, layer)
        try:
            doc = _read_toml(path, str(path))
        except ConfigError as exc:
            problems.add(exc)
            continue
        _merge_document(raw, doc, origin, problems)
    set_origin = _Origin("--set", Path.cwd(), len(paths))
    for text in overrides:
        try:
            _apply_override(raw, text, set_origin)
        except ConfigError as exc:
            problems.add(exc)
    return _build(raw, problems)


def replace_section(cfg: Config, section: str, **changes: Any) -> Config:
    """A copy of ``cfg`` with keys of one section changed, checked like a file."""
    origin = _Origin(None, Path.cwd(), 0)
    if section not in _SECTIONS:
        raise _unknown_section(section, origin)
    fields = _FIELDS[_SECTIONS[section]]
    kwargs = {}
    for key, value in changes.items():
        if key not in fields:
            raise _unknown_key(section, key, fields, origin, f"{section}.{key}")
        kwargs[key] = _coerce(*fields[key], value, origin, f"{section}.{key}")
    new = dataclasses.replace(
        cfg, **{section: dataclasses.replace(getattr(cfg, section), **kwargs)}
    )
    validate_config(new)
    return new


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Effective values as plain data; sources carry only their type's keys."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(Config):
        value = getattr(cfg, f.name)
        if f.name == "sources":
            out["sources"] = [_source_to_dict(source) for source in value]
        else:
            out[f.name] = {g.name: getattr(value, g.name) for g in dataclasses.fields(value)}
    return out


def _source_to_dict(source: SourceConfig) -> dict[str, Any]:
    return {
        name: getattr(source, name)
        for name, (f, _) in _FIELDS[SourceConfig].items()
        if source.type in f.metadata.get("kinds", (source.type,))
    }


def dump_toml(cfg: Config) -> str:
    """Effective values as TOML that ``load_config`` reads back to an equal Config."""
    data = config_to_dict(cfg)
    lines: list[str] = []
    if not data["sources"]:
        lines.append("sources = []")  # top-level keys must precede every table
    for name, value in data.items():
        tables = value if isinstance(value, list) else [value]
        header = f"[[{name}]]" if isinstance(value, list) else f"[{name}]"
        for table in tables:
            lines += ["", header, *(f"{k} = {_toml_scalar(v)}" for k, v in table.items())]
    return "\n".join(lines).lstrip("\n") + "\n"


_ESCAPES = str.maketrans(
    {chr(c): f"\\u{c:04x}" for c in (*range(0x20), 0x7F)}
    | {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f"}
    | {"\r": "\\r"}
)


def _toml_scalar(value: bool | int | float | str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    return '"' + value.translate(_ESCAPES) + '"'
