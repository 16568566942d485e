"""The bytes each generated token contributes to the text.

The core assembles text from byte pieces so that it can stop at complete
UTF-8 characters. Byte-level BPE vocabularies (Whisper, GPT-2) map each token
to raw bytes directly; for other tokenizers (WordPiece, SentencePiece, word
level) a token's piece is what it adds to the decoded text of the sequence
before it, which also carries the spaces those tokenizers insert.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode table."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", []) or []}
    return "ByteLevel" in kinds


class TokenPieces:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.byte_level = _is_byte_level(tokenizer)
        self.special = set(tokenizer.all_special_ids)
        for tid, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
            if getattr(added, "special", False):
                self.special.add(int(tid))
        self._cache: dict[int, bytes] = {}

    def _byte_piece(self, tid: int) -> bytes:
        piece = self._cache.get(tid)
        if piece is None:
            if tid in self.special:
                piece = b""
            else:
                token = self.tokenizer.convert_ids_to_tokens(tid)
                table = _byte_decoder()
                if token is None:
                    piece = b""
                elif all(ch in table for ch in token):
                    piece = bytes(table[ch] for ch in token)
                else:  # an added non-special token stored as plain text
                    piece = token.encode("utf-8")
            self._cache[tid] = piece
        return piece

    def _decode(self, ids: list[int]) -> bytes:
        text: str = self.tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        return text.encode("utf-8")

    def pieces(self, forced: list[int], new: list[int]) -> list[bytes]:
        """Bytes of each token of ``new``, in the context of the ``forced`` tokens."""
        if self.byte_level:
            return [self._byte_piece(t) for t in new]
        out: list[bytes] = []
        prev = self._decode(forced)
        seq = list(forced)
        for tid in new:
            seq.append(tid)
            cur = self._decode(seq)
            if cur.startswith(prev):
                out.append(cur[len(prev) :])
            else:  # the tokenizer rewrote earlier text: attribute nothing to this token
                out.append(b"")
            prev = cur
        return out


def find_loop(tokens: list[int], min_span: int = 16, max_period: int = 64) -> int | None:
    """Index where a trailing repetition loop starts, or None.

    A loop is the same n-gram repeated back to back at the end: one token six
    times, or an n-gram (n <= ``max_period``) repeated until the repeats cover
    ``min_span`` tokens (at least twice). Real speech repeats short phrases
    ("New York, New York") but not a 16-token stretch; decoders that run past
    the audio (a random model, Whisper on a shortened input) do. The index
    returned keeps one occurrence of the repeated n-gram.
    """
    n_tok = len(tokens)
    for period in range(1, min(max_period, n_tok // 2) + 1):
        reps = 1
        while (reps + 1) * period <= n_tok and (
            tokens[n_tok - (reps + 1) * period : n_tok - reps * period]
            == tokens[n_tok - period : n_tok]
        ):
            reps += 1
        need = 6 if period == 1 else max(2, -(-min_span // period))
        if reps >= need:
            return n_tok - (reps - 1) * period
    return None
