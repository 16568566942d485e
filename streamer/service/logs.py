"""Process logging: one handler on the root logger, in the format stderr wants.

Formats (``[logging] format``):

* ``human``: on a terminal ``12:34:56 WARN  audio.capture: message``, the level
  coloured unless ``NO_COLOR`` is set; elsewhere (a pipe, a file)
  ``2025-05-01 12:34:56.789 WARNING streamer.audio.capture: message``.
* ``journal``: ``<4>audio.capture: message``, the sd-daemon(3) priority on
  every line (journald splits lines into entries, so a traceback keeps its
  priority); no timestamp, journald adds its own.
* ``json``: one object per line, ``ts`` (UTC, ISO 8601), ``level``,
  ``logger``, ``message``, ``exc`` when there is a traceback, then the
  record's ``extra`` fields (``stream``...).
* ``auto``: ``journal`` when stderr is the journal stream systemd connected
  (``$JOURNAL_STREAM`` names its device and inode: the documented test, which
  a pipe inherited from a service does not pass), else ``human``.

Secrets never reach the output: a filter on the handler replaces every value
given to ``register_secret`` and anything shaped like ``Bearer <token>``,
``password=...``, ``"password": "..."``, ``?token=...`` or the password of a
``scheme://user:password@`` URL with ``***``, in the message, the traceback
and string ``extra`` fields. Expected faults (``StreamerError``) logged with
``exc_info`` stay one line: the message, a colon and the error, no traceback.

``setup_logging`` may be called again (SIGHUP): it reconfigures the one handler
it installed instead of adding another.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import re
import sys
import threading
import traceback
from collections.abc import Mapping
from typing import Any, TextIO
from urllib.parse import quote

from streamer.config import LoggingConfig
from streamer.errors import StreamerError

__all__ = [
    "FORMATS",
    "NOISY_LOGGERS",
    "HumanFormatter",
    "JournalFormatter",
    "JsonFormatter",
    "SecretFilter",
    "clear_secrets",
    "configure_logging",
    "is_journal_stream",
    "redact",
    "register_secret",
    "reload_logging",
    "report_error",
    "setup_logging",
]

FORMATS = ("auto", "human", "journal", "json")
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
LEVELS |= {"warn": logging.WARNING, "error": logging.ERROR, "critical": logging.CRITICAL}

#: Third-party loggers held at WARNING unless the level is debug.
NOISY_LOGGERS = (
    "websockets",
    "aiomqtt",
    "paho",
    "urllib3",
    "httpx",
    "httpcore",
    "huggingface_hub",
    "transformers",
    "filelock",
)

MASK = "***"
_MIN_SECRET = 4  # shorter values would mask ordinary words everywhere


# ---------------------------------------------------------------- secrets

_PATTERNS = re.compile(
    r"(?P<a>\b(?:Bearer|Basic)\s+)[A-Za-z0-9._~+/=-]{8,}"
    r"|(?P<b>\b(?:password|passwd|pwd|secret|api[_-]?key|access[_-]?key)\s*=\s*[\"']?)"
    r"[^\s\"',;&]+"
    r"|(?P<e>[\"'](?:password|passwd|secret|token|api[_-]?key)[\"']\s*:\s*[\"'])[^\"']+"
    r"|(?P<c>[?&;\s]token=)[^\s\"',;&]+"
    r"|(?P<d>[a-z][a-z0-9+.-]*://[^/\s:@]+:)[^/\s@]+(?=@)",
    re.IGNORECASE,
)

_secrets_lock = threading.Lock()
_secrets: set[str] = set()
_secret_re: re.Pattern[str] | None = None


def register_secret(value: str | None) -> None:
    """Never log ``value`` (nor its URL-encoded or escaped forms) from now on.

    Values shorter than 4 characters are ignored: masking them would mangle
    ordinary words in every line.
    """
    global _secret_re
    if not value or len(value) < _MIN_SECRET:
        return
    forms = {value, quote(value, safe=""), repr(value)[1:-1]}
    with _secrets_lock:
        _secrets.update(f for f in forms if len(f) >= _MIN_SECRET)
        longest_first = sorted(_secrets, key=len, reverse=True)
        _secret_re = re.compile("|".join(map(re.escape, longest_first)))


def clear_secrets() -> None:
    """Forget every registered secret (tests)."""
    global _secret_re
    with _secrets_lock:
        _secrets.clear()
        _secret_re = None


def _mask_pattern(match: re.Match[str]) -> str:
    prefix = next(g for g in match.groups() if g is not None)
    return prefix + MASK


def redact(text: str) -> str:
    """``text`` with registered secrets and credential-shaped values masked."""
    secret_re = _secret_re
    if secret_re is not None:
        text = secret_re.sub(MASK, text)
    return _PATTERNS.sub(_mask_pattern, text)


_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a caller passed with ``extra=``."""
    return {
        k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS and not k.startswith("_")
    }


