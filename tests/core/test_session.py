"""The sans-I/O session driven by plain lists and a scripted 'model'."""

import itertools

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from streamer.core.segmenter import SegmenterSettings
from streamer.core.session import DecodeRequest, DecodeResult, SessionSettings, StreamSession

SR = 1600  # a small rate keeps the arrays tiny; the core only counts samples
BLOCK = 160  # one "word" per 0.1 s of speech


def settings_(**kw):
    base = dict(
        sample_rate=SR,
        chunk=SR // 2,
        max_segment=6 * SR,
        max_window=10 * SR,
        agreement_n=2,
        tail_pad=SR // 10,
        segmenter=SegmenterSettings(
            frame_samples=80, threshold=0.5, min_speech=160, endpoint_silence=800, pre_roll=160
        ),
    )
    base.update(kw)
    return SessionSettings(**base)


def fake_model(req: DecodeRequest) -> DecodeResult:
    """Token = absolute index of each 0.1 s block of loud audio in the window."""
    first = -(-req.start // BLOCK)
    toks = []
    for b in range(first, req.end // BLOCK):
        chunk = req.audio[b * BLOCK - req.start : (b + 1) * BLOCK - req.start]
        if np.abs(chunk).mean() > 0.1:
            toks.append(b)
    new = toks[len(req.forced) :] if tuple(toks[: len(req.forced)]) == req.forced else toks
    new = new[: req.max_new_tokens]
    return DecodeResult(req.request_id, tuple(new), tuple(f" w{t}".encode() for t in new))


def speech(seconds):
    return np.full(round(seconds * SR), 0.5, dtype=np.float32)


def silence(seconds):
    return np.zeros(round(seconds * SR), dtype=np.float32)


def probs(audio, frame=80):
    n = len(audio) // frame
    return [float(np.abs(audio[i * frame : (i + 1) * frame]).mean() > 0.1) for i in range(n)]


class Framer:
    """Frames audio like the real VAD adapters do (remainders carried over)."""

    def __init__(self, frame=80):
        self.frame = frame
        self.rest = np.zeros(0, dtype=np.float32)

    def __call__(self, chunk):
        data = np.concatenate([self.rest, chunk])
        n = len(data) // self.frame
        self.rest = data[n * self.frame :]
        return probs(data[: n * self.frame], self.frame)


def drive(session, audio, block=160, engine=fake_model, end=True, framer=None, delay=0):
    """Feed ``audio`` block by block; each answer comes ``delay`` blocks late (0: at once)."""
    events, requests = [], []
    framer = framer or Framer()
    waiting = []  # (due pump, request)
    clock = itertools.count()

    def pump():
        now = next(clock)
        if delay:
            ready = [r for due, r in waiting if due <= now]
            waiting[:] = [(due, r) for due, r in waiting if due > now]
            for r in ready:
                session.receive_result(engine(r))
            new = session.requests_to_send()
            requests.extend(new)
            waiting.extend((now + int(delay), r) for r in new)
        else:
            while reqs := session.requests_to_send():
                requests.extend(reqs)
                for r in reqs:
                    session.receive_result(engine(r))
        events.extend(session.events_received())

    for i in range(0, len(audio), block):
        chunk = audio[i : i + block]
        session.receive_audio(chunk)
        session.receive_speech(framer(chunk))
        pump()
    if end:
        session.receive_end()
        pump()
        while waiting:
            pump()
    return events, requests


def test_silence_produces_no_requests_and_no_events():
    s = StreamSession("a", settings_())
    events, requests = drive(s, silence(5))
    assert events == [] and requests == []
    assert s.done
    assert len(s.buffer) < SR  # silence is not hoarded


def test_one_utterance_gives_partials_then_one_final():
    s = StreamSession("a", settings_())
    events, _ = drive(s, np.concatenate([silence(1), speech(2), silence(1)]))
    kinds = [e.kind for e in events]
    assert kinds[-1] == "final" and kinds.count("final") == 1
    assert "partial" in kinds
    final = events[-1]
    assert final.text == " ".join(f"w{b}" for b in range(10, 30))
    assert abs(final.start - 0.9) < 1e-9  # pre-roll of 0.1 s
    assert abs(final.end - 3.0) < 0.06
    seqs = [e.seq for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    # every partial's committed text is a prefix of the final
    for e in events[:-1]:
        assert final.text.startswith(e.committed)
        assert e.text == e.committed + e.tentative
    assert s.done


def test_final_is_forced_with_committed_tokens():
    s = StreamSession("a", settings_())
    _, requests = drive(s, np.concatenate([speech(3), silence(1)]))
    finals = [r for r in requests if r.kind == "final"]
    assert len(finals) == 1 and len(finals[0].forced) > 0


def test_two_utterances_two_segments_and_prompt_carries_history():
    s = StreamSession("a", settings_())
    audio = np.concatenate([speech(1), silence(1), speech(1), silence(1)])
    events, requests = drive(s, audio)
    finals = [e for e in events if e.kind == "final"]
    assert [f.segment for f in finals] == [0, 1]
    second = [r for r in requests if r.segment == 1]
    assert second[0].prompt[-1] == 9  # history ends with the last token of segment 0
    assert finals[1].start >= finals[0].end


def test_max_segment_cuts_long_speech():
    s = StreamSession("a", settings_(max_segment=2 * SR))
    events, requests = drive(s, np.concatenate([speech(5), silence(1)]))
    finals = [e for e in events if e.kind == "final"]
    assert len(finals) == 3
    assert all(r.end - r.start <= 2 * SR + 160 for r in requests)
    words = " ".join(f.text for f in finals).split()
    assert words == [f"w{b}" for b in range(50)]


def test_end_of_stream_finalises_open_segment():
    s = StreamSession("a", settings_())
    events, _ = drive(s, speech(1.5))
    assert events[-1].kind == "final"
    assert events[-1].text.split() == [f"w{b}" for b in range(15)]


def test_request_final_closes_segment_now():
    s = StreamSession("a", settings_())
    _, _ = drive(s, speech(1.0), end=False)
    s.request_final()
    req = s.requests_to_send()
    assert len(req) == 1 and req[0].kind == "final"
    s.receive_result(fake_model(req[0]))
    evs = s.events_received()
    assert evs[-1].kind == "final"


def test_one_partial_in_flight_and_a_final_supersedes_it():
    s = StreamSession("a", settings_())
    s.receive_audio(speech(1))
    s.receive_speech(probs(speech(1)))
    first = s.requests_to_send()
    assert [r.kind for r in first] == ["partial"]
    # more speech while the engine is busy: no second partial
    s.receive_audio(speech(0.6))
    s.receive_speech(probs(speech(0.6)))
    assert s.requests_to_send() == []
    # the endpoint arrives while the partial is in flight: the final goes at once
    s.receive_audio(silence(1))
    s.receive_speech(probs(silence(1)))
    (final,) = s.requests_to_send()
    assert final.kind == "final" and final.supersedes == first[0].request_id
    s.receive_result(fake_model(final))
    events = s.events_received()
    assert [e.kind for e in events] == ["final"]
    assert not s.done or not s.busy
    # the stale partial's late answer changes nothing
    s.receive_result(DecodeResult(first[0].request_id, (), (), error="cancelled"))
    assert s.events_received() == [] and s.failed_windows == 0
    s.receive_end()
    assert s.done


def test_engine_error_on_final_still_emits_committed_text():
    s = StreamSession("a", settings_())
    _, _ = drive(s, speech(2), end=False)
    s.receive_end()
    req = s.requests_to_send()[0]
    s.receive_result(DecodeResult(req.request_id, (), (), error="out of memory"))
    evs = s.events_received()
    assert evs and evs[-1].kind == "final" and s.failed_windows == 1
    assert s.done


def test_utf8_split_across_tokens_never_leaks_broken_characters():
    e_acute = "é".encode()

    def model(req):
        pieces = (b" caf", e_acute[:1], e_acute[1:])
        n = len(req.forced)
        return DecodeResult(req.request_id, tuple(range(n, 3)), pieces[n:])

    s = StreamSession("a", settings_(agreement_n=1))
    events, _ = drive(s, np.concatenate([speech(2), silence(1)]), engine=model)
    for e in events:
        assert "\ufffd" not in e.text and "\ufffd" not in e.committed
    assert events[-1].text == "café"


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.floats(0.05, 3.0)), min_size=1, max_size=8),
    st.integers(1, 3),
    st.integers(40, 700),
    st.booleans(),
    st.sampled_from([0, 1, 40]),  # answers at once, a block late, or far behind the audio
)
@example([(True, 0.5), (False, 0.7)] * 6, 2, 160, True, 40)  # behind: segments get merged
def test_properties_any_speech_pattern(pattern, n, block, aligned, delay):
    s = StreamSession("a", settings_(agreement_n=n))
    audio = np.concatenate([speech(d) if loud else silence(d) for loud, d in pattern])
    framer = Framer() if aligned else (lambda chunk: probs(chunk))  # misaligned VAD frames too
    events, requests = drive(s, audio, block=block, framer=framer, delay=delay)
    assert s.done
    # windows lie inside the stream and are bounded
    for r in requests:
        assert 0 <= r.start < r.end <= len(audio)
        assert r.end - r.start <= s.s.max_window
        assert len(r.audio) == r.end - r.start
    # committed text is append-only within a segment, finals come once per segment
    last_committed: dict[int, str] = {}
    finals = {}
    for e in events:
        if e.kind == "partial":
            assert e.segment not in finals
            prev = last_committed.get(e.segment, "")
            assert e.committed.startswith(prev)
            last_committed[e.segment] = e.committed
        else:
            assert e.segment not in finals
            finals[e.segment] = e.text
            assert e.text.startswith(last_committed.get(e.segment, ""))
    # one final request per segment (a second one only without the prompt, after a final
    # cut short), numbered without gaps (also after catching up)
    finals_asked = [r for r in requests if r.kind == "final"]
    for a, b in itertools.pairwise(finals_asked):
        assert a.segment < b.segment or (a.segment == b.segment and a.prompt and not b.prompt)
    final_segments = list(dict.fromkeys(r.segment for r in finals_asked))
    assert final_segments == list(range(len(final_segments)))
    assert s.next_segment == len(final_segments)
    # every loud block that belongs to a segment ends up in exactly one final
    final_words = " ".join(finals[k] for k in sorted(finals)).split()
    assert len(final_words) == len(set(final_words))
    assert final_words == sorted(final_words, key=lambda w: int(w[1:]))


