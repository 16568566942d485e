"""``/v1/captions`` subscriptions: what a subscriber may ask for in its query.

The route itself (slots, authentication, delivery, shutdown) lives on
:class:`~streamer.sinks.websocket.CaptionServer`.

Query parameters (each validated before the upgrade; a bad one answers 400):

- ``streams=a,b``: only these streams (repeatable; all streams when absent);
- ``kinds=partial,final,source_lost,source_restored``: only these event
  types (repeatable; all when absent);
- ``targets=de,fr``: the events of these translation targets instead of the
  source (the speech model's own events, the default); ``source`` names the
  source, so ``targets=source,de`` takes both, and ``targets=*`` every
  language (repeatable; :mod:`streamer.sinks.targets`). A target the daemon
  does not produce is not an error, like an unknown stream: nothing comes.
- ``history=N`` (0 to :data:`MAX_HISTORY`, default 0): first send the last
  (up to) N finals of each selected stream and language that the server
  still keeps (:mod:`streamer.sinks.history`), in publish order, each marked
  ``"replay": true``; then the live events, continuing exactly where the
  replay ended. Only when ``kinds`` includes ``final``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl

from streamer.sinks.fanout import EVENT_KINDS
from streamer.sinks.targets import SOURCE_ONLY, TargetSelection, parse_targets

__all__ = [
    "MAX_HISTORY",
    "MAX_STREAM_ID",
    "CaptionQuery",
    "parse_caption_query",
]

MAX_STREAM_ID = 256
#: The most finals per stream a subscriber may ask for with ``history=``.
MAX_HISTORY = 100
_COUNT = re.compile(r"[0-9]{1,3}")


@dataclass(frozen=True, slots=True)
class CaptionQuery:
    """A parsed ``/v1/captions`` query: ``streams`` None means every stream,
    ``targets`` None every language."""

    streams: frozenset[str] | None
    kinds: frozenset[str]
    history: int = 0
    targets: TargetSelection = SOURCE_ONLY


def parse_caption_query(query: str) -> CaptionQuery:
    """Parse ``streams=a,b&kinds=partial,final&targets=de&history=N``; ValueError with a reason."""
    try:
        fields = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError as exc:
        raise ValueError(f"malformed query: {exc}") from None
    streams: set[str] | None = None
    kinds: set[str] | None = None
    history: int | None = None
    targets: TargetSelection = frozenset()  # empty: not given (the source); None: every language
    for key, value in fields:
        items = [item.strip() for item in value.split(",")]
        if any(not item for item in items):
            raise ValueError(f"empty item in {key}={value!r}")
        if key == "streams":
            if any(len(item) > MAX_STREAM_ID for item in items):
                raise ValueError(f"stream id longer than {MAX_STREAM_ID} characters")
            streams = (streams or set()) | set(items)
        elif key == "kinds":
            unknown = sorted(set(items) - EVENT_KINDS)
            if unknown:
                raise ValueError(
                    f"unknown kind {unknown[0]!r} (expected {', '.join(sorted(EVENT_KINDS))})"
                )
            kinds = (kinds or set()) | set(items)
        elif key == "history":
            if history is not None:
                raise ValueError("history given twice")
            if not _COUNT.fullmatch(value) or int(value) > MAX_HISTORY:
                raise ValueError(f"history must be a whole number from 0 to {MAX_HISTORY}")
            history = int(value)
        elif key == "targets":
            chosen = parse_targets(value)
            targets = None if chosen is None or targets is None else targets | chosen
        else:
            raise ValueError(
                f"unknown query parameter {key!r} (expected streams, kinds, targets, history)"
            )
    return CaptionQuery(
        streams=None if streams is None else frozenset(streams),
        kinds=EVENT_KINDS if kinds is None else frozenset(kinds),
        history=history or 0,
        targets=targets if targets is None or targets else SOURCE_ONLY,
    )
