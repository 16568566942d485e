"""Fanout: one publisher, many subscribers, and a publisher that never waits.

The engine side calls :meth:`Fanout.publish` from the event loop thread for
every caption event. Each subscriber (a WebSocket client, the console, a JSONL
file, MQTT) owns a :class:`Subscription` with its own bounded queue, so one
slow consumer can never hold up the engine or the other consumers.

Queue policy per subscription (DESIGN.md section 5):

- **Partials are latest-wins per stream.** A new partial of stream S replaces
  the undelivered older partial of S in place (counted in ``dropped_partials``).
  Partials are previews; only the newest one is worth sending.
- **Finals are a FIFO bounded by** ``max_finals``. Finals must never be lost
  silently, so when that queue is full the subscription is closed with reason
  :data:`SLOW_SUBSCRIBER` and its queue discarded: the subscriber is
  disconnected, never waited for (counted in ``disconnected_slow``).
- **Order.** Events of one stream leave in publish order. When a final of
  stream S arrives, an undelivered partial of S for that segment or an earlier
  one is discarded (it is stale: the final supersedes it), so a subscriber
  never sees a partial after the final that followed it.
- **Languages.** A subscription takes the source (the speech model's own
  events) unless it asks for translation targets (``targets``, see
  :mod:`streamer.sinks.targets`): consumers that know one language per
  stream must never see a translation as if it were the source. Latest-wins
  and "a final supersedes the partials" hold per (stream, target).

History: the fanout keeps each stream's recent finals
(:class:`~streamer.sinks.history.FinalHistory`). ``subscribe(history=N)``
primes the new subscription with the last N finals of each selected stream
(marked ``"replay": true``), taken in the same synchronous step that
registers it: the replay ends exactly where the live events begin, with no
duplicate and no gap. Replayed finals wait in their own queue, delivered
first, and do not count against ``max_finals``.

Shutdown: :meth:`Fanout.close_all` closes every subscription but keeps what
is queued; consumers keep calling ``get()`` until it raises
:class:`SubscriptionClosed`, which sets :attr:`Subscription.drained`.
:meth:`Fanout.wait_drained` waits for that with a timeout, so the service can
flush its sinks before closing sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Iterable

from streamer.sinks.history import HISTORY_PER_STREAM, HISTORY_STREAMS, FinalHistory
from streamer.sinks.targets import SOURCE_ONLY, TargetSelection, selects
from streamer.types import Hypothesis

__all__ = [
    "ALL_KINDS",
    "EVENT_KINDS",
    "SLOW_SUBSCRIBER",
    "STATUS_KINDS",
    "Fanout",
    "PartialKey",
    "Subscription",
    "SubscriptionClosed",
]

log = logging.getLogger(__name__)

ALL_KINDS: frozenset[str] = frozenset({"partial", "final"})
#: A capture source went away / came back (``text`` says why); queued like finals.
STATUS_KINDS: frozenset[str] = frozenset({"source_lost", "source_restored"})
EVENT_KINDS: frozenset[str] = ALL_KINDS | STATUS_KINDS
SLOW_SUBSCRIBER = "slow subscriber: final queue full"
#: What a newer partial replaces: the one of the same stream and language.
PartialKey = tuple[str, str | None]


class SubscriptionClosed(Exception):
    """Raised by :meth:`Subscription.get` once the subscription is closed and drained."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class _Slot:
    """A place in a subscriber's queue; ``event`` is None once discarded."""

    __slots__ = ("event",)

    def __init__(self, event: Hypothesis) -> None:
        self.event: Hypothesis | None = event


