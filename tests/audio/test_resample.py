"""Resampling and file decoding against real clips and synthetic tones."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from streamer.audio.resample import (
    AudioFileReader,
    StreamResampler,
    load_audio,
    resample,
    resampled_length,
    to_mono,
)
from streamer.errors import AudioError

DATA = Path(__file__).parents[1] / "data" / "audio"
CLIPS = {
    "jfk.flac": (44100, 2),
    "common_voice_fr_17301936.mp3": (48000, 1),
    "fleurs-en-004.ogg": (16000, 1),
    "LDC93S1_timit_sample.wav": (16000, 1),
}


def tone(freq: float, rate: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def spectrum(x: np.ndarray, rate: int) -> tuple[np.ndarray, np.ndarray]:
    """Magnitude spectrum (Hann window) with the filter's edges trimmed off."""
    core = x[len(x) // 10 : -len(x) // 10].astype(np.float64)
    mag = np.abs(np.fft.rfft(core * np.hanning(len(core))))
    return np.fft.rfftfreq(len(core), 1 / rate), mag


def level_db(freqs: np.ndarray, mag: np.ndarray, at: float, width: float = 30.0) -> float:
    """Peak level near ``at`` Hz relative to the whole spectrum's peak."""
    band = mag[np.abs(freqs - at) <= width]
    return float(20 * np.log10(band.max() / mag.max() + 1e-20))


# -- to_mono ------------------------------------------------------------------


def test_to_mono_averages_channels_to_float32():
    x = np.array([[1.0, 0.0], [0.5, -0.5], [-1.0, -1.0]], dtype=np.float64)
    out = to_mono(x)
    assert out.dtype == np.float32 and out.shape == (3,)
    np.testing.assert_array_equal(out, [0.5, 0.0, -1.0])
    np.testing.assert_array_equal(to_mono(np.array([[0.25], [0.5]])), [0.25, 0.5])
    np.testing.assert_array_equal(to_mono(np.array([0.1, 0.2])), np.float32([0.1, 0.2]))


def test_to_mono_scales_integer_pcm():
    pcm = np.array([[-32768, -32768], [16384, 16384], [0, 32767]], dtype=np.int16)
    np.testing.assert_allclose(to_mono(pcm), [-1.0, 0.5, 32767 / 65536], rtol=1e-6)
    np.testing.assert_allclose(to_mono(np.array([0, 128, 255], np.uint8)), [-1, 0, 127 / 128])


@pytest.mark.parametrize("shape", [(2, 2, 2), (4, 0)])
def test_to_mono_rejects_unusable_shapes(shape):
    with pytest.raises(AudioError):
        to_mono(np.zeros(shape, dtype=np.float32))


# -- resample -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("src", "dst"), [(44100, 16000), (48000, 16000), (22050, 16000), (8000, 16000), (16000, 16000)]
)
@pytest.mark.parametrize("n", [0, 1, 7, 441, 16001, 44101])
def test_resample_length_is_rounded_duration(src, dst, n):
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    out = resample(x, src, dst)
    assert out.dtype == np.float32
    assert len(out) == resampled_length(n, src, dst) == round(n * dst / src)


@pytest.mark.parametrize("quality", ["HQ", "VHQ"])
def test_resample_keeps_tone_frequency_and_rejects_aliases(quality):
    # 440 Hz survives; 12 kHz lies above the new Nyquist (8 kHz) and must be
    # filtered out, not folded down to 4 kHz as plain decimation would fold it.
    rate = 48000
    x = tone(440, rate, 2.0) + tone(12000, rate, 2.0)
    out = resample(x, rate, 16000, quality=quality)
    freqs, mag = spectrum(out, 16000)
    assert abs(freqs[np.argmax(mag)] - 440) <= 1.0
    assert level_db(freqs, mag, 4000) < -80
    naive = x[::3]  # the defect this guards against
    nf, nm = spectrum(naive, 16000)
    assert level_db(nf, nm, 4000) > -10


def test_resample_upsampling_has_no_images():
    x = tone(440, 8000, 2.0)
    out = resample(x, 8000, 16000)
    freqs, mag = spectrum(out, 16000)
    assert abs(freqs[np.argmax(mag)] - 440) <= 1.0
    assert level_db(freqs, mag, 8000 - 440) < -80  # image of a zero-stuffing upsampler
    linear = np.interp(np.arange(len(out)) / 2, np.arange(len(x)), x)
    lf, lm = spectrum(linear, 16000)
    assert level_db(lf, lm, 8000 - 440) > -60  # linear interpolation leaks an image


def test_resample_multichannel_and_identity():
    x = np.stack([tone(440, 22050, 0.5), tone(880, 22050, 0.5)], axis=1)
    out = resample(x, 22050, 16000)
    assert out.shape == (8000, 2)
    same = resample(x[:, 0], 16000, 16000)
    np.testing.assert_array_equal(same, x[:, 0])
    assert same is not x[:, 0]


@pytest.mark.parametrize("rates", [(0, 16000), (16000, -1), (16000.5, 16000), (True, 16000)])
def test_resample_rejects_bad_rates(rates):
    with pytest.raises(ValueError, match="rate"):
        resample(np.zeros(10, np.float32), *rates)


# -- StreamResampler ----------------------------------------------------------


