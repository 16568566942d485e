"""Languages per subscriber: the source by default, translation targets on request.

Covers the selection itself, the fanout's filter (and its per-language
latest-wins), the history kept per (stream, target), and the
``/v1/captions`` ``targets`` query.
"""

from __future__ import annotations

import asyncio

import pytest

from streamer.sinks.captions import parse_caption_query
from streamer.sinks.fanout import EVENT_KINDS, Fanout, Subscription
from streamer.sinks.history import FinalHistory
from streamer.sinks.targets import SOURCE, SOURCE_ONLY, parse_targets, selects
from streamer.types import Hypothesis


def ev(
    kind: str, seq: int, target: str | None = None, segment: int = 0, stream: str = "a"
) -> Hypothesis:
    return Hypothesis(
        kind=kind,  # type: ignore[arg-type]
        stream=stream,
        segment=segment,
        seq=seq,
        text=f"{target or 'src'} {seq}",
        start=float(segment),
        end=segment + 1.0,
        target=target,
    )


def drain(sub: Subscription) -> list[tuple[str, int, str | None]]:
    out = []
    while True:
        try:
            event = sub.get_nowait()
        except asyncio.QueueEmpty:
            return out
        out.append((event.kind, event.seq, event.target))


def test_parse_targets_and_selects() -> None:
    assert parse_targets("de") == frozenset({"de"})
    assert parse_targets("source, de,deu_Latn,pt-BR") == {SOURCE, "de", "deu_Latn", "pt-BR"}
    assert parse_targets("*") is None and parse_targets("de,*") is None
    for bad in ("", "de,", "d", "german!", "de/fr"):
        with pytest.raises(ValueError):
            parse_targets(bad)
    assert selects(SOURCE_ONLY, ev("final", 1)) and not selects(SOURCE_ONLY, ev("final", 2, "de"))
    assert selects(None, ev("final", 2, "de")) and selects(
        frozenset({"de"}), ev("partial", 2, "de")
    )
    # Status events are about the stream: every selection takes them.
    assert selects(frozenset({"de"}), ev("source_lost", 3))


async def test_fanout_delivers_each_subscriber_its_languages() -> None:
    fan = Fanout()
    source = fan.subscribe(kinds=EVENT_KINDS)  # the default: the source only
    de = fan.subscribe(kinds=EVENT_KINDS, targets=["de"])
    both = fan.subscribe(kinds=EVENT_KINDS, targets=[SOURCE, "fr"])
    every = fan.subscribe(kinds=EVENT_KINDS, targets=None)
    events = [ev("final", 1), ev("final", 2, "de"), ev("final", 3, "fr"), ev("source_lost", 4)]
    for event in events:
        fan.publish(event)
    assert drain(source) == [("final", 1, None), ("source_lost", 4, None)]
    assert drain(de) == [("final", 2, "de"), ("source_lost", 4, None)]
    assert drain(both) == [("final", 1, None), ("final", 3, "fr"), ("source_lost", 4, None)]
    assert [seq for _, seq, _ in drain(every)] == [1, 2, 3, 4]
    with pytest.raises(TypeError):
        fan.subscribe(targets="de")  # a string is not a set of names
    with pytest.raises(ValueError):
        fan.subscribe(targets=[])


async def test_latest_wins_and_finals_supersede_per_language() -> None:
    """A target's partial never replaces the source's (nor the other way round)."""
    fan = Fanout()
    sub = fan.subscribe(targets=None)
    fan.publish(ev("partial", 1))
    fan.publish(ev("partial", 2, "de"))
    fan.publish(ev("partial", 3))  # replaces seq 1 in place
    fan.publish(ev("partial", 4, "de"))  # replaces seq 2 in place
    fan.publish(ev("final", 5))  # supersedes the source partial only
    assert drain(sub) == [("partial", 4, "de"), ("final", 5, None)]
    assert sub.dropped_partials == 3


def test_history_is_kept_per_stream_and_language() -> None:
    history = FinalHistory(per_stream=2, max_streams=1)
    for seq in range(1, 4):
        history.record(ev("final", 10 * seq, segment=seq))
        for offset, target in ((1, "de"), (2, "fr")):
            history.record(ev("final", 10 * seq + offset, target, segment=seq))
    # Two per (stream, language): the translations do not crowd out the source.
    assert [e.seq for e in history.snapshot(None, 5)] == [20, 30]
    assert [e.seq for e in history.snapshot(None, 5, frozenset({"de"}))] == [21, 31]
    assert [e.seq for e in history.snapshot(None, 1, None)] == [30, 31, 32]
    assert len(history) == 6 and history.streams == 1
    history.record(ev("final", 40, "de", stream="b"))  # max_streams counts streams
    assert history.streams == 1 and history.snapshot({"a"}, 5, None) == []


async def test_subscribe_history_per_language() -> None:
    fan = Fanout()
    for seq, target in ((1, None), (2, "de"), (3, "fr"), (4, None), (5, "de")):
        fan.publish(ev("final", seq, target, segment=seq))
    assert [s for _, s, _ in drain(fan.subscribe(history=1))] == [4]
    assert [s for _, s, _ in drain(fan.subscribe(history=1, targets=["de"]))] == [5]
    assert [s for _, s, _ in drain(fan.subscribe(history=1, targets=None))] == [3, 4, 5]


def test_captions_query_targets() -> None:
    assert parse_caption_query("").targets == SOURCE_ONLY
    assert parse_caption_query("targets=de,fr").targets == {"de", "fr"}
    assert parse_caption_query("targets=de&targets=source").targets == {"de", SOURCE}
    assert parse_caption_query("targets=*&targets=de").targets is None
    assert parse_caption_query("targets=de&targets=*").targets is None
    with pytest.raises(ValueError, match="bad target"):
        parse_caption_query("targets=d3")
    with pytest.raises(ValueError, match="expected streams, kinds, targets, history"):
        parse_caption_query("target=de")