class Subscription:
    """One consumer's view of the fanout: a filtered, bounded event queue.

    Create with :meth:`Fanout.subscribe`. Meant for one consumer task, on the
    event loop thread. ``get()`` returns events in queue order; after
    :meth:`close` it still returns what was queued, then raises
    :class:`SubscriptionClosed` (except after a slow-subscriber close, which
    discards the queue).
    """

    def __init__(
        self,
        fanout: Fanout | None,
        streams: frozenset[str] | None,
        kinds: frozenset[str],
        max_finals: int,
        name: str,
        targets: TargetSelection = SOURCE_ONLY,
    ) -> None:
        self._fanout = fanout
        self.streams = streams
        self.kinds = kinds
        self.targets = targets
        self.max_finals = max_finals
        self.name = name
        self._queue: deque[_Slot] = deque()
        self._replay: deque[Hypothesis] = deque()  # history, delivered before the queue
        # Undelivered partial per (stream, target) that may still be replaced in place.
        self._open_partial: dict[PartialKey, _Slot] = {}
        self._n_finals = 0
        self._n_pending = 0  # live (not discarded) slots
        self._close_reason: str | None = None
        self._wakeup = asyncio.Event()
        self._closed_event = asyncio.Event()
        #: Set once the subscription is closed and its consumer has taken
        #: everything (``get()`` raised :class:`SubscriptionClosed`).
        self.drained = asyncio.Event()
        #: Set while the consumer waits in ``get()`` on an empty queue.
        self.idle = asyncio.Event()
        self.delivered = 0
        self.dropped_partials = 0

    # -- state -------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._close_reason is not None

    @property
    def close_reason(self) -> str | None:
        return self._close_reason

    @property
    def slow(self) -> bool:
        """True when this subscription was closed for falling behind."""
        return self._close_reason == SLOW_SUBSCRIBER

    @property
    def pending(self) -> int:
        """Number of undelivered events (finals and partials)."""
        return self._n_pending

    @property
    def pending_finals(self) -> int:
        """Live finals (and status events) queued; replayed history is not counted."""
        return self._n_finals

    def wants(self, event: Hypothesis) -> bool:
        """Whether this subscription's filters select ``event``."""
        if event.kind not in self.kinds or not selects(self.targets, event):
            return False
        return self.streams is None or event.stream in self.streams

    # -- producer side (called by Fanout.publish) ----------------------------

    def _prime(self, events: list[Hypothesis]) -> None:
        """Queue replayed history ahead of everything else (right after creation)."""
        self._replay.extend(events)
        self._n_pending += len(events)
        if events:
            self._wakeup.set()

    def _offer(self, event: Hypothesis) -> None:
        """Queue ``event`` under the subscription's policy; never blocks, never raises."""
        if self.closed or not self.wants(event):
            return
        key = (event.stream, event.target)
        if event.kind != "partial":
            if self._n_finals >= self.max_finals:
                log.warning(
                    "subscriber %r disconnected: %d finals undelivered",
                    self.name,
                    self._n_finals,
                )
                if self._fanout is not None:
                    self._fanout.disconnected_slow += 1
                self._close(SLOW_SUBSCRIBER, discard=True)
                return
            slot = self._open_partial.pop(key, None)
            if event.kind != "final":  # a status event seals the open partials of
                slot = None  # its stream (every language) but supersedes nothing
                for other in [k for k in self._open_partial if k[0] == event.stream]:
                    del self._open_partial[other]
            # A pending partial of this segment or an earlier one is stale: the
            # final supersedes it. One of a later segment keeps its place but is
            # sealed (no longer replaceable), so later partials queue behind this final.
            if slot is not None and slot.event is not None and slot.event.segment <= event.segment:
                slot.event = None
                self._n_pending -= 1
                self._count_dropped()
            self._queue.append(_Slot(event))
            self._n_finals += 1
            self._n_pending += 1
        else:
            slot = self._open_partial.get(key)
            if slot is not None and slot.event is not None:
                slot.event = event  # latest wins, keeping the older one's place
                self._count_dropped()
            else:
                slot = _Slot(event)
                self._open_partial[key] = slot
                self._queue.append(slot)
                self._n_pending += 1
        self.idle.clear()
        self._wakeup.set()

    def _count_dropped(self) -> None:
        self.dropped_partials += 1
        if self._fanout is not None:
            self._fanout.dropped_partials += 1

    # -- consumer side -------------------------------------------------------

    def get_nowait(self) -> Hypothesis:
        """Next queued event without waiting.

        Raises :class:`asyncio.QueueEmpty` when nothing is queued, and
        :class:`SubscriptionClosed` when closed and drained.
        """
        if self._replay:
            self._n_pending -= 1
            self.delivered += 1
            return self._replay.popleft()
        while self._queue:
            slot = self._queue.popleft()
            event = slot.event
            if event is None:
                continue
            if event.kind == "final":
                self._n_finals -= 1
            elif self._open_partial.get(key := (event.stream, event.target)) is slot:
                del self._open_partial[key]
            self._n_pending -= 1
            self.delivered += 1
            return event
        if self._close_reason is not None:
            self.drained.set()
            self.idle.set()
            raise SubscriptionClosed(self._close_reason)
        raise asyncio.QueueEmpty

    async def get(self) -> Hypothesis:
        """Wait for the next event; raises :class:`SubscriptionClosed` at the end."""
        while True:
            try:
                return self.get_nowait()
            except asyncio.QueueEmpty:
                pass
            self._wakeup.clear()
            self.idle.set()
            await self._wakeup.wait()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Hypothesis:
        try:
            return await self.get()
        except SubscriptionClosed:
            raise StopAsyncIteration from None

    # -- closing ---------------------------------------------------------------

    def close(self, reason: str, *, discard: bool = False) -> None:
        """Stop receiving events; idempotent (the first reason wins).

        Queued events stay deliverable unless ``discard`` is true.
        """
        self._close(reason, discard=discard)

    def _close(self, reason: str, *, discard: bool) -> None:
        if self._close_reason is not None:
            return
        self._close_reason = reason
        if discard:
            self._queue.clear()
            self._replay.clear()
            self._open_partial.clear()
            self._n_finals = 0
            self._n_pending = 0
            self.drained.set()
        if self._fanout is not None:
            self._fanout._forget(self)
        self._closed_event.set()
        self._wakeup.set()

    async def wait_closed(self) -> str:
        """Wait until the subscription is closed; returns the reason."""
        await self._closed_event.wait()
        assert self._close_reason is not None
        return self._close_reason

    async def wait_drained(self, timeout: float | None) -> bool:
        """Wait until closed and fully consumed; False on timeout."""
        try:
            async with asyncio.timeout(timeout):
                await self.drained.wait()
        except TimeoutError:
            return False
        return True

    def __repr__(self) -> str:
        state = f"closed={self._close_reason!r}" if self.closed else "open"
        return f"<Subscription {self.name!r} {state} pending={self.pending}>"


