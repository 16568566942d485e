"""PortAudio input devices: listing, choosing one by index or name, describing them.

``streamer devices`` prints :func:`format_devices`; the microphone source
(``streamer.audio.capture``) picks its device with :func:`select_device` and
names the input devices in its errors with :func:`inputs_summary`, so a wrong
``device`` setting tells the operator what would have worked. A device found
again after a re-plug is looked up by :func:`stable_device_name`, without
ALSA's card number.

``sounddevice`` is imported lazily (:func:`import_sounddevice`), so the rest
of the package works on a machine without PortAudio; a missing library
becomes a one-line DeviceError.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from streamer.errors import DeviceError

__all__ = [
    "PORTAUDIO_HINT",
    "DeviceInfo",
    "format_devices",
    "import_sounddevice",
    "inputs_summary",
    "list_devices",
    "resolve_device",
    "select_device",
    "stable_device_name",
]

PORTAUDIO_HINT = "PortAudio is not installed: apt-get install libportaudio2"


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """One capture-capable PortAudio device."""

    index: int
    name: str
    max_input_channels: int
    default_samplerate: float
    is_default: bool = False


def import_sounddevice() -> Any:
    """Import sounddevice, turning a missing or broken PortAudio into a DeviceError."""
    try:
        return importlib.import_module("sounddevice")
    except OSError as exc:  # sounddevice raises OSError('PortAudio library not found')
        raise DeviceError(f"{PORTAUDIO_HINT} ({exc})") from exc
    except ImportError as exc:
        raise DeviceError(
            f"the sounddevice package is not installed: pip install sounddevice ({exc})"
        ) from exc
    except Exception as exc:  # PortAudioError from Pa_Initialize at import
        raise DeviceError(f"PortAudio could not be initialised: {exc}") from exc


def _default_input_index(sd: Any) -> int | None:
    default = getattr(sd, "default", None)
    value = getattr(default, "device", None)
    if value is not None and not isinstance(value, int | str):
        try:
            value = value[0]
        except (IndexError, KeyError, TypeError):
            return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def list_devices(sd: Any = None) -> list[DeviceInfo]:
    """The input-capable devices PortAudio sees (possibly none), default marked.

    Raises DeviceError when PortAudio is missing or cannot list devices.
    """
    sd = import_sounddevice() if sd is None else sd
    try:
        raw = list(sd.query_devices())
    except Exception as exc:  # sounddevice.PortAudioError
        raise DeviceError(f"cannot list audio devices: {exc}") from exc
    default = _default_input_index(sd)
    out = []
    for pos, dev in enumerate(raw):
        channels = int(dev.get("max_input_channels", 0))
        if channels <= 0:
            continue
        index = int(dev.get("index", pos))
        out.append(
            DeviceInfo(
                index=index,
                name=str(dev.get("name", f"device {index}")),
                max_input_channels=channels,
                default_samplerate=float(dev.get("default_samplerate", 0.0)),
                is_default=index == default,
            )
        )
    return out


def format_devices(devices: Sequence[DeviceInfo] | None = None, *, sd: Any = None) -> str:
    """A table of input devices for ``streamer devices``; ``*`` marks the default."""
    devices = list_devices(sd) if devices is None else devices
    if not devices:
        return "no audio input devices found"
    width = max(4, *(len(d.name) for d in devices))
    lines = [f"  {'index':>5}  {'name':<{width}}  {'inputs':>6}  {'rate':>6}"]
    for d in devices:
        mark = "*" if d.is_default else " "
        rate = f"{d.default_samplerate:.0f}"
        inputs = d.max_input_channels
        lines.append(f"{mark} {d.index:>5}  {d.name:<{width}}  {inputs:>6}  {rate:>6}")
    return "\n".join(lines)


def inputs_summary(devices: Sequence[DeviceInfo]) -> str:
    """``1: 'USB Microphone', 2: 'Built-in Mic'`` (or ``none``): for one-line errors."""
    return ", ".join(f"{d.index}: {d.name!r}" for d in devices) or "none"


def resolve_device(device: str | int | None, sd: Any = None) -> DeviceInfo:
    """Pick a capture device by index, by case-insensitive name substring, or the default.

    A string of digits is an index. A name matching several devices must
    match one of them exactly (ignoring case). Raises DeviceError listing the
    input devices when nothing fits.
    """
    return select_device(device, list_devices(sd))


def select_device(device: str | int | None, devices: Sequence[DeviceInfo]) -> DeviceInfo:
    """``resolve_device`` on a list already queried (the capture holds PortAudio's lock)."""
    if not devices:
        raise DeviceError("no audio input device found (is a microphone or sound card attached?)")
    if device is None:
        return next((d for d in devices if d.is_default), devices[0])
    if isinstance(device, str) and device.strip().isdigit():
        device = int(device.strip())
    if isinstance(device, int):
        for d in devices:
            if d.index == device:
                return d
        raise DeviceError(
            f"no audio input device with index {device}; input devices: {inputs_summary(devices)}"
        )
    wanted = device.strip().casefold()
    matches = [d for d in devices if wanted in d.name.casefold()]
    exact = [d for d in matches if d.name.casefold() == wanted]
    if len(matches) == 1 or len(exact) == 1:
        return exact[0] if exact else matches[0]
    if not matches:
        raise DeviceError(
            f"no audio input device matches {device!r}; input devices: {inputs_summary(devices)}"
        )
    raise DeviceError(f"audio input device {device!r} is ambiguous: {inputs_summary(matches)}")


_HW_SUFFIX = re.compile(r"\s*\((?:plug)?hw:\d+,\d+\)\s*$")


def stable_device_name(name: str) -> str:
    """A device name without ALSA's ``(hw:N,M)``, whose card number changes on re-plug."""
    return _HW_SUFFIX.sub("", name) or name
