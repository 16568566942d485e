"""Fanout queue policy: latest-wins partials, bounded FIFO finals, order, shutdown."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamer.sinks.fanout import (
    SLOW_SUBSCRIBER,
    Fanout,
    Subscription,
    SubscriptionClosed,
)
from streamer.types import Hypothesis


def ev(kind: str, stream: str = "a", segment: int = 0, seq: int = 0, text: str = "") -> Hypothesis:
    return Hypothesis(
        kind=kind,  # type: ignore[arg-type]
        stream=stream,
        segment=segment,
        seq=seq,
        text=text or f"{kind} {stream} {segment}/{seq}",
        start=0.0,
        end=1.0,
    )


def drain(sub: Subscription) -> list[Hypothesis]:
    out: list[Hypothesis] = []
    while True:
        try:
            out.append(sub.get_nowait())
        except asyncio.QueueEmpty:
            return out


def test_partials_latest_wins_per_stream() -> None:
    fan = Fanout()
    sub = fan.subscribe()
    p1, p2, p3 = (ev("partial", seq=i) for i in range(3))
    b1 = ev("partial", stream="b", seq=0)
    for e in (p1, b1, p2, p3):
        fan.publish(e)
    assert drain(sub) == [p3, b1]  # a's slot keeps its place, holds the newest
    assert sub.dropped_partials == 2
    assert fan.dropped_partials == 2
    assert fan.published == 4


def test_finals_fifo_and_never_dropped() -> None:
    fan = Fanout()
    sub = fan.subscribe(max_finals=10)
    finals = [ev("final", segment=i, seq=i) for i in range(10)]
    for e in finals:
        fan.publish(e)
    assert drain(sub) == finals
    assert not sub.closed


def test_final_queue_overflow_disconnects_only_the_slow_subscriber() -> None:
    fan = Fanout()
    slow = fan.subscribe(max_finals=3, name="slow")
    fast = fan.subscribe(max_finals=100, name="fast")
    finals = [ev("final", segment=i, seq=i) for i in range(4)]
    for e in finals[:3]:
        fan.publish(e)
    assert not slow.closed
    fan.publish(finals[3])
    assert slow.closed and slow.slow
    assert slow.close_reason == SLOW_SUBSCRIBER
    with pytest.raises(SubscriptionClosed) as info:
        slow.get_nowait()  # queue discarded: a disconnected subscriber is not fed
    assert info.value.reason == SLOW_SUBSCRIBER
    assert slow.drained.is_set()
    assert fan.disconnected_slow == 1
    assert fan.subscribers == 1
    fan.publish(ev("final", segment=4, seq=4))
    assert [e.seq for e in drain(fast)] == [0, 1, 2, 3, 4]


def test_consumed_finals_free_room() -> None:
    fan = Fanout()
    sub = fan.subscribe(max_finals=2)
    for i in range(10):
        fan.publish(ev("final", segment=i, seq=i))
        assert sub.get_nowait().seq == i
    assert not sub.closed
    assert sub.pending_finals == 0


def test_partials_never_count_against_final_room() -> None:
    fan = Fanout()
    sub = fan.subscribe(max_finals=1)
    for i in range(50):
        fan.publish(ev("partial", stream=f"s{i % 5}", seq=i))
    assert not sub.closed
    assert sub.pending == 5


def test_final_discards_pending_partial_of_its_segment() -> None:
    fan = Fanout()
    sub = fan.subscribe()
    fan.publish(ev("partial", segment=0, seq=0))
    fan.publish(ev("partial", stream="b", segment=0, seq=0))
    final = ev("final", segment=0, seq=1)
    fan.publish(final)
    got = drain(sub)
    assert [(e.kind, e.stream) for e in got] == [("partial", "b"), ("final", "a")]
    assert sub.dropped_partials == 1


def test_partial_after_final_is_queued_behind_it() -> None:
    fan = Fanout()
    sub = fan.subscribe()
    final = ev("final", segment=0, seq=0)
    nxt = ev("partial", segment=1, seq=1)
    newer = ev("partial", segment=1, seq=2)
    fan.publish(final)
    fan.publish(nxt)
    fan.publish(newer)
    assert drain(sub) == [final, newer]


def test_partial_of_later_segment_is_sealed_by_earlier_final() -> None:
    # Out-of-order input must still come out in publish order per stream.
    fan = Fanout()
    sub = fan.subscribe()
    p_seg1 = ev("partial", segment=1, seq=0)
    f_seg0 = ev("final", segment=0, seq=1)
    p_seg1b = ev("partial", segment=1, seq=2)
    for e in (p_seg1, f_seg0, p_seg1b):
        fan.publish(e)
    assert drain(sub) == [p_seg1, f_seg0, p_seg1b]


def test_filters_by_stream_and_kind() -> None:
    fan = Fanout()
    only_a = fan.subscribe(streams=frozenset({"a"}))
    finals_ab = fan.subscribe(streams=frozenset({"a", "b"}), kinds=frozenset({"final"}))
    partials = fan.subscribe(kinds=frozenset({"partial"}))
    events = [
        ev("partial", "a", 0, 0),
        ev("partial", "b", 0, 0),
        ev("partial", "c", 0, 0),
        ev("final", "c", 0, 1),
        ev("final", "b", 0, 1),
        ev("final", "a", 0, 1),
    ]
    for e in events:
        fan.publish(e)
    assert drain(only_a) == [events[5]]  # its partial was superseded by the final
    assert drain(finals_ab) == [events[4], events[5]]
    assert drain(partials) == events[:3]  # finals not wanted, so nothing superseded them


def test_subscribe_rejects_bad_arguments() -> None:
    fan = Fanout()
    with pytest.raises(ValueError):
        fan.subscribe(kinds=frozenset({"partial", "interim"}))
    with pytest.raises(ValueError):
        fan.subscribe(kinds=frozenset())
    with pytest.raises(ValueError):
        fan.subscribe(max_finals=0)


def test_publish_survives_a_broken_subscription(monkeypatch: pytest.MonkeyPatch) -> None:
    fan = Fanout()
    broken = fan.subscribe(name="broken")
    good = fan.subscribe(name="good")

    def boom(event: Hypothesis) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(broken, "_offer", boom)
    final = ev("final")
    fan.publish(final)  # must not raise
    assert broken.closed
    assert drain(good) == [final]


async def test_get_waits_for_publish_and_iteration_ends_on_close() -> None:
    fan = Fanout()
    sub = fan.subscribe()
    received: list[Hypothesis] = []

    async def consume() -> None:
        async for e in sub:
            received.append(e)

    task = asyncio.create_task(consume())
    assert await fan.wait_idle(2.0)  # consumer now waits in get()
    final = ev("final")
    fan.publish(final)
    assert await fan.wait_idle(2.0)
    assert received == [final]
    sub.close("bye")
    await asyncio.wait_for(task, 2.0)
    assert sub.drained.is_set()
    assert sub.close_reason == "bye"


async def test_close_all_keeps_queued_finals_deliverable() -> None:
    fan = Fanout()
    sub = fan.subscribe()
    idle = fan.subscribe(name="never reads")
    finals = [ev("final", segment=i, seq=i) for i in range(3)]
    for e in finals:
        fan.publish(e)
    fan.close_all("shutdown")
    assert sub.closed and idle.closed
    fan.publish(ev("final", segment=9, seq=9))  # after close: ignored
    assert fan.subscribers == 0
    late = fan.subscribe()
    assert late.closed
    with pytest.raises(SubscriptionClosed):
        await late.get()

    got = [e async for e in sub]
    assert got == finals
    assert sub.drained.is_set()
    # `idle` never consumed: waiting for it times out, it does not hang.
    assert not await fan.wait_drained(0.05)
    assert [idle.get_nowait() for _ in finals] == finals
    with pytest.raises(SubscriptionClosed):
        idle.get_nowait()
    assert await fan.wait_drained(1.0)


async def test_wait_closed_reports_slow_reason() -> None:
    fan = Fanout()
    sub = fan.subscribe(max_finals=1)
    waiter = asyncio.create_task(sub.wait_closed())
    fan.publish(ev("final", seq=0))
    fan.publish(ev("final", seq=1))
    assert await asyncio.wait_for(waiter, 2.0) == SLOW_SUBSCRIBER


# -- property: delivery guarantees for any publish/consume interleaving -----------

STREAMS = ("s0", "s1", "s2")

op = st.tuples(
    st.integers(0, len(STREAMS) - 1),  # stream
    st.booleans(),  # final?
    st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3)),  # reads per sub
)


@settings(max_examples=200, deadline=None)
@given(st.lists(op, max_size=80))
def test_property_finals_complete_in_order_and_no_stale_partials(
    ops: list[tuple[int, bool, tuple[int, int, int]]],
) -> None:
    fan = Fanout()
    subs = [
        fan.subscribe(max_finals=1000),
        fan.subscribe(streams=frozenset({"s0", "s2"}), max_finals=1000),
        fan.subscribe(kinds=frozenset({"final"}), max_finals=1000),
    ]
    received: list[list[Hypothesis]] = [[] for _ in subs]
    published: list[Hypothesis] = []
    segment = dict.fromkeys(STREAMS, 0)
    seq = dict.fromkeys(STREAMS, 0)

    for stream_i, is_final, reads in ops:
        stream = STREAMS[stream_i]
        e = ev("final" if is_final else "partial", stream, segment[stream], seq[stream])
        seq[stream] += 1
        if is_final:
            segment[stream] += 1
        fan.publish(e)
        published.append(e)
        for i, n in enumerate(reads):
            for _ in range(n):
                try:
                    received[i].append(subs[i].get_nowait())
                except asyncio.QueueEmpty:
                    break
            assert subs[i].pending == sum(s.event is not None for s in subs[i]._queue), (
                "pending count out of step"
            )
    for i, sub in enumerate(subs):
        received[i].extend(drain(sub))
        assert sub.pending == 0

    for sub, got in zip(subs, received, strict=True):
        wanted = [e for e in published if sub.wants(e)]
        assert all(sub.wants(e) for e in got)
        # every final, in publish order
        assert [e for e in got if e.kind == "final"] == [e for e in wanted if e.kind == "final"]
        # conservation: each wanted partial was delivered or counted as dropped
        n_partials = sum(e.kind == "partial" for e in wanted)
        assert sum(e.kind == "partial" for e in got) + sub.dropped_partials == n_partials
        for stream in STREAMS:
            mine = [e for e in got if e.stream == stream]
            assert [e.seq for e in mine] == sorted({e.seq for e in mine})  # publish order
            last_final = -1
            for e in mine:
                if e.kind == "final":
                    last_final = e.segment
                else:
                    assert e.segment > last_final, "stale partial after its final"
            theirs = [e for e in wanted if e.stream == stream]
            if theirs and theirs[-1].kind == "partial":
                assert mine and mine[-1] is theirs[-1], "newest partial lost"
        assert not sub.closed


def test_status_events_queue_like_finals_and_seal_the_open_partial() -> None:
    fan = Fanout()
    sub = fan.subscribe(kinds=["partial", "final", "source_lost"])
    default = fan.subscribe()  # partial + final only
    fan.publish(ev("partial", seq=1))
    fan.publish(ev("source_lost", seq=2))
    fan.publish(ev("partial", seq=3))  # queues behind the status event, replaces nothing
    fan.publish(ev("final", seq=4))
    got = [(e.kind, e.seq) for e in drain(sub)]
    assert got == [("partial", 1), ("source_lost", 2), ("final", 4)]
    assert [e.kind for e in drain(default)] == ["final"]  # its partials were superseded
    with pytest.raises(ValueError):
        fan.subscribe(kinds=["source_gone"])


# -- history: recent finals for late subscribers ------------------------------------


def test_late_subscriber_gets_recent_finals_then_live_events_without_overlap() -> None:
    fan = Fanout(history_per_stream=20, history_streams=8)
    early = fan.subscribe()
    for i in range(8):
        fan.publish(ev("partial", segment=i, seq=2 * i, text=f"part {i}"))
        fan.publish(ev("final", segment=i, seq=2 * i + 1, text=f"line {i}"))
    fan.publish(ev("partial", segment=8, seq=16, text="open partial"))
    late = fan.subscribe(history=5)
    none = fan.subscribe()  # history=0 (the default): live events only, as before
    fan.publish(ev("final", segment=8, seq=17, text="line 8"))
    got = drain(late)
    assert [e.seq for e in got] == [7, 9, 11, 13, 15, 17]  # last 5 finals, then live
    assert [e.extra.get("replay") for e in got] == [True] * 5 + [None]
    assert [e.seq for e in drain(none)] == [17]
    assert all("replay" not in e.extra for e in drain(early))  # live events stay unmarked
    assert late.delivered == 6 and late.pending == 0


def test_history_respects_filters_and_never_counts_against_final_room() -> None:
    fan = Fanout()
    for i in range(6):
        fan.publish(ev("final", stream="ab"[i % 2], segment=i, seq=i))
    only_b = fan.subscribe(streams=["b"], history=100, max_finals=1)
    partials = fan.subscribe(kinds=["partial"], history=100)
    assert only_b.pending == 3 and only_b.pending_finals == 0
    fan.publish(ev("final", stream="b", segment=6, seq=6))  # one live final fits max_finals=1
    assert not only_b.closed
    assert [e.seq for e in drain(only_b)] == [1, 3, 5, 6]
    assert drain(partials) == []


def test_history_empty_final_does_not_retract_earlier_finals() -> None:
    fan = Fanout()
    fan.publish(ev("final", segment=0, seq=1, text="Said."))
    fan.publish(ev("partial", segment=1, seq=2, text="noise"))
    fan.publish(replace(ev("final", segment=1, seq=3), text=""))  # retracts the partial only
    late = fan.subscribe(history=10)
    assert [(e.seq, e.text) for e in drain(late)] == [(1, "Said.")]


async def test_history_is_delivered_by_get_and_dropped_on_slow_or_closed() -> None:
    fan = Fanout()
    for i in range(3):
        fan.publish(ev("final", segment=i, seq=i))
    sub = fan.subscribe(history=3)
    async with asyncio.timeout(1):
        assert (await sub.get()).seq == 0  # no publish needed to wake it
    sub.close("bye", discard=True)
    with pytest.raises(SubscriptionClosed):
        sub.get_nowait()
    fan.close_all("shutdown")
    assert fan.subscribe(history=3).pending == 0  # closed at birth: no replay
    with pytest.raises(ValueError):
        Fanout().subscribe(history=-1)