def test_word_boundaries():
    from streamer.core.text import word_boundaries

    assert word_boundaries([]) == [True]
    assert word_boundaries([b" Hel", b"lo", b" world", b"."]) == [True, False, True, False, False]
    assert word_boundaries([b" a", b",", b"b"]) == [True, False, True, False]
    assert word_boundaries([" 日".encode(), "本".encode()]) == [True, True, False]


def test_half_words_are_never_committed():
    def model(req):
        pieces = (b" nation", b"al", b" assem", b"bly", b" today")
        n = len(req.forced)
        return DecodeResult(req.request_id, tuple(range(n, 5)), pieces[n:])

    s = StreamSession("a", settings_(agreement_n=1))
    events, _ = drive(s, np.concatenate([speech(3), silence(1)]), engine=model)
    committed = {e.committed for e in events if e.kind == "partial"}
    assert committed <= {"", "national", "national assembly"}
    assert events[-1].text == "national assembly today"


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.floats(0.05, 4.0)), min_size=1, max_size=8),
    st.integers(40, 700),
    st.sampled_from([2, 3, 6]),
    st.sampled_from([0, 1, 40]),
)
def test_final_windows_cover_all_speech_without_gaps(pattern, block, max_segment_s, delay):
    s = StreamSession("a", settings_(max_segment=max_segment_s * SR))
    pieces = [speech(d) if loud else silence(d) for loud, d in pattern]
    audio = np.concatenate(pieces)
    _, requests = drive(s, audio, block=block, delay=delay)
    windows = sorted({(r.start, r.end) for r in requests if r.kind == "final"})  # retries: same
    covered = np.zeros(len(audio), dtype=bool)
    for a, b in windows:
        covered[a:b] = True
    pos = 0
    for piece, (loud, _) in zip(pieces, pattern, strict=True):
        # speech long enough to be confirmed (min_speech + a frame of slack) is all decoded
        if loud and len(piece) >= 160 + 80:
            assert covered[pos : pos + len(piece)].all(), (pos, len(piece), windows)
        pos += len(piece)
    # consecutive final windows never overlap beyond the configured left context
    for (_, b0), (a1, _) in itertools.pairwise(windows):
        assert a1 >= b0 - s.s.left_context


