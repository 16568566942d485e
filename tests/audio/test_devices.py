"""Device listing and choice (streamer.audio.devices) on a fake and the real sounddevice."""

from __future__ import annotations

import importlib

import pytest

from streamer.audio.capture import MicrophoneSource
from streamer.audio.devices import (
    DeviceInfo,
    format_devices,
    list_devices,
    resolve_device,
    stable_device_name,
)
from streamer.errors import DeviceError

from .test_capture import DEVICES, FakeSD, drain


def test_stable_device_name_drops_alsa_card_numbers():
    assert (
        stable_device_name("USB PnP Sound Device: Audio (hw:2,0)") == "USB PnP Sound Device: Audio"
    )
    assert stable_device_name("Built-in Mic") == "Built-in Mic"
    assert stable_device_name("(hw:0,0)") == "(hw:0,0)"


def test_list_devices_with_fake_lists_inputs_and_marks_default():
    devices = list_devices(FakeSD())
    assert devices == [
        DeviceInfo(1, "USB Microphone", 2, 44100.0, True),
        DeviceInfo(2, "Built-in Mic", 1, 16000.0, False),
        DeviceInfo(3, "USB Microphone (monitor)", 2, 48000.0, False),
    ]
    text = format_devices(devices)
    lines = text.splitlines()
    assert len(lines) == 4 and "HDMI" not in text
    assert lines[1].startswith("*") and "USB Microphone" in lines[1] and "44100" in lines[1]
    assert format_devices(sd=FakeSD()) == text
    assert format_devices([]) == "no audio input devices found"


def test_resolve_device_by_index_name_and_default():
    sd = FakeSD()
    assert resolve_device(None, sd).index == 1
    assert resolve_device(2, sd).name == "Built-in Mic"
    assert resolve_device(" 3 ", sd).index == 3
    assert resolve_device("BUILT-IN", sd).index == 2
    assert resolve_device("usb microphone", sd).index == 1  # exact name beats substrings
    assert resolve_device("monitor", sd).index == 3
    assert resolve_device(None, FakeSD(default_input=-1)).index == 1  # first input device


@pytest.mark.parametrize(
    ("device", "message"),
    [
        (0, "no audio input device with index 0; input devices: 1: 'USB Microphone', "),
        (9, "no audio input device with index 9"),
        ("webcam", "no audio input device matches 'webcam'; input devices: 1: 'USB Microphone'"),
        ("usb", "audio input device 'usb' is ambiguous: 1: 'USB Microphone', 3: "),
    ],
)
def test_resolve_device_errors_list_the_inputs(device, message):
    with pytest.raises(DeviceError) as info:
        resolve_device(device, FakeSD())
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_no_input_device_is_a_device_error():
    sd = FakeSD(devices=DEVICES[:1], default_input=-1)
    assert list_devices(sd) == []
    with pytest.raises(DeviceError, match="no audio input device found"):
        resolve_device(None, sd)


def test_missing_portaudio_is_a_one_line_device_error(monkeypatch):
    def no_portaudio(name: str):
        assert name == "sounddevice"
        raise OSError("PortAudio library not found")

    monkeypatch.setattr(importlib, "import_module", no_portaudio)
    with pytest.raises(DeviceError) as info:
        list_devices()
    assert str(info.value) == (
        "PortAudio is not installed: apt-get install libportaudio2 (PortAudio library not found)"
    )
    assert info.value.exit_code == 78


async def test_real_sounddevice_lists_devices_or_explains_what_is_missing():
    try:
        importlib.import_module("sounddevice")
    except OSError:
        with pytest.raises(DeviceError, match=r"^PortAudio is not installed: apt-get install"):
            list_devices()
        return
    devices = list_devices()
    assert isinstance(devices, list)
    assert all(isinstance(d, DeviceInfo) and d.max_input_channels > 0 for d in devices)
    assert isinstance(format_devices(devices), str)
    if not devices:  # PortAudio present, no sound card (as on CI machines)
        with pytest.raises(DeviceError, match="no audio input device found"):
            await drain(MicrophoneSource("m", 16000).blocks())