class Fanout:
    """Distributes caption events to subscriptions; ``publish`` never blocks.

    All methods must be called from the event loop thread (the engine facade
    hands events over with ``loop.call_soon_threadsafe``).
    """

    def __init__(
        self,
        history_per_stream: int = HISTORY_PER_STREAM,
        history_streams: int = HISTORY_STREAMS,
    ) -> None:
        #: The recent finals of each stream, for ``subscribe(history=N)``.
        self.history = FinalHistory(history_per_stream, history_streams)
        self._subs: list[Subscription] = []
        self._closing: list[Subscription] = []
        self._closed_reason: str | None = None
        self.published = 0
        self.dropped_partials = 0
        self.disconnected_slow = 0

    @property
    def subscribers(self) -> int:
        """Number of open subscriptions."""
        return len(self._subs)

    def subscribe(
        self,
        streams: Iterable[str] | None = None,
        kinds: Iterable[str] = ALL_KINDS,
        max_finals: int = 256,
        name: str = "",
        history: int = 0,
        targets: Iterable[str] | None = SOURCE_ONLY,
    ) -> Subscription:
        """Open a subscription to ``streams`` (None: all) and ``kinds``.

        ``targets``: the languages taken (:mod:`streamer.sinks.targets`):
        by default the source only; None: the source and every target.
        ``history``: first deliver the last (up to) ``history`` kept finals of
        each selected stream and language, when ``kinds`` includes finals. After
        :meth:`close_all` the returned subscription is already closed (and
        gets no history).
        """
        kind_set = frozenset(kinds)
        unknown = kind_set - EVENT_KINDS
        if unknown or not kind_set:
            raise ValueError(f"kinds must be a non-empty subset of {sorted(EVENT_KINDS)}")
        if max_finals < 1:
            raise ValueError("max_finals must be at least 1")
        if history < 0:
            raise ValueError("history must be >= 0")
        if isinstance(targets, str):
            raise TypeError("targets must be a collection of names, not a string")
        stream_set = None if streams is None else frozenset(streams)
        target_set = None if targets is None else frozenset(targets)
        if target_set is not None and not target_set:
            raise ValueError("targets must name at least one language (or be None: all)")
        sub = Subscription(self, stream_set, kind_set, max_finals, name, target_set)
        if self._closed_reason is not None:
            sub.close(self._closed_reason)
        else:
            # Snapshot and registration in one synchronous step: no event
            # can be published in between (all on the loop thread).
            if history and "final" in kind_set:
                sub._prime(self.history.snapshot(stream_set, history, target_set))
            self._subs.append(sub)
        return sub

    def publish(self, event: Hypothesis) -> None:
        """Offer ``event`` to every subscription; never blocks, never raises for one."""
        self.published += 1
        self.history.record(event)
        for sub in tuple(self._subs):
            try:
                sub._offer(event)
            except Exception:  # a bug in one subscription must not reach the engine
                log.exception("subscriber %r failed; closing it", sub.name)
                sub.close("internal error", discard=True)

    def _forget(self, sub: Subscription) -> None:
        with contextlib.suppress(ValueError):
            self._subs.remove(sub)

    def close_all(self, reason: str) -> None:
        """Close every subscription (queued events stay deliverable); for shutdown.

        Later :meth:`subscribe` calls return closed subscriptions.
        """
        self._closed_reason = reason
        subs = tuple(self._subs)
        self._closing.extend(subs)
        for sub in subs:
            sub.close(reason)

    async def wait_drained(self, timeout: float | None) -> bool:
        """After :meth:`close_all`: wait until every consumer took its queued events.

        Returns False when ``timeout`` expired first (some sink is stuck).
        """
        waiting = [sub for sub in self._closing if not sub.drained.is_set()]
        ok = True
        if waiting:
            try:
                async with asyncio.timeout(timeout):
                    for sub in waiting:
                        await sub.drained.wait()
            except TimeoutError:
                ok = False
        self._closing = [sub for sub in self._closing if not sub.drained.is_set()]
        return ok

    async def wait_idle(self, timeout: float | None) -> bool:
        """Wait until every open subscription's consumer has caught up.

        Caught up means its queue is empty and it waits in ``get()``. Returns
        False on timeout. Useful to flush without closing (tests, drains).
        """
        try:
            async with asyncio.timeout(timeout):
                while True:
                    busy = [sub for sub in self._subs if not sub.idle.is_set()]
                    if not busy:
                        return True
                    await busy[0].idle.wait()
        except TimeoutError:
            return False