def _expected_fault(record: logging.LogRecord) -> StreamerError | None:
    exc = record.exc_info[1] if record.exc_info else None
    return exc if isinstance(exc, StreamerError) else None


class SecretFilter(logging.Filter):
    """Masks secrets in a record before any formatter sees it (never drops one).

    The record is rewritten in place, so handlers that run after ours see the
    masked text too.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format/args pair: let the handler report it
            return True
        record.msg, record.args = redact(message), None
        fault = _expected_fault(record)
        if fault is not None:  # one line: "what failed: why", no traceback
            record.msg = redact(f"{record.msg}: {fault or type(fault).__name__}")
            record.exc_info, record.exc_text = None, None
        elif record.exc_info and not record.exc_text:
            record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        for key, value in _extras(record).items():
            if isinstance(value, str):
                setattr(record, key, redact(value))
        return True


# ---------------------------------------------------------------- formatters


def short_name(name: str) -> str:
    """``streamer.audio.capture`` -> ``audio.capture``; other loggers unchanged."""
    return name.removeprefix("streamer.") if name != "streamer" else name


class _Base(logging.Formatter):
    def _text(self, record: logging.LogRecord) -> tuple[str, str]:
        """(message, traceback and stack text or "")."""
        message = record.getMessage()
        fault = _expected_fault(record)  # when no SecretFilter ran before us
        if fault is not None:
            return f"{message}: {fault or type(fault).__name__}", ""
        extra = []
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            extra.append(record.exc_text)
        if record.stack_info:
            extra.append(self.formatStack(record.stack_info))
        return message, "\n".join(extra)


_COLOURS = {
    logging.DEBUG: "\x1b[2m",
    logging.INFO: "\x1b[32m",
    logging.WARNING: "\x1b[33m",
    logging.ERROR: "\x1b[31m",
    logging.CRITICAL: "\x1b[1;31m",
}
_SHORT_LEVELS = {"WARNING": "WARN", "CRITICAL": "CRIT"}
_DIM, _RESET = "\x1b[2m", "\x1b[0m"


class HumanFormatter(_Base):
    """For people: compact and optionally coloured on a terminal, timestamped elsewhere."""

    def __init__(self, *, tty: bool = False, colour: bool = False) -> None:
        super().__init__()
        self.tty = tty
        self.colour = colour and tty

    def format(self, record: logging.LogRecord) -> str:
        message, details = self._text(record)
        when = dt.datetime.fromtimestamp(record.created)
        if self.tty:
            level = _SHORT_LEVELS.get(record.levelname, record.levelname)
            name = short_name(record.name)
            if self.colour:
                colour = _COLOURS.get(record.levelno, "")
                head = f"{_DIM}{when:%H:%M:%S}{_RESET} {colour}{level:<5}{_RESET} "
                head += f"{_DIM}{name}:{_RESET} "
            else:
                head = f"{when:%H:%M:%S} {level:<5} {name}: "
        else:
            stamp = when.strftime("%Y-%m-%d %H:%M:%S") + f".{when.microsecond // 1000:03d}"
            head = f"{stamp} {record.levelname:<7} {record.name}: "
        out = head + message + (f"\n{details}" if details else "")
        return redact(out)


#: sd-daemon(3) priorities (syslog levels).
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def journal_priority(levelno: int) -> int:
    """The syslog priority of a logging level (custom levels round down)."""
    return next((prio for level, prio in _PRIORITIES if levelno >= level), 7)


class JournalFormatter(_Base):
    """``<N>`` on every line, no timestamp: what journald parses from a stream."""

    def format(self, record: logging.LogRecord) -> str:
        message, details = self._text(record)
        text = f"{short_name(record.name)}: {message}" + (f"\n{details}" if details else "")
        prefix = f"<{journal_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in redact(text).split("\n"))


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {str(k): _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(v) for v in value]
    if isinstance(value, bool | int | float) or value is None:
        return value
    return redact(str(value))


class JsonFormatter(_Base):
    """One JSON object per line for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        message, details = self._text(record)
        when = dt.datetime.fromtimestamp(record.created, dt.UTC)
        obj: dict[str, Any] = {
            "ts": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(message),
        }
        if details:
            obj["exc"] = redact(details)
        for key, value in _extras(record).items():
            obj.setdefault(key, _redact_value(value))
        return json.dumps(obj, ensure_ascii=False, default=str)


# ---------------------------------------------------------------- setup


