"""LocalAgreement-n stabilisation of consecutive hypotheses.

Each hypothesis of a segment is decoded with the tokens committed so far as a
forced prefix, so it arrives as ``committed + new``. The longest common prefix
of the last ``n`` new-token tails is committed; what follows is tentative.
Committed tokens only ever grow (append-only); ``n == 0`` turns commits off,
so that a segment's final is the plain greedy decode of its audio.
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


class LocalAgreement:
    """Commits the prefix that ``n`` consecutive hypotheses agree on."""

    def __init__(self, n: int = 2) -> None:
        if n < 0:
            raise ValueError("agreement n must be >= 0")
        self.n = n
        self._committed: list[int] = []
        self._tails: deque[tuple[int, ...]] = deque(maxlen=max(n, 1))
        self._tentative: tuple[int, ...] = ()

    @property
    def committed(self) -> tuple[int, ...]:
        return tuple(self._committed)

    @property
    def tentative(self) -> tuple[int, ...]:
        return self._tentative

    def update(
        self, new_tokens: Sequence[int], boundaries: Sequence[bool] | None = None
    ) -> tuple[int, ...]:
        """Take the tokens generated after the committed prefix; return newly committed ones.

        ``boundaries[j]`` says whether a commit may end after the first ``j``
        tokens (a word boundary); the agreed prefix is shortened to the last
        boundary, so a half word is never committed. Default: anywhere.
        """
        tail = tuple(new_tokens)
        if self.n == 0:
            self._tentative = tail
            return ()
        self._tails.append(tail)
        newly: tuple[int, ...] = ()
        if len(self._tails) >= self.n:
            k = common_prefix_length(list(self._tails))
            if boundaries is not None:
                while k > 0 and not boundaries[k]:
                    k -= 1
            if k:
                newly = tail[:k]
                self._committed.extend(newly)
                # Keep the remaining tails aligned to the new committed point.
                kept = [t[k:] for t in self._tails]
                self._tails.clear()
                self._tails.extend(kept)
        self._tentative = tail[len(newly) :]
        return newly

    def forget_tails(self, tentative: Sequence[int]) -> None:
        """Drop the hypotheses awaiting agreement (a looping decode must not vote)."""
        self._tails.clear()
        self._tentative = tuple(tentative)

    def reset(self) -> None:
        """Start a new segment."""
        self._committed.clear()
        self._tails.clear()
        self._tentative = ()
