from streamer.core.segmenter import Segmenter, SegmenterSettings, SpeechEnded, SpeechStarted

S = SegmenterSettings(
    frame_samples=100, threshold=0.5, min_speech=300, endpoint_silence=500, pre_roll=200
)


def test_silence_never_starts_a_segment():
    seg = Segmenter(S)
    assert seg.feed([0.0] * 100) == []
    assert not seg.in_segment


def test_short_blip_is_ignored():
    seg = Segmenter(S)
    assert seg.feed([0.0] * 5 + [0.9, 0.9] + [0.0] * 10) == []


def test_speech_then_silence_gives_start_and_end():
    seg = Segmenter(S)
    events = seg.feed([0.0] * 10 + [0.9] * 20 + [0.0] * 10)
    assert events == [SpeechStarted(800), SpeechEnded(3000, 3500)]


def test_hysteresis_keeps_weak_frames_in_speech():
    seg = Segmenter(S)
    events = seg.feed([0.9] * 5 + [0.4] * 20)
    assert events == [SpeechStarted(0)]  # 0.4 >= exit threshold 0.35: still speech


def test_floor_prevents_overlap():
    seg = Segmenter(S, floor=1000)
    events = seg.feed([0.0] * 10 + [0.9] * 5)
    assert events[0] == SpeechStarted(1000)
