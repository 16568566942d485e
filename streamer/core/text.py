"""Turning token bytes into text that never ends in a broken character.

Byte-level tokenizers (Whisper, GPT-2) can split one UTF-8 character over two
tokens; text only leaves the core at complete characters.
"""

from __future__ import annotations

import codecs


def complete_utf8(data: bytes) -> tuple[str, int]:
    """Decode the complete characters of ``data``: (text, bytes consumed).

    Invalid bytes in the middle become U+FFFD; an incomplete character at the
    end is left unconsumed.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text = decoder.decode(data, final=False)
    pending, _ = decoder.getstate()
    return text, len(data) - len(pending)


def render(committed: bytes, tentative: bytes) -> tuple[str, str]:
    """Display text of a partial: (committed, tentative), leading space removed.

    The committed string only covers complete characters of the committed
    bytes, so it grows append-only as more tokens are committed.
    """
    committed_text = complete_utf8(committed)[0].lstrip()
    full = complete_utf8(committed + tentative)[0].lstrip()
    return committed_text, full[len(committed_text) :]


_CLOSING = frozenset(b".,;:!?)]}\"'")


def word_boundaries(pieces: list[bytes]) -> list[bool]:
    """``out[j]``: may a commit end after the first ``j`` of these token pieces?

    Yes before a piece that starts a word (leading white space), after
    closing punctuation, and around CJK text (no spaces between words); never
    inside a UTF-8 character or a word. ``out[len(pieces)]`` is False: the
    last token's word may still grow.
    """
    out = [True]
    for j in range(1, len(pieces)):
        nxt, prev = pieces[j], pieces[j - 1]
        out.append(
            not nxt
            or nxt[:1].isspace()
            or (bool(prev) and prev[-1] in _CLOSING)
            or nxt[0] >= 0xE3  # lead byte of CJK and other scripts written without spaces
        )
    if pieces:
        out.append(False)
    return out
