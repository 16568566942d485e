"""The recent finals of each stream, for caption subscribers that connect late.

A caption page opened in the middle of a talk should show what was just said,
not "Waiting for captions…". :class:`FinalHistory` keeps, per stream, the last
``per_stream`` finals, for the ``max_streams`` streams that had a final most
recently (the stream whose newest final is oldest is forgotten first), so its
size is bounded whatever the number of streams over the daemon's life.

What is kept:

- Finals only, and only those with text. A final never changes, so a kept one
  never needs updating. A final with empty ``text`` retracts the *partials* of
  its own segment (the sound was not speech after all); it never retracts an
  earlier final, and a late subscriber has seen none of those partials, so
  there is nothing to store and nothing to remove.
- Partials and status events are not kept: a partial is superseded within a
  second, and the next one reaches a new subscriber anyway.
- Per language: with translation targets, each (stream, target) keeps its
  own ``per_stream`` finals (the source's are not crowded out by its
  translations), and a snapshot takes only the selected languages
  (:mod:`streamer.sinks.targets`). ``max_streams`` counts streams, whatever
  their number of targets.

:meth:`FinalHistory.snapshot` returns the kept finals of the selected streams
in publish order (across streams too), each marked ``"replay": true`` in its
``extra`` (so in its wire form): a client can tell a replay from a live event,
e.g. to drop one it already showed, or to leave its ``latency_ms`` out of
statistics. The fanout takes the snapshot and registers the subscription in
one synchronous step, so the replay and the live events that follow neither
overlap nor leave a gap.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import OrderedDict, deque
from collections.abc import Collection

from streamer.sinks.targets import SOURCE_ONLY, TargetSelection, language_of, selects
from streamer.types import Hypothesis

__all__ = ["HISTORY_PER_STREAM", "HISTORY_STREAMS", "REPLAY_FIELD", "FinalHistory"]

#: Finals kept per stream.
HISTORY_PER_STREAM = 20
#: Streams kept (those with the most recent finals).
HISTORY_STREAMS = 64
#: The wire field that marks a replayed final.
REPLAY_FIELD = "replay"


class FinalHistory:
    """The last ``per_stream`` non-empty finals of the ``max_streams`` latest streams.

    Not thread-safe: used from the event loop thread, like the fanout.
    """

    def __init__(
        self, per_stream: int = HISTORY_PER_STREAM, max_streams: int = HISTORY_STREAMS
    ) -> None:
        if per_stream < 0 or max_streams < 0:
            raise ValueError("per_stream and max_streams must be >= 0")
        self.per_stream = per_stream
        self.max_streams = max_streams
        # stream -> language -> (publish order, final), oldest first; the dict's
        # order is least recently updated stream first.
        self._streams: OrderedDict[str, dict[str, deque[tuple[int, Hypothesis]]]] = OrderedDict()
        self._order = itertools.count()

    def __len__(self) -> int:
        """Finals kept, all streams and languages together."""
        return sum(len(kept) for langs in self._streams.values() for kept in langs.values())

    @property
    def streams(self) -> int:
        """Streams with kept finals."""
        return len(self._streams)

    def record(self, event: Hypothesis) -> None:
        """Keep ``event`` if it is a final with text; forget what falls out of the bounds."""
        if event.kind != "final" or not event.text.strip():
            return
        if not self.per_stream or not self.max_streams:
            return
        langs = self._streams.get(event.stream)
        if langs is None:
            langs = self._streams[event.stream] = {}
        else:
            self._streams.move_to_end(event.stream)
        kept = langs.setdefault(language_of(event), deque(maxlen=self.per_stream))
        kept.append((next(self._order), event))
        while len(self._streams) > self.max_streams:
            self._streams.popitem(last=False)

    def snapshot(
        self,
        streams: Collection[str] | None,
        limit: int,
        targets: TargetSelection = SOURCE_ONLY,
    ) -> list[Hypothesis]:
        """The last ``limit`` finals of each of ``streams`` (None: all) in each
        language of ``targets`` (default: the source), in publish order.

        Each is a copy marked ``extra["replay"] = True``.
        """
        if limit <= 0:
            return []
        picked: list[tuple[int, Hypothesis]] = []
        for name, langs in self._streams.items():
            if streams is not None and name not in streams:
                continue
            for kept in langs.values():
                if kept and selects(targets, kept[0][1]):
                    picked.extend(itertools.islice(kept, max(0, len(kept) - limit), None))
        picked.sort(key=lambda item: item[0])
        return [
            dataclasses.replace(event, extra={**event.extra, REPLAY_FIELD: True})
            for _, event in picked
        ]
