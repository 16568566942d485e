"""Exceptions of streamer.

Expected faults are raised as a ``StreamerError`` subclass so that the CLI can
print one line (no traceback) and exit with a meaningful code::

    StreamerError
    ├── ConfigError           bad TOML, unknown key, bad value   (exit 78, EX_CONFIG)
    ├── ModelLoadError        checkpoint missing/corrupt/unsupported (exit 1)
    │   └── ConversionError   the embedded Whisper base cannot be built
    ├── AudioError            file unreadable, bad format
    │   └── DeviceError       PortAudio missing, no such capture device
    └── ProtocolError         a client broke the wire protocol (closes that client)
"""

from __future__ import annotations

EX_CONFIG = 78


class StreamerError(Exception):
    """Base of every expected, reportable fault."""

    exit_code: int = 1


class ConfigError(StreamerError):
    """A configuration file or value is invalid; names file and key."""

    exit_code = EX_CONFIG

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None) -> None:
        self.file = file
        self.key = key
        self.reason = message
        where = ": ".join(part for part in (file, key) if part)
        super().__init__(f"{where}: {message}" if where else message)


class ModelLoadError(StreamerError):
    """A model checkpoint cannot be loaded."""


class ConversionError(ModelLoadError):
    """The embedded CTranslate2 Whisper base cannot be converted."""


class AudioError(StreamerError):
    """Audio cannot be read or has an unusable format."""


class DeviceError(AudioError):
    """PortAudio or a capture device is missing."""

    exit_code = EX_CONFIG


class ProtocolError(StreamerError):
    """A client violated the wire protocol; ``close_code`` says how to close it."""

    def __init__(self, message: str, close_code: int = 1008) -> None:
        self.close_code = close_code
        super().__init__(message)