def test_a_looping_hypothesis_commits_nothing_and_resets_agreement():
    calls = []

    def model(req):
        calls.append(req)
        n = len(req.forced)
        toks = tuple(range(n, 4))
        return DecodeResult(
            req.request_id, toks, tuple(b" w" for _ in toks), looped=len(calls) == 2
        )

    s = StreamSession("a", settings_(agreement_n=2, chunk=SR // 2))
    events, _ = drive(s, speech(2.2), end=False, engine=model)
    partials = [e for e in events if e.kind == "partial"]
    # 1st hypothesis waits for agreement, the 2nd looped (no vote), so the 3rd
    # is the first that can agree with the 4th: nothing is committed before it
    assert [bool(p.committed) for p in partials[:3]] == [False, False, False]
    assert partials[3].committed


def stalled(session, audio, block=160):
    """Feed ``audio`` while the engine answers nothing; returns the requests sent."""
    framer, sent = Framer(), []
    for i in range(0, len(audio), block):
        chunk = audio[i : i + block]
        session.receive_audio(chunk)
        session.receive_speech(framer(chunk))
        sent += session.requests_to_send()
    return sent


def answer_all(session, sent):
    """Let the engine catch up: answer every request, oldest first, until none is left."""
    events, finals = [], []
    while sent:
        req = sent.pop(0)
        if req.kind == "final":
            finals.append(req)
        session.receive_result(fake_model(req))
        sent += session.requests_to_send()
        events += session.events_received()
    return events, finals


def five_utterances():
    return np.concatenate([np.concatenate([speech(1), silence(1)]) for _ in range(5)])


def test_a_stream_behind_decodes_waiting_segments_together():
    s = StreamSession("a", settings_())  # max_segment 6 s
    sent = stalled(s, five_utterances())
    # one final went out when segment 0 closed; the others wait behind it
    assert [r.kind for r in sent] == ["partial", "final"] and sent[1].segment == 0
    assert len(s._closing) == 5 and s.behind is False
    assert s.backlog == s.frontier - sent[1].start
    s.receive_end()
    events, finals = answer_all(s, sent)
    assert s.done
    # segments 1-3 (starts 2 s .. ends 7.1 s) fit in 6 s: one final; segment 4 alone
    assert [(f.segment, round(f.start / SR), round(f.end / SR)) for f in finals] == [
        (0, 0, 1), (1, 2, 7), (2, 8, 9)
    ]  # fmt: skip
    out = [e for e in events if e.kind == "final"]
    assert [e.segment for e in out] == [0, 1, 2]  # numbering stays gapless
    assert s.merged_segments == 2 and s.next_segment == 3
    words = " ".join(e.text for e in out).split()
    assert words == [f"w{b}" for k in range(5) for b in range(20 * k, 20 * k + 10)]
    assert out[1].start == pytest.approx(2.0, abs=0.15) and out[1].end == pytest.approx(
        7.0, abs=0.1
    )


def test_without_catch_up_every_segment_gets_its_own_final():
    s = StreamSession("a", settings_(catch_up=False))
    sent = stalled(s, five_utterances())
    s.receive_end()
    events, finals = answer_all(s, sent)
    assert [f.segment for f in finals] == [0, 1, 2, 3, 4]
    assert [e.segment for e in events if e.kind == "final"] == [0, 1, 2, 3, 4]
    assert s.merged_segments == 0


def test_backlog_past_the_bound_asks_the_adapter_to_hold_back():
    s = StreamSession("a", settings_(max_backlog=3 * SR))
    sent = stalled(s, five_utterances()[: 4 * SR])
    assert s.backlog > 3 * SR and s.behind
    answer_all(s, sent)
    assert s.backlog < SR and not s.behind  # only the open segment is left


def test_a_merged_final_keeps_the_language_of_each_segment():
    s = StreamSession("a", settings_())
    sent = stalled(s, five_utterances()[: 6 * SR])
    assert len(s._closing) == 3
    s._closing[2].lang = "de"  # the stream's language changed before segment 2
    s.receive_end()
    _, finals = answer_all(s, sent)
    assert [f.segment for f in finals] == [0, 1, 2]  # segment 2 not folded into 1's final
    assert [f.lang for f in finals] == [None, None, "de"]


def test_an_empty_final_after_partials_retracts_them():
    def model(req):
        if req.kind == "final" or req.segment == 1:
            return DecodeResult(req.request_id, (), ())  # it came to nothing
        tok = 100 + req.request_id  # never the same twice: nothing is committed
        return DecodeResult(req.request_id, (tok,), (f" uh{tok}".encode(),))

    s = StreamSession("a", settings_())
    audio = np.concatenate([speech(2), silence(1), speech(1), silence(1)])
    events, requests = drive(s, audio, engine=model)
    assert [e.kind for e in events if e.segment == 0][-1] == "final"
    partials = [e for e in events if e.kind == "partial"]
    finals = [e for e in events if e.kind == "final"]
    assert partials and {p.segment for p in partials} == {0}
    # the shown segment gets an empty final; the never-shown one gets nothing
    assert [(f.segment, f.text) for f in finals] == [(0, "")]
    assert [r.segment for r in requests if r.kind == "final"] == [0, 1]


def test_no_partial_for_a_pause_without_new_speech():
    """chunk (0.2 s) shorter than the endpointing silence (0.5 s): a 0.4 s pause gets no
    partial of its own; the next comes with the speech after it; the final is the same."""
    audio = np.concatenate([speech(1), silence(0.4), speech(1), silence(1)])
    runs = {}
    for skip in (True, False):
        s = StreamSession("a", settings_(chunk=SR // 5, skip_silent_partials=skip))
        events, requests = drive(s, audio, block=80)
        runs[skip] = ([e.text for e in events if e.kind == "final"], requests)
    loud = np.asarray(probs(audio)) > 0.5

    def silent_partials(requests):
        partials = [r for r in requests if r.kind == "partial"]
        return [
            b for a, b in itertools.pairwise(partials) if not loud[a.end // 80 : b.end // 80].any()
        ]

    (finals_on, reqs_on), (finals_off, reqs_off) = runs[True], runs[False]
    assert silent_partials(reqs_off) and not silent_partials(reqs_on)
    assert len(reqs_on) < len(reqs_off)
    words = [f"w{b}" for b in range(24) if not 10 <= b < 14]
    assert finals_on == finals_off == [" ".join(words)]


def test_a_stream_ending_on_a_max_segment_cut_asks_no_empty_window():
    """Without VAD a segment is cut at max_segment; ending exactly there leaves an open
    segment with no audio, which must not become a decode (encoders reject empty input)."""
    s = StreamSession("a", settings_(vad=False, max_segment=2 * SR))
    events, requests = drive(s, speech(4), block=160)
    finals = [r for r in requests if r.kind == "final"]
    assert [(r.start, r.end) for r in finals] == [(0, 2 * SR), (2 * SR, 4 * SR)]
    assert all(len(r.audio) for r in requests)
    assert [e.segment for e in events if e.kind == "final"] == [0, 1]
    assert s.done and s.next_segment == 2