@pytest.mark.parametrize(
    ("src", "dst"), [(44100, 16000), (48000, 16000), (8000, 16000), (22050, 16000), (16000, 16000)]
)
@pytest.mark.parametrize("seed", range(3))
def test_stream_resampler_random_chunks_match_one_shot(src, dst, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(src * 2 + int(rng.integers(0, 1000))).astype(np.float32) * 0.3
    rs = StreamResampler(src, dst)
    outs, i = [], 0
    while i < len(x):
        k = int(rng.integers(0, 3000))  # empty chunks included
        outs.append(rs.process(x[i : i + k]))
        i += k
    outs.append(rs.flush())
    streamed = np.concatenate(outs)
    whole = resample(x, src, dst)
    assert len(streamed) == len(whole)
    assert rs.samples_in == len(x) and rs.samples_out == len(whole)
    np.testing.assert_allclose(streamed, whole, atol=1e-6, rtol=0)


def test_stream_resampler_lifecycle():
    rs = StreamResampler(44100, 16000)
    first = rs.process(tone(440, 44100, 0.1))
    assert 0 < len(first) < 1600  # the filter holds back its delay
    tail = rs.flush()
    assert len(first) + len(tail) == 1600
    assert rs.finished and len(rs.flush()) == 0
    with pytest.raises(RuntimeError, match="reset"):
        rs.process(np.zeros(10, np.float32))
    rs.reset()
    assert not rs.finished and rs.samples_in == 0
    assert len(rs.process(tone(440, 44100, 0.1))) + len(rs.flush()) == 1600
    with pytest.raises(ValueError, match="mono"):
        StreamResampler(44100, 16000).process(np.zeros((10, 2), np.float32))


def test_stream_resampler_passthrough_copies():
    rs = StreamResampler(16000, 16000)
    x = tone(440, 16000, 0.1)
    out = rs.process(x)
    np.testing.assert_array_equal(out, x)
    assert not np.shares_memory(out, x)
    assert rs.passthrough and len(rs.flush()) == 0


# -- load_audio ---------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CLIPS))
@pytest.mark.parametrize("target", [16000, 22050])
def test_load_audio_real_clips(name, target):
    path = DATA / name
    rate, channels = CLIPS[name]
    raw, sr = sf.read(path, dtype="float32", always_2d=True)
    assert (sr, raw.shape[1]) == (rate, channels)
    out = load_audio(path, target)
    assert out.dtype == np.float32 and out.ndim == 1
    assert len(out) == round(len(raw) / sr * target)
    expected = resample(to_mono(raw), sr, target)
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)
    assert 0.001 < np.abs(out).max() <= 1.5


@pytest.mark.parametrize("rate", [8000, 22050])
def test_load_audio_tone_written_at_other_rates(tmp_path, rate):
    path = tmp_path / f"tone_{rate}.wav"
    sf.write(path, np.stack([tone(440, rate, 1.5)] * 2, axis=1), rate, subtype="PCM_16")
    out = load_audio(path, 16000)
    assert len(out) == round(1.5 * 16000)
    freqs, mag = spectrum(out, 16000)
    assert abs(freqs[np.argmax(mag)] - 440) <= 1.0
    assert np.abs(out).max() == pytest.approx(0.5, abs=0.01)


def test_load_audio_missing_file(tmp_path):
    path = tmp_path / "nope.wav"
    with pytest.raises(AudioError, match="no such file") as info:
        load_audio(path, 16000)
    assert str(path) in str(info.value)


def test_load_audio_directory(tmp_path):
    with pytest.raises(AudioError, match="is a directory"):
        load_audio(tmp_path, 16000)


def test_load_audio_corrupt_file(tmp_path):
    path = tmp_path / "garbage.wav"
    path.write_bytes(b"this is not audio at all" * 100)
    with pytest.raises(AudioError, match="Format not recognised") as info:
        load_audio(path, 16000)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("keep", "reason"),
    [(2000, "cannot read audio file"), (200000, "cannot decode audio file")],  # header / mid-stream
)
def test_load_audio_truncated_flac(tmp_path, keep, reason):
    path = tmp_path / "cut.flac"
    path.write_bytes((DATA / "jfk.flac").read_bytes()[:keep])
    with pytest.raises(AudioError, match=reason) as info:
        load_audio(path, 16000)
    assert str(path) in str(info.value)


# -- AudioFileReader ----------------------------------------------------------


def test_reader_reads_in_chunks_and_ends(tmp_path):
    path = tmp_path / "long.wav"
    sf.write(path, tone(440, 22050, 3.0), 22050)
    with AudioFileReader(path, 16000, chunk_frames=4096) as reader:
        sizes = []
        while (chunk := reader.read()) is not None:
            sizes.append(len(chunk))
        assert reader.read() is None
    assert len(sizes) >= 3 * 22050 // 4096
    assert max(sizes) < 2 * resampled_length(4096, 22050, 16000)  # soxr output is bursty
    assert sum(sizes) == 48000


class BlockingFile:
    """Stands in for SoundFile: read() waits until released, close() is recorded."""

    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()
        self.closed = threading.Event()

    def read(self, frames, dtype, always_2d):
        self.entered.set()
        assert self.release.wait(5)
        return np.zeros((frames, 1), dtype=np.float32)

    def close(self):
        self.closed.set()


def test_reader_close_during_read_never_blocks_and_closes_after(tmp_path):
    path = tmp_path / "a.wav"
    sf.write(path, tone(440, 16000, 0.5), 16000)
    reader = AudioFileReader(path, 16000, chunk_frames=100)
    real = reader._file
    fake = BlockingFile()
    reader._file = fake
    real.close()
    worker = threading.Thread(target=reader.read)
    worker.start()
    assert fake.entered.wait(5)
    reader.close()  # returns at once although a read holds the file
    assert not fake.closed.is_set()
    fake.release.set()
    worker.join(5)
    assert fake.closed.is_set() and reader._file is None
    assert reader.read() is None
