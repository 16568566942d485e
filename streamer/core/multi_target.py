"""Captions in several languages from the speech decode itself (no text cascade).

An SED whose decoder picks its output language by a token (such as
facebook/wav2vec2-xls-r-300m-en-to-15: an mBART-50 decoder started with
``de_DE``, ``fr_XX``...) needs no translation model for more targets: the
window is encoded once and decoded once more per target, each row started
with its target's language token. ``MultiTargetSession`` is the
``StreamSession`` of such a stream.

Semantics (DESIGN.md section 3, per target):

- The *source* is what it always was: the decode into the configured
  ``[model] target_language``. Its events are unchanged, and it alone drives
  the stream: segmentation, windows, when a partial or final is requested,
  the catch-up merging of waiting segments and the unprompted retry of a
  final cut short are decided on the source as before.
- Every request of the source carries one more row per target
  (``DecodeRequest.target_rows``): the same window, but that target's own
  prompt (its previous finals) and forced tokens (its committed tokens in the
  segment). The engine answers all rows in one result
  (``DecodeResult.targets``).
- Each target keeps its own stabiliser state per segment (a ``TargetTrack``:
  LocalAgreement or AlignAtt, committed pieces, words), so a target's
  committed text is append-only and its final is its last window forced with
  its committed tokens, exactly as for the source. Its events carry
  ``target``, follow the source event of the same request in the stream's
  ``seq``, and share its segment, times and ``lang``.

Why not one ``StreamSession`` per target: sessions decide their windows from
their own in-flight state and results, so they would drift apart and the
windows could no longer share an encoder pass; here one decision serves all.
"""

from __future__ import annotations

import dataclasses
from collections import deque

from streamer.core.session import (
    DecodeRequest,
    DecodeResult,
    SessionSettings,
    StreamSession,
    TargetTrack,
    _Segment,
)

__all__ = ["MultiTargetSession"]


class MultiTargetSession(StreamSession):
    """A ``StreamSession`` whose every window is also decoded into ``targets``."""

    def __init__(
        self,
        stream: str,
        settings: SessionSettings,
        targets: tuple[str, ...],
        *,
        seq_after: int = 0,
        first_segment: int = 0,
    ) -> None:
        super().__init__(stream, settings, seq_after=seq_after, first_segment=first_segment)
        self.targets = tuple(dict.fromkeys(targets))
        size = max(settings.prompt_max_tokens, 1)
        self._histories: dict[str, deque[int]] = {t: deque(maxlen=size) for t in self.targets}

    def _track(self, seg: _Segment, target: str) -> TargetTrack:
        track = seg.targets.get(target)
        if track is None:
            track = seg.targets[target] = TargetTrack(self._new_agreement())
        return track

    def _with_rows(self, req: DecodeRequest, seg: _Segment, prompted: bool) -> DecodeRequest:
        """One row per target: the source's window, the target's prompt and commits."""
        rows = []
        window = req.end - req.start
        for target in self.targets:
            forced = self._track(seg, target).agreement.committed
            prompt = tuple(self._histories[target]) if prompted and self.s.prompt_max_tokens else ()
            rows.append(
                dataclasses.replace(
                    req,
                    prompt=prompt,
                    forced=forced,
                    max_new_tokens=self.s.max_new_tokens(window, len(forced)),
                    supersedes=None,
                    target=target,
                )
            )
        return dataclasses.replace(req, target_rows=tuple(rows))

    def _apply_partial(self, seg: _Segment, req: DecodeRequest, result: DecodeResult) -> None:
        super()._apply_partial(seg, req, result)
        if seg is not self._open:
            return
        for target in self.targets:
            answer = result.targets.get(target)
            if answer is not None and answer.error is None:
                self._stabilise(seg, self._track(seg, target), req, answer, target)

    def _emit_final(self, seg: _Segment, result: DecodeResult, req: DecodeRequest) -> None:
        super()._emit_final(seg, result, req)
        for target in self.targets:
            answer = result.targets.get(target)
            if answer is None:  # the request failed: the target's committed text stands
                error = result.error or "no result for this target"
                answer = DecodeResult(result.request_id, (), (), error=error)
            track = self._track(seg, target)
            self._final_event(seg, track, answer, req, self._histories[target], target)
