"""FinalHistory: the recent finals per stream, bounded, in order, retraction-aware."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamer.sinks.history import REPLAY_FIELD, FinalHistory
from streamer.types import Hypothesis


def ev(kind: str, stream: str = "a", segment: int = 0, seq: int = 0, text: str = "x") -> Hypothesis:
    return Hypothesis(
        kind=kind,  # type: ignore[arg-type]
        stream=stream,
        segment=segment,
        seq=seq,
        text=text,
        start=float(segment),
        end=float(segment) + 1.0,
        extra={"words": [{"word": text, "start": 0.0, "end": 1.0}]},
    )


def seqs(events: list[Hypothesis]) -> list[tuple[str, int]]:
    return [(e.stream, e.seq) for e in events]


def test_keeps_the_last_finals_per_stream_and_marks_them_replayed() -> None:
    history = FinalHistory(per_stream=3, max_streams=8)
    finals = [ev("final", segment=i, seq=2 * i + 1, text=f"line {i}") for i in range(5)]
    for final in finals:
        history.record(final)
    got = history.snapshot(None, 10)
    assert seqs(got) == [("a", 5), ("a", 7), ("a", 9)]  # only the last 3 are kept
    assert len(history) == 3 and history.streams == 1
    for kept, original in zip(got, finals[2:], strict=True):
        assert kept.extra[REPLAY_FIELD] is True
        assert kept.extra["words"] == original.extra["words"]
        assert kept.text == original.text and kept.seq == original.seq
        assert REPLAY_FIELD not in original.extra  # live events stay unmarked
        assert kept.to_wire()[REPLAY_FIELD] is True
    assert seqs(history.snapshot(None, 2)) == [("a", 7), ("a", 9)]  # the newest 2
    assert history.snapshot(None, 0) == []


def test_snapshot_is_in_publish_order_across_streams_and_filtered() -> None:
    history = FinalHistory(per_stream=2, max_streams=8)
    order = [("a", 1), ("b", 1), ("a", 2), ("c", 7), ("b", 2), ("a", 3), ("b", 3)]
    for stream, seq in order:
        history.record(ev("final", stream, seq=seq))
    assert seqs(history.snapshot(None, 2)) == [("a", 2), ("c", 7), ("b", 2), ("a", 3), ("b", 3)]
    assert seqs(history.snapshot(None, 1)) == [("c", 7), ("a", 3), ("b", 3)]
    assert seqs(history.snapshot({"a", "c", "zzz"}, 5)) == [("a", 2), ("c", 7), ("a", 3)]
    assert history.snapshot(frozenset(), 5) == []


def test_streams_are_bounded_least_recently_finalised_forgotten_first() -> None:
    history = FinalHistory(per_stream=2, max_streams=2)
    history.record(ev("final", "a", seq=1))
    history.record(ev("final", "b", seq=1))
    history.record(ev("final", "a", seq=2))  # a is now the most recent
    history.record(ev("final", "c", seq=1))  # forgets b, not a
    assert history.streams == 2
    assert seqs(history.snapshot(None, 5)) == [("a", 1), ("a", 2), ("c", 1)]
    for i in range(100):  # many short-lived streams: still two kept
        history.record(ev("final", f"s{i}", seq=1))
    assert history.streams == 2 and len(history) == 2
    assert seqs(history.snapshot(None, 5)) == [("s98", 1), ("s99", 1)]


def test_empty_finals_partials_and_status_events_are_not_kept() -> None:
    history = FinalHistory(per_stream=5, max_streams=4)
    history.record(ev("final", segment=0, seq=2, text="Kept."))
    history.record(ev("partial", segment=1, seq=3, text="not speech"))
    # An empty final retracts the partials of its own segment: nothing to
    # show a late subscriber, and it does not take back the earlier final.
    history.record(ev("final", segment=1, seq=4, text=""))
    history.record(ev("final", segment=2, seq=5, text="   "))
    history.record(ev("source_lost", segment=3, seq=6, text="device unplugged"))
    assert [e.text for e in history.snapshot(None, 5)] == ["Kept."]


def test_bounds_are_validated_and_zero_keeps_nothing() -> None:
    with pytest.raises(ValueError):
        FinalHistory(per_stream=-1)
    with pytest.raises(ValueError):
        FinalHistory(max_streams=-1)
    for history in (FinalHistory(per_stream=0), FinalHistory(max_streams=0)):
        history.record(ev("final"))
        assert history.snapshot(None, 5) == [] and len(history) == 0


op = st.tuples(
    st.sampled_from(["partial", "final", "final", "source_lost"]),
    st.sampled_from("abcd"),
    st.sampled_from(["", "text"]),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(op, max_size=120), st.integers(0, 6), st.integers(1, 5), st.integers(1, 3))
def test_property_snapshot_matches_a_simple_model(
    ops: list[tuple[str, str, str]], limit: int, per_stream: int, max_streams: int
) -> None:
    history = FinalHistory(per_stream=per_stream, max_streams=max_streams)
    # The model: plain lists. A stream evicted (the one whose newest final is
    # oldest) loses everything; a stream keeps its last per_stream finals.
    model: dict[str, list[Hypothesis]] = {}
    for seq, (kind, stream, text) in enumerate(ops):
        event = ev(kind, stream, seq=seq, text=text)
        history.record(event)
        if kind == "final" and text:
            model[stream] = [*model.pop(stream, []), event][-per_stream:]  # now the newest
            while len(model) > max_streams:
                del model[next(iter(model))]
    expected = [e for kept in model.values() for e in kept[max(0, len(kept) - limit) :]]
    expected = expected if limit else []
    expected.sort(key=lambda e: e.seq)
    got = history.snapshot(None, limit)
    assert seqs(got) == seqs(expected)
    assert all(e.extra[REPLAY_FIELD] is True for e in got)
    assert len(history) <= per_stream * max_streams
