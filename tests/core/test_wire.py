"""The /v1/stream protocol checks, without sockets."""

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamer.core.wire import (
    IngestPolicy,
    PcmDecoder,
    RateGuard,
    StartMessage,
    parse_auth,
    parse_control,
    parse_start,
)
from streamer.errors import ProtocolError

OPEN = IngestPolicy(languages=frozenset({"auto", "fr", "en"}), tasks=frozenset({"translate"}))


def start(**fields):
    return json.dumps({"type": "start", "sample_rate": 16000, **fields})


def test_minimal_start_has_defaults():
    msg = parse_start(start(), IngestPolicy())
    assert msg == StartMessage(None, 16000, "pcm_s16le", 1)
    assert msg.ready(16000, "client-1") == {
        "type": "ready", "v": 1, "stream": "client-1", "sample_rate": 16000,
        "encoding": "pcm_s16le", "channels": 1, "model_sample_rate": 16000,
    }  # fmt: skip


def test_full_start_within_policy():
    msg = parse_start(
        start(
            stream="a.b-c_1",
            encoding="pcm_f32le",
            channels=2,
            language="fr",
            task="translate",
            token="t",
            partials=False,
        ),
        OPEN,
    )
    assert (msg.stream, msg.encoding, msg.channels) == ("a.b-c_1", "pcm_f32le", 2)
    assert (msg.language, msg.task, msg.token, msg.partials) == ("fr", "translate", "t", False)
    assert msg.ready(16000, "a")["language"] == "fr"


@pytest.mark.parametrize(
    ("text", "code", "words"),
    [
        ("{", 1007, "not valid JSON"),
        ('"start"', 1008, "JSON object"),
        (start(sample_rate=7999), 1008, "sample_rate 7999"),
        (start(sample_rate=192001), 1008, "192000"),
        (start(sample_rate=16000.0), 1008, "integer"),
        (start(sample_rate=True), 1008, "integer"),
        (json.dumps({"type": "start"}), 1008, "'sample_rate' is required"),
        (start(channels=9), 1008, "channels 9"),
        (start(encoding="pcm_s24le"), 1008, "pcm_s24le"),
        (start(stream=""), 1008, "'stream'"),
        (start(stream="x" * 65), 1008, "'stream'"),
        (start(language="de"), 1008, "'de' is not allowed"),
        (start(task="summarize"), 1008, "'summarize' is not allowed"),
        (start(language=3), 1008, "must be a string"),
        (start(partials="yes"), 1008, "true or false"),
        (start(token=5), 1008, "'token'"),
        (start(model_path="/x"), 1008, "unknown field 'model_path'"),
    ],
)
def test_bad_start(text, code, words):
    with pytest.raises(ProtocolError) as err:
        parse_start(text, OPEN)
    assert err.value.close_code == code
    assert words in str(err.value)


def test_options_refused_when_the_server_fixes_them():
    with pytest.raises(ProtocolError, match="does not let clients choose 'task'"):
        parse_start(start(task="translate"), IngestPolicy())


def test_control_and_auth_messages():
    assert parse_control('{"type": "stop"}') == "stop"
    assert parse_control('  {"type":"stop"}') == "stop"
    for text, code in [("stop", 1003), ('{"type": "go"}', 1008), ("{x", 1007), ("", 1003)]:
        with pytest.raises(ProtocolError) as err:
            parse_control(text)
        assert err.value.close_code == code
    assert parse_auth('{"type":"auth","token":"k"}') == "k"
    for text in ['{"type":"auth"}', '{"type":"auth","token":1}', '{"token":"k"}']:
        with pytest.raises(ProtocolError):
            parse_auth(text)


def test_pcm_s16_and_f32_decode_to_mono_float():
    pcm = np.array([0, 16384, -32768, 32767], dtype="<i2")
    out = PcmDecoder("pcm_s16le", 1).decode(pcm.tobytes())
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.0, 0.5, -1.0, 32767 / 32768])
    stereo = np.array([[0.5, -0.5], [1.0, 0.0], [2.0, 2.0]], dtype="<f4")
    out = PcmDecoder("pcm_f32le", 2).decode(stereo.tobytes())
    np.testing.assert_allclose(out, [0.0, 0.5, 1.0])  # clipped to [-1, 1], then averaged


@pytest.mark.parametrize(
    ("encoding", "channels", "data", "words"),
    [
        ("pcm_s16le", 1, b"\x00", "1 bytes"),
        ("pcm_s16le", 2, b"\x00" * 6, "4-byte"),
        ("pcm_f32le", 1, b"\x00" * 6, "4-byte"),
        ("pcm_f32le", 1, np.array([np.inf], "<f4").tobytes(), "NaN or infinite"),
    ],
)
def test_bad_pcm_is_1007(encoding, channels, data, words):
    with pytest.raises(ProtocolError, match=words) as err:
        PcmDecoder(encoding, channels).decode(data)
    assert err.value.close_code == 1007


@given(st.binary(max_size=512), st.sampled_from(["pcm_s16le", "pcm_f32le"]), st.integers(1, 8))
def test_pcm_decoder_never_fails_otherwise(data, encoding, channels):
    decoder = PcmDecoder(encoding, channels)
    try:
        out = decoder.decode(data)
    except ProtocolError as exc:
        assert exc.close_code == 1007
        return
    assert len(out) * decoder.frame_bytes == len(data)
    assert np.isfinite(out).all() and np.abs(out).max(initial=0) <= 1.0


def test_rate_guard_allows_burst_then_factor():
    guard = RateGuard(factor=2.0, burst_s=1.0, start=100.0)
    assert guard.admit(1.0, 100.0) == 0.0  # the burst
    assert guard.admit(1.0, 100.0) == pytest.approx(0.5)  # 1 s over at 2x: wait 0.5 s
    assert guard.admit(1.0, 101.0) == pytest.approx(0.0)  # 3 s allowed after 1 s
    assert guard.admit(0.1, 101.0) == pytest.approx(0.05)
    with pytest.raises(ValueError):
        RateGuard(0.0, 1.0, 0.0)
