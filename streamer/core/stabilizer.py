"""Stabilisation policies: LocalAgreement-n and AlignAtt.

LocalAgreement-n:

Each hypothesis of a segment is decoded with the tokens committed so far as a
forced prefix, so it arrives as ``committed + new``. The longest common prefix
of the last ``n`` new-token tails is committed; what follows is tentative.
Committed tokens only ever grow (append-only); ``n == 0`` turns commits off,
so that a segment's final is the plain greedy decode of its audio.

AlignAtt (Papi et al., 2023): the engine stops a partial decode at the first
token whose cross-attention peak lies in the last ``frames`` encoder frames of
the audio received so far (that token is returned too); the tokens before it
are committed at once, shortened to a word boundary. The cut-off word stays
tentative; nothing after the stop is shown. No waiting for agreement.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence


def common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest prefix shared by every sequence."""
    if not seqs:
        return 0
    n = min(len(s) for s in seqs)
    for i in range(n):
        first = seqs[0][i]
        if any(s[i] != first for s in seqs[1:]):
            return i
    return n


def attends_late(peak: int, audio_frames: int, frames: int) -> bool:
    """AlignAtt's rule: a token whose attention peak lies in the last ``frames`` of the
    ``audio_frames`` received so far (or after them) waits for more audio. The engine
    stops a partial decode there, the session commits what came before."""
    return peak >= audio_frames - frames


class _Votes:
    """Committed tokens and the hypotheses still voting on what comes next."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._committed: list[int] = []
        self._votes: deque[tuple[int, ...]] = deque(maxlen=max(n, 1))
        self._tentative: tuple[int, ...] = ()

    @property
    def committed(self) -> tuple[int, ...]:
        return tuple(self._committed)

    @property
    def tentative(self) -> tuple[int, ...]:
        return self._tentative

    def _vote(
        self, vote: tuple[int, ...], tail: tuple[int, ...], boundaries: Sequence[bool] | None
    ) -> tuple[int, ...]:
        """Add ``vote``; once ``n`` voted, commit their common prefix (of ``tail``),
        shortened to the last word boundary, and realign the votes after it."""
        self._votes.append(vote)
        if len(self._votes) < self.n:
            return ()
        k = common_prefix_length(list(self._votes))
        if boundaries is not None:
            while k > 0 and not boundaries[k]:
                k -= 1
        if not k:
            return ()
        newly = tail[:k]
        self._committed.extend(newly)
        kept = [v[k:] for v in self._votes]
        self._votes.clear()
        self._votes.extend(kept)
        return newly

    def forget_tails(self, tentative: Sequence[int]) -> None:
        """Drop the votes (a looping decode must not vote); show ``tentative``."""
        self._votes.clear()
        self._tentative = tuple(tentative)

    def reset(self) -> None:
        """Start a new segment."""
        self._committed.clear()
        self._votes.clear()
        self._tentative = ()


class LocalAgreement(_Votes):
    """Commits the prefix that ``n`` consecutive hypotheses agree on."""

    def __init__(self, n: int = 2) -> None:
        if n < 0:
            raise ValueError("agreement n must be >= 0")
        super().__init__(n)

    def update(
        self, new_tokens: Sequence[int], boundaries: Sequence[bool] | None = None
    ) -> tuple[int, ...]:
        """Take the tokens generated after the committed prefix; return newly committed ones.

        ``boundaries[j]`` says whether a commit may end after the first ``j``
        tokens (a word boundary); the agreed prefix is shortened to the last
        boundary, so a half word is never committed. Default: anywhere.
        """
        tail = tuple(new_tokens)
        newly = self._vote(tail, tail, boundaries) if self.n else ()
        self._tentative = tail[len(newly) :]
        return newly


class AlignAtt(_Votes):
    """Commits what the decoder wrote before its attention reached the newest audio.

    ``n`` > 1 also asks the last ``n`` hypotheses to agree on it (their tokens
    before their stops): a short first window can make Whisper transcribe
    where it was asked to translate, and one such hypothesis would commit the
    wrong language at once (measured: README, "Streaming policies").
    """

    def __init__(self, frames: int, n: int = 1) -> None:
        if frames < 1:
            raise ValueError("alignatt frames must be >= 1")
        if n < 1:
            raise ValueError("alignatt agreement n must be >= 1")
        super().__init__(n)
        self.frames = frames

    def stop_index(self, peaks: Sequence[int], audio_frames: int) -> int:
        """Index of the first token attending to the last ``frames`` frames (else the end)."""
        for i, peak in enumerate(peaks):
            if attends_late(peak, audio_frames, self.frames):
                return i
        return len(peaks)

    def update(
        self,
        new_tokens: Sequence[int],
        boundaries: Sequence[bool],
        peaks: Sequence[int],
        audio_frames: int,
    ) -> tuple[int, ...]:
        """Take the tokens after the committed prefix and their peaks; return newly committed.

        Without one peak per token nothing is committed (the engine could not
        read the attention).
        """
        tail = tuple(new_tokens)
        if len(peaks) != len(tail):
            self._tentative = tail
            return ()
        stop = self.stop_index(peaks, audio_frames)
        newly = self._vote(tail[:stop], tail, boundaries)
        self._tentative = tail[len(newly) : stop]
        return newly
