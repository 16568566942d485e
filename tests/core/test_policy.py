"""AlignAtt, partial hold-back and word timestamps in the sans-I/O core."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from streamer.core.session import DecodeRequest, DecodeResult, StreamSession, held_back
from streamer.core.stabilizer import AlignAtt
from streamer.core.text import word_boundaries
from streamer.core.words import words_of
from streamer.types import Hypothesis, Word

from .test_session import BLOCK, SR, drive, fake_model, settings_, silence, speech


def aligned_model(req: DecodeRequest) -> DecodeResult:
    """``fake_model`` plus the alignment a real engine returns (one frame per block).

    Each token attends to its own block; with ``alignatt_frames`` the decode
    stops at (and returns) the first token in the last frames, as the engine does.
    """
    plain = fake_model(req)
    first = -(-req.start // BLOCK)
    frames = -(-len(req.audio) // BLOCK)
    peaks = [t - first for t in plain.tokens]
    tokens, pieces = list(plain.tokens), list(plain.pieces)
    if req.alignatt_frames:
        late = [i for i, p in enumerate(peaks) if p >= frames - req.alignatt_frames]
        if late:
            tokens, pieces, peaks = (
                tokens[: late[0] + 1],
                pieces[: late[0] + 1],
                peaks[: late[0] + 1],
            )
    spans = tuple((t - first, t - first + 1) for t in (*req.forced, *tokens)) if req.words else ()
    return dataclasses.replace(
        plain,
        tokens=tuple(tokens),
        pieces=tuple(pieces),
        peaks=tuple(peaks),
        spans=spans,
        frame_samples=BLOCK,
        audio_frames=frames,
    )


def test_alignatt_commits_before_the_late_token_at_a_word_boundary() -> None:
    policy = AlignAtt(frames=3)
    pieces = [b" the", b" cat", b"s", b" sat"]
    # "s" (index 2) is the first token attending to the last 3 of 10 frames
    newly = policy.update([1, 2, 3, 4], word_boundaries(pieces), [1, 4, 7, 9], 10)
    assert newly == (1,)  # " cat" + "s" is one word, cut off: only " the" commits
    assert policy.tentative == (2,)  # the cut word stays tentative; " sat" is not shown
    newly = policy.update([2, 3], word_boundaries([b" cat", b"s"]), [2, 3], 10)
    assert newly == ()  # the last word may still grow: nothing after the last boundary
    assert policy.committed == (1,)
    assert policy.update([2, 3, 4], word_boundaries([b" cat", b"s", b" sat"]), [2, 3, 8], 10) == (
        2,
        3,
    )
    assert policy.committed == (1, 2, 3)


def test_alignatt_without_one_peak_per_token_commits_nothing() -> None:
    policy = AlignAtt(frames=2)
    assert policy.update([5, 6], [True, True, False], [], 10) == ()
    assert policy.tentative == (5, 6) and policy.committed == ()
    with pytest.raises(ValueError):
        AlignAtt(frames=0)


def test_alignatt_session_commits_on_the_first_partial() -> None:
    audio = np.concatenate([silence(0.5), speech(3), silence(1)])
    la = StreamSession("a", settings_(word_timestamps=False))
    la_events, _ = drive(la, audio, engine=aligned_model)
    aa = StreamSession("a", settings_(policy="alignatt", alignatt_frames=2))
    aa_events, aa_requests = drive(aa, audio, engine=aligned_model)
    la_first = next(e for e in la_events if e.committed)
    aa_first = next(e for e in aa_events if e.committed)
    assert aa_first.seq == 1 and la_first.seq > 1  # no waiting for agreement
    partials = [e for e in aa_events if e.kind == "partial"]
    for before, after in itertools.pairwise(partials):
        assert after.committed.startswith(before.committed)  # append-only
    final = aa_events[-1]
    assert final.kind == "final" and final.text == la_events[-1].text
    assert all(final.text.startswith(e.committed) for e in partials)
    # partial decodes carry the policy; the final decodes the whole window
    assert {r.alignatt_frames for r in aa_requests if r.kind == "partial"} == {2}
    assert {r.alignatt_frames for r in aa_requests if r.kind == "final"} == {0}
    # under AlignAtt nothing after the stop is shown: the tentative tail is short
    assert max(len(e.tentative.split()) for e in partials) <= 1


def test_words_of_finals_and_committed_partials() -> None:
    audio = np.concatenate([silence(0.5), speech(2), silence(1)])
    s = StreamSession("a", settings_(policy="alignatt", alignatt_frames=2))
    events, _ = drive(s, audio, engine=aligned_model)
    final = events[-1]
    assert [w.word.strip() for w in final.words] == final.text.split()
    for w in final.words:  # token " wN" is block N: N/10 s .. (N+1)/10 s
        n = int(w.word.strip()[1:])
        assert w.start == pytest.approx(n * BLOCK / SR) and w.end == pytest.approx(
            (n + 1) * BLOCK / SR
        )
    partials = [e for e in events if e.kind == "partial" and e.committed]
    assert partials
    for e in partials:
        assert " ".join(w.word.strip() for w in e.words) == e.committed
    off = StreamSession("a", settings_(policy="alignatt", alignatt_frames=2, word_timestamps=False))
    assert all(not e.words for e in drive(off, audio, engine=aligned_model)[0])


def test_holdback_hides_the_last_tentative_words() -> None:
    pieces = [b" a", b" b", b"c", b" d"]
    assert held_back(pieces, 0) == pieces
    assert held_back(pieces, 1) == [b" a", b" b", b"c"]
    assert held_back(pieces, 2) == [b" a"]
    assert held_back(pieces, 5) == []
    audio = np.concatenate([silence(0.5), speech(3), silence(1)])
    plain, _ = drive(StreamSession("a", settings_()), audio)
    held, _ = drive(StreamSession("a", settings_(partial_holdback_words=2)), audio)
    assert [e.committed for e in plain] == [e.committed for e in held]
    for p, h in zip(plain, held, strict=True):
        if p.kind == "partial":
            words = p.tentative.split()
            assert h.tentative.split() == words[: max(0, len(words) - 2)]
    assert plain[-1].text == held[-1].text


def test_words_survive_the_wire() -> None:
    event = Hypothesis(
        kind="final", stream="s", segment=0, seq=1, text="Guten Morgen", start=12.48, end=13.5,
        words=(Word(" Guten", 12.48, 12.8), Word(" Morgen", 12.8, 13.4999)),
    )  # fmt: skip
    wire = event.to_wire()
    assert wire["words"] == [
        {"word": " Guten", "start": 12.48, "end": 12.8},
        {"word": " Morgen", "start": 12.8, "end": 13.5},
    ]
    assert Hypothesis.from_wire(wire).words == (
        Word(" Guten", 12.48, 12.8),
        Word(" Morgen", 12.8, 13.5),
    )
    assert "words" not in dataclasses.replace(event, words=()).to_wire()


def test_words_group_pieces_and_skip_broken_characters() -> None:
    words = words_of(
        [b" Stra", "\u00df".encode()[:1], "\u00df".encode()[1:] + b"e", b",", b" \xe6"],
        [(0, 2), (2, 3), (3, 4), (4, 5), (5, 6)],
        offset=1600, frame_samples=320, sample_rate=16000, limit=1600 + 5 * 320,
    )  # fmt: skip
    assert words == (
        Word(" Stra\u00dfe,", 0.1, 0.1 + 5 * 0.02),
    )  # the broken last word is left out


def test_first_partial_comes_after_first_chunk_then_every_chunk() -> None:
    audio = np.concatenate([silence(0.5), speech(3), silence(1)])
    s = StreamSession("a", settings_(first_chunk=SR // 5))
    _, requests = drive(s, audio, block=80)
    partials = [r for r in requests if r.kind == "partial"]
    seg_start = partials[0].start  # no left context: the window starts at the segment
    hops = [partials[0].end - seg_start] + [b.end - a.end for a, b in itertools.pairwise(partials)]
    assert SR // 5 <= hops[0] < SR // 2  # the first one early
    assert all(h >= SR // 2 for h in hops[1:])  # then every chunk
    _, requests = drive(StreamSession("a", settings_()), audio, block=80)
    plain = next(r for r in requests if r.kind == "partial")
    assert plain.end - plain.start >= SR // 2  # first_chunk 0: the first hop is a chunk


def test_alignatt_agreement_waits_for_a_second_hypothesis() -> None:
    policy = AlignAtt(frames=2, n=2)
    bounds = word_boundaries([b" a", b" b", b" c"])
    assert policy.update([1, 2, 3], bounds, [1, 3, 9], 10) == ()  # one vote: nothing yet
    assert policy.tentative == (1, 2)
    # the next hypothesis agrees on " a" only, before its own stop
    assert policy.update([1, 5, 3], bounds, [1, 4, 9], 10) == (1,)
    assert policy.committed == (1,)
    audio = np.concatenate([silence(0.5), speech(3), silence(1)])
    one, _ = drive(
        StreamSession("a", settings_(policy="alignatt", alignatt_frames=2)),
        audio,
        engine=aligned_model,
    )
    two, _ = drive(
        StreamSession("a", settings_(policy="alignatt", alignatt_frames=2, alignatt_agreement=2)),
        audio,
        engine=aligned_model,
    )
    first = lambda events: next(e.seq for e in events if e.committed)  # noqa: E731
    assert first(one) < first(two)
    assert one[-1].text == two[-1].text


def test_a_final_cut_short_after_the_prompt_is_decoded_again_without_it() -> None:
    """Whisper conditioned on earlier text can stop a long segment after one word."""

    def early_eos(req: DecodeRequest) -> DecodeResult:
        plain = fake_model(req)
        if req.kind == "final" and req.prompt:
            return dataclasses.replace(plain, tokens=plain.tokens[:1], pieces=plain.pieces[:1])
        return plain

    audio = np.concatenate([speech(1.5), silence(1), speech(3), silence(1)])
    s = StreamSession("a", settings_(partials=False))
    events, requests = drive(s, audio, engine=early_eos)
    finals = [r for r in requests if r.kind == "final"]
    # segment 0 has no prompt yet; segment 1's prompted final stopped after one token
    assert [(r.segment, bool(r.prompt)) for r in finals] == [(0, False), (1, True), (1, False)]
    assert [len(e.text.split()) for e in events] == [15, 30]  # the retry's full text
    off = StreamSession("a", settings_(partials=False, short_final_rate=0.0))
    events, _ = drive(off, audio, engine=early_eos)
    assert [len(e.text.split()) for e in events] == [15, 1]


def test_an_empty_final_is_not_retried() -> None:
    """No tokens at all means no speech: decoding again without the prompt invites a
    hallucination."""

    def silent_final(req: DecodeRequest) -> DecodeResult:
        plain = fake_model(req)
        if req.kind == "final" and req.prompt:
            return dataclasses.replace(plain, tokens=(), pieces=())
        return plain

    audio = np.concatenate([speech(1.5), silence(1), speech(3), silence(1)])
    _, requests = drive(StreamSession("a", settings_(partials=False)), audio, engine=silent_final)
    assert [r.segment for r in requests if r.kind == "final"] == [0, 1]
