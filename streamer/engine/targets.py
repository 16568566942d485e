"""One window, several output languages: a request's target rows inside the batch runner.

A request with ``target_rows`` (``MultiTargetSession``: a decoder that picks
its language by a start token) is one scheduler job, but several decoder
rows. :class:`TargetRows` turns it into rows right after its window was
encoded: the request itself and one child :class:`Job` per target, every
child holding the *same* ``EncodedWindow`` (one encoder pass, no copy). The
children are prefilled and decoded like any other job, batched with
everything else in the step (their start tokens carry their target's
language token); the answer goes back only when all rows of the request have
finished, as one ``DecodeResult`` whose ``targets`` holds each child's.

A target whose row would be the request's own (same start tokens, prompt,
forced tokens and cap: the configured language asked for again) is not
decoded twice: it gets the request's result.

Children are the runner's business only: the scheduler, the engine's
callbacks and its failure handling see the parent job alone (children are
never ``running`` in the scheduler's sense, so a failed step fails the parent
once), and dropping a parent drops its children.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field

from streamer.core.session import DecodeRequest, DecodeResult
from streamer.engine.decoding import Decoder, EncodedWindow
from streamer.engine.scheduler import Job

__all__ = ["TargetRows"]


@dataclass(slots=True, eq=False)
class _Request:
    """A job with target rows, until every row has its answer."""

    parent: Job
    children: list[Job] = field(default_factory=list)
    shared: list[str] = field(default_factory=list)  # targets answered by the parent's row
    own: DecodeResult | None = None
    answers: dict[str, DecodeResult] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.own is not None and len(self.answers) == len(self.children)

    def result(self) -> DecodeResult:
        own = self.own
        assert own is not None
        answers = {**{t: own for t in self.shared}, **self.answers}
        ordered = {r.target or "": answers[r.target or ""] for r in self.parent.req.target_rows}
        return dataclasses.replace(own, targets=ordered)


class TargetRows:
    """Expands jobs with target rows into rows, and gathers their answers (engine thread)."""

    def __init__(self, decoder: Decoder) -> None:
        self.d = decoder
        self._requests: dict[int, _Request] = {}  # by id(parent)
        self._child_of: dict[int, _Request] = {}  # by id(child)

    def expand(self, encoded: list[tuple[Job, EncodedWindow]]) -> list[tuple[Job, EncodedWindow]]:
        """``encoded`` with a child job per target row, sharing its parent's encoder states."""
        out: list[tuple[Job, EncodedWindow]] = []
        for job, enc in encoded:
            out.append((job, enc))
            req = job.req
            if not req.target_rows:
                continue
            entry = self._requests[id(job)] = _Request(job)
            own = self._key(req)
            for row in req.target_rows:
                target = row.target or ""
                if self._key(row) == own:
                    entry.shared.append(target)
                    continue
                child = Job(row, job.submitted)
                entry.children.append(child)
                self._child_of[id(child)] = entry
                out.append((child, enc))
        return out

    def _key(self, req: DecodeRequest) -> tuple[object, ...]:
        """What decides a row's tokens (besides the window, shared by all rows)."""
        start = self.d.start_tokens(req.prompt, req.lang, req.task, req.target)
        return (tuple(start), req.forced, req.max_new_tokens, req.alignatt_frames, req.words)

    def gather(self, done: list[tuple[Job, DecodeResult]]) -> list[tuple[Job, DecodeResult]]:
        """Finished rows in, finished requests out (a parent once all its rows are in)."""
        out: list[tuple[Job, DecodeResult]] = []
        for job, result in done:
            entry = self._child_of.pop(id(job), None)
            if entry is not None:
                entry.answers[job.req.target or ""] = result
            else:
                entry = self._requests.get(id(job))
                if entry is None:
                    out.append((job, result))
                    continue
                entry.own = result
            if entry.complete:
                del self._requests[id(entry.parent)]
                out.append((entry.parent, entry.result()))
        return out

    def with_children(self, jobs: Iterable[Job]) -> list[Job]:
        """``jobs`` and the rows of their targets (dropping a request drops them all);
        they are forgotten here."""
        out: list[Job] = []
        for job in jobs:
            out.append(job)
            entry = self._requests.pop(id(job), None)
            if entry is not None:
                for child in entry.children:
                    self._child_of.pop(id(child), None)
                    out.append(child)
        return out

    def clear(self, jobs: list[Job]) -> list[Job]:
        """Forget every request (a failed step): ``jobs`` without target rows, with the
        requests whose own row had finished before."""
        children = set(self._child_of)
        out = [job for job in jobs if id(job) not in children]
        listed = {id(job) for job in out}
        out += [e.parent for key, e in self._requests.items() if key not in listed]
        self._requests.clear()
        self._child_of.clear()
        return out
