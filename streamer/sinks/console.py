"""Console sink: captions for a person watching a terminal (or a log file).

Two output modes, picked by whether ``out`` is a terminal:

TTY mode
    The newest partial occupies one line that is rewritten in place
    (``\\r`` + ``ESC[2K`` clear-line, no newline)::

        [demo] Guten Morgen, wie

    With colour on, the tentative tail is dimmed (``ESC[2m`` … ``ESC[22m``).
    A final clears that line and is printed as a kept line with its audio time
    range; then the newest partial of another stream, if any, is redrawn::

        [demo 12.5–15.3s] Guten Morgen, wie geht es Ihnen?

    Several streams share the one partial line; it shows the stream that
    updated last. Partials longer than the terminal are cut at the left
    (``…``) so the line never wraps, which would break the rewrite.

    A segment whose final text is empty ends without any event, so its last
    partial would stay on the line as if someone were still speaking. A
    partial therefore only lives until the next event of its stream that is
    not a partial of the same segment: a partial of a later segment replaces
    it, a final of its segment or a later one and a status event clear it (a
    final of an *older* segment, decoded while the next one speaks, does
    not). After a kept line, another stream's partial is redrawn only if that
    stream spoke during the segment that just ended; a partial older than
    that segment is most likely the dangling end of an empty final and is
    dropped. The sink's end (and turning partials off) clears the line.

Plain mode (pipes, files, ``journalctl``)
    No escape codes; one line per event. Partials start with ``~ `` so a
    reader (or ``grep -v '^~'``) can tell them apart; finals look as on a TTY::

        ~ [demo] Guten Morgen, wie
        [demo 12.5–15.3s] Guten Morgen, wie geht es Ihnen?

Every write is flushed at once: captions are only useful while fresh.
Colour follows ``NO_COLOR`` (https://no-color.org) when not given.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import TextIO

from streamer.sinks.fanout import STATUS_KINDS, Subscription
from streamer.sinks.targets import SOURCE_ONLY, TargetSelection
from streamer.types import Hypothesis

__all__ = ["ConsoleSink", "format_final", "format_time_range"]

CLEAR_LINE = "\r\x1b[2K"
DIM = "\x1b[2m"
UNDIM = "\x1b[22m"
ELLIPSIS = "…"


def format_time_range(start: float, end: float) -> str:
    """``0.0–4.2s``: the audio span of an event, one decimal."""
    return f"{start:.1f}–{end:.1f}s"


def format_final(event: Hypothesis) -> str:
    """The kept line of a final, without newline: ``[demo 0.0–4.2s] text``.

    Source status events read ``[mic0 12.3s] source lost: no audio for 1 s``.
    """
    if event.kind in ("source_lost", "source_restored"):
        what = event.kind.replace("_", " ")
        return f"[{event.stream} {event.end:.1f}s] {what}: {event.text}"
    return f"[{event.stream} {format_time_range(event.start, event.end)}] {event.text}"


def _stream_is_tty(out: TextIO) -> bool:
    try:
        return out.isatty()
    except (AttributeError, ValueError, OSError):
        return False


@dataclass(slots=True)
class _Live:
    """The newest partial of a stream and when it (and its segment) arrived."""

    event: Hypothesis
    tick: int  # order of arrival among all events written
    segment_tick: int  # arrival of the first partial of this segment


class ConsoleSink:
    """Writes caption events to a text stream, rewriting partials on a TTY.

    ``is_tty``/``color``/``width`` default to what ``out`` and the environment
    say; tests pass them explicitly with a ``StringIO``.
    """

    def __init__(
        self,
        out: TextIO,
        partials: bool = True,
        is_tty: bool | None = None,
        color: bool | None = None,
        width: int | None = None,
    ) -> None:
        self.out = out
        # TTY mode: newest partial per stream (insertion order = update order)
        # and whether the partial line holds text now.
        self._live: dict[str, _Live] = {}
        self._line_shown = False
        self._tick = 0
        self._partials = partials
        self.is_tty = _stream_is_tty(out) if is_tty is None else is_tty
        if color is None:
            color = self.is_tty and "NO_COLOR" not in os.environ
        self.color = color and self.is_tty
        self._width = width
        self.lines = 0

    # -- public ----------------------------------------------------------------

    @property
    def partials(self) -> bool:
        """Whether partials are shown; turning them off clears the partial line."""
        return self._partials

    @partials.setter
    def partials(self, value: bool) -> None:
        self._partials = value
        if not value:
            self.finish()  # no partial would come to replace the shown one

    @property
    def kinds(self) -> frozenset[str]:
        """The event kinds to subscribe with."""
        kinds = {"partial", "final"} if self.partials else {"final"}
        return frozenset(kinds) | STATUS_KINDS

    @property
    def targets(self) -> TargetSelection:
        """The languages to subscribe with: the source (one caption line per stream)."""
        return SOURCE_ONLY

    async def run(self, sub: Subscription) -> None:
        """Print events from ``sub`` until it closes; leaves the terminal clean."""
        try:
            async for event in sub:
                self.write(event)
        finally:
            sub.close("console sink stopped")  # no-op after a normal end
            self.finish()

    def write(self, event: Hypothesis) -> None:
        """Render one event (sync: console writes are small and line-buffered)."""
        self._tick += 1
        if event.kind != "partial":
            self._write_final(event)
        elif self.partials:
            self._write_partial(event)

    def finish(self) -> None:
        """Clear a dangling partial line so the shell prompt starts clean."""
        if self._line_shown:
            self._emit(CLEAR_LINE)
            self._line_shown = False
        self._live.clear()

    # -- rendering ---------------------------------------------------------------

    def _write_final(self, event: Hypothesis) -> None:
        # An empty final retracts its segment's partials: nothing to keep, the line clears.
        kept = event.kind != "final" or bool(event.text)
        line = format_final(event)
        if not self.is_tty:
            if kept:
                self._emit(line + "\n")
                self.lines += 1
            return
        own = self._live.get(event.stream)
        cutoff = 0  # partials of other streams older than this are dangling
        if own is not None and (event.kind != "final" or own.event.segment <= event.segment):
            del self._live[event.stream]
            if event.kind == "final" and own.event.segment == event.segment:
                cutoff = own.segment_tick
        for stream, live in list(self._live.items()):
            if stream != event.stream and live.tick < cutoff:
                del self._live[stream]
        text = (CLEAR_LINE if self._line_shown else "") + (line + "\n" if kept else "")
        self._line_shown = False
        if self._live:  # a stream still speaks: bring its partial back
            newest = next(reversed(self._live.values()))
            text += self._partial_line(newest.event)
            self._line_shown = True
        if text:
            self._emit(text)
        if kept:
            self.lines += 1

    def _write_partial(self, event: Hypothesis) -> None:
        if not self.is_tty:
            if event.text:
                self._emit(f"~ [{event.stream}] {event.text}\n")
                self.lines += 1
            return
        old = self._live.pop(event.stream, None)
        if event.text:
            same = old is not None and old.event.segment == event.segment
            began = old.segment_tick if old is not None and same else self._tick
            self._live[event.stream] = _Live(event, self._tick, began)
            self._emit(CLEAR_LINE + self._partial_line(event))
            self._line_shown = True
        elif self._line_shown:
            self._emit(CLEAR_LINE)
            self._line_shown = False

    def _partial_line(self, event: Hypothesis) -> str:
        """``[stream] committed`` + dimmed ``tentative``, cut to fit one line."""
        committed, tentative = event.committed, event.tentative
        if not committed and not tentative:
            committed = event.text
        prefix = f"[{event.stream}] "
        room = max(self._columns() - len(prefix), 8)
        body_len = len(committed) + len(tentative)
        lead = ""
        if body_len > room:
            cut = body_len - room + len(ELLIPSIS)
            lead = ELLIPSIS
            committed, tentative = (
                committed[cut:],
                tentative[max(0, cut - len(committed)) :],
            )
        if self.color and tentative:
            return f"{prefix}{lead}{committed}{DIM}{tentative}{UNDIM}"
        return f"{prefix}{lead}{committed}{tentative}"

    def _columns(self) -> int:
        if self._width is not None:
            return self._width
        # One column spare: writing the last column makes some terminals wrap.
        return shutil.get_terminal_size(fallback=(80, 24)).columns - 1

    def _emit(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()
