"""Word timestamps from the engine's per-token frame spans.

The engine warps each decode's cross-attention over the window's encoder
frames and returns one (start, end) frame span per token (forced tokens
first); here tokens are grouped into words and frames become stream seconds.
A word starts at a token whose bytes begin with white space (the model's own
word separator) or at a character of a script written without spaces;
punctuation and word pieces join the word before them.
"""

from __future__ import annotations

from collections.abc import Sequence

from streamer.core.text import complete_utf8
from streamer.types import Word

_NO_SPACE_SCRIPTS = 0xE3  # UTF-8 lead bytes of CJK and other scripts without spaces


def _starts_word(piece: bytes) -> bool:
    return piece[:1].isspace() or piece[0] >= _NO_SPACE_SCRIPTS


def words_of(
    pieces: Sequence[bytes],
    spans: Sequence[tuple[int, int]],
    *,
    offset: int,
    frame_samples: int,
    sample_rate: int,
    limit: int | None = None,
) -> tuple[Word, ...]:
    """Words of ``pieces`` timed by ``spans`` (frames from sample ``offset``).

    ``limit``: the last sample the words may reach (the window's end).
    Tokens without bytes (special tokens) are skipped; a word whose bytes do
    not yet form a complete character is left out.
    """
    if len(spans) < len(pieces) or frame_samples <= 0:
        return ()
    groups: list[tuple[bytearray, int, int]] = []
    for piece, (first, last) in zip(pieces, spans, strict=False):
        if not piece:
            continue
        if not groups or _starts_word(piece):
            groups.append((bytearray(piece), first, last))
        else:
            data, start, _ = groups[-1]
            data.extend(piece)
            groups[-1] = (data, start, last)
    out: list[Word] = []
    for data, first, last in groups:
        text, used = complete_utf8(bytes(data))
        if used != len(data) or not text.strip():
            continue
        start = offset + first * frame_samples
        end = offset + last * frame_samples
        if limit is not None:
            start, end = min(start, limit), min(end, limit)
        out.append(Word(text, start / sample_rate, end / sample_rate))
    return tuple(out)