def is_journal_stream(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default stderr) is the journal stream systemd gave us."""
    stream = sys.stderr if stream is None else stream
    expected = os.environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = expected.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):  # no real descriptor (captured, closed)
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def wants_colour(stream: TextIO) -> bool:
    """Colour on a terminal unless NO_COLOR (no-color.org) or TERM=dumb say otherwise."""
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    return _isatty(stream)


def resolve_format(fmt: str, stream: TextIO) -> str:
    """``auto`` made concrete for ``stream``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r} (expected one of {', '.join(FORMATS)})")
    if fmt == "auto":
        return "journal" if is_journal_stream(stream) else "human"
    return fmt


def make_formatter(fmt: str, stream: TextIO) -> logging.Formatter:
    """The formatter of a concrete format (not ``auto``) for ``stream``."""
    if fmt == "journal":
        return JournalFormatter()
    if fmt == "json":
        return JsonFormatter()
    tty = _isatty(stream)
    return HumanFormatter(tty=tty, colour=tty and wants_colour(stream))


class _Handler(logging.StreamHandler[TextIO]):
    """The handler ``setup_logging`` owns (found again by type on a reload)."""

    fmt = "human"


@dataclasses.dataclass(slots=True)
class _State:
    level_override: str | None = None
    stream: TextIO | None = None
    level: str = ""
    fmt: str = ""


_state = _State()
_setup_lock = threading.Lock()


def _level(level: str) -> int:
    try:
        return LEVELS[level.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}") from None


def setup_logging(level: str, fmt: str = "auto", stream: TextIO | None = None) -> logging.Handler:
    """Send every log record at ``level`` or above to ``stream`` (stderr) in ``fmt``.

    Idempotent: a second call reconfigures the handler the first one
    installed (level, format, stream) and returns it; handlers installed by
    others (pytest's) are left alone. Third-party ``NOISY_LOGGERS`` are capped
    at WARNING unless ``level`` is debug. Python warnings are logged too.
    """
    levelno = _level(level)
    stream = sys.stderr if stream is None else stream
    concrete = resolve_format(fmt, stream)
    root = logging.getLogger()
    with _setup_lock:
        handler = next((h for h in root.handlers if isinstance(h, _Handler)), None)
        if handler is None:
            handler = _Handler(stream)
            handler.addFilter(SecretFilter())
            handler.setFormatter(make_formatter(concrete, stream))
            root.addHandler(handler)
        else:
            handler.setFormatter(make_formatter(concrete, stream))
            if handler.stream is not stream:
                handler.setStream(stream)
        handler.fmt = concrete
        root.setLevel(levelno)
        for name in NOISY_LOGGERS:
            logging.getLogger(name).setLevel(
                logging.NOTSET if levelno <= logging.DEBUG else logging.WARNING
            )
        logging.captureWarnings(True)
        _state.stream, _state.level, _state.fmt = stream, level.strip().lower(), fmt
    return handler


def configure_logging(
    config: LoggingConfig, *, level_override: str | None = None, stream: TextIO | None = None
) -> logging.Handler:
    """Apply a ``[logging]`` section; ``level_override`` (``--log-level``) wins over
    its level now and on every ``reload_logging``."""
    _state.level_override = level_override
    return setup_logging(level_override or config.level, config.format, stream)


def reload_logging(config: LoggingConfig) -> str | None:
    """SIGHUP: apply a reloaded ``[logging]`` section to the running process.

    The ``--log-level`` given to ``configure_logging`` still wins, and the
    stream stays the same. Returns a short description of what changed (for
    one log line), or None when nothing did.
    """
    before = (_state.level, _state.fmt)
    level = _state.level_override or config.level
    setup_logging(level, config.format, _state.stream)
    after = (_state.level, _state.fmt)
    if after == before:
        return None
    return f"log level {after[0]}, format {after[1]}"


def current_format(stream: TextIO | None = None) -> str:
    """The concrete format our handler writes, or what ``auto`` would pick."""
    handler = next((h for h in logging.getLogger().handlers if isinstance(h, _Handler)), None)
    if handler is not None:
        return handler.fmt
    return resolve_format("auto", sys.stderr if stream is None else stream)


def report_error(text: str, *, exit_code: int = 1, stream: TextIO | None = None) -> None:
    """Write the CLI's one-line ``streamer: error: ...`` in the active format.

    ``journal`` prefixes ``<3>``; ``json`` writes one object (logger
    ``streamer``, level ``error``, ``exit_code``); ``human`` writes the plain
    line. Secrets are masked like in log records; newlines become spaces.
    """
    stream = sys.stderr if stream is None else stream
    fmt = current_format(stream)
    text = " ".join(redact(text).splitlines())
    if fmt == "journal":
        line = f"<3>streamer: error: {text}"
    elif fmt == "json":
        ts = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        obj = {"ts": ts, "level": "error", "logger": "streamer", "message": text}
        line = json.dumps(obj | {"exit_code": exit_code}, ensure_ascii=False)
    else:
        line = f"streamer: error: {text}"
    print(line, file=stream, flush=True)
