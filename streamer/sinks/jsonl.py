"""JSON Lines output: captions for programs.

JSONL: one event per line, the wire object of DESIGN.md section 4
(``Hypothesis.to_wire()``), translation targets' events included (their
``target`` field tells them apart), UTF-8 kept as is (``ensure_ascii=False``) so a
``jq`` or ``grep`` user sees the words. ``-`` means stdout; a path is opened
once in append mode, so a restarted daemon continues the same log.

File writes run in a worker thread (``asyncio.to_thread``): a slow disk or a
full pipe delays the sink, never the event loop. Events that arrive while a
write is in flight are written together in the next batch, so the thread hop
is paid per batch, not per line. Each batch is flushed before the next read.

Subtitle files (SRT, WebVTT) are ``subtitles.py``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import TextIO

from streamer.sinks.fanout import STATUS_KINDS, Subscription, SubscriptionClosed
from streamer.sinks.targets import TargetSelection
from streamer.types import Hypothesis

__all__ = ["JsonlSink", "format_event"]

# Upper bound on lines per worker-thread write, so one huge backlog does not
# turn into one huge string.
_BATCH_MAX = 256


def format_event(event: Hypothesis) -> str:
    """One JSONL line (without newline) for ``event``."""
    return json.dumps(event.to_wire(), ensure_ascii=False)


class JsonlSink:
    """Appends caption events to a JSONL file, or writes them to stdout for ``-``.

    ``stdout`` replaces ``sys.stdout`` for ``-`` (tests, embedding).
    """

    def __init__(
        self,
        path_or_dash: str,
        partials: bool = True,
        *,
        stdout: TextIO | None = None,
    ) -> None:
        self.target = path_or_dash
        self.partials = partials
        self._stdout = stdout
        self.lines = 0

    @property
    def kinds(self) -> frozenset[str]:
        """The event kinds to subscribe with."""
        kinds = {"partial", "final"} if self.partials else {"final"}
        return frozenset(kinds) | STATUS_KINDS

    @property
    def targets(self) -> TargetSelection:
        """The languages to subscribe with: all (each event says its ``target``)."""
        return None

    async def run(self, sub: Subscription) -> None:
        """Write events from ``sub`` until it closes; the file is closed at the end.

        If writing fails the error propagates and ``sub`` is closed, so the
        fanout stops queueing for a consumer that is gone.
        """
        try:
            out = await self._open()
        except BaseException:
            sub.close("jsonl sink stopped")
            raise
        try:
            while True:
                try:
                    first = await sub.get()
                except SubscriptionClosed:
                    break
                batch = [first]
                # Take what else is queued now; at the end of a closed queue stop
                # here, so the next get() marks the subscription drained only
                # after this batch is on disk.
                while len(batch) < _BATCH_MAX and sub.pending:
                    batch.append(sub.get_nowait())
                lines = [format_event(e) + "\n" for e in batch if self._wants(e)]
                if lines:
                    await asyncio.to_thread(_write_flush, out, "".join(lines))
                    self.lines += len(lines)
        finally:
            sub.close("jsonl sink stopped")  # no-op after a normal end
            if self.target != "-":
                await asyncio.to_thread(out.close)

    def _wants(self, event: Hypothesis) -> bool:
        return self.partials or event.kind == "final"

    async def _open(self) -> TextIO:
        if self.target == "-":
            return self._stdout if self._stdout is not None else sys.stdout
        return await asyncio.to_thread(_open_append, self.target)


def _open_append(path: str) -> TextIO:
    return open(path, "a", encoding="utf-8", newline="\n")  # closed by JsonlSink.run


def _write_flush(out: TextIO, text: str) -> None:
    out.write(text)
    out.flush()
