"""Cross-attention alignment: which audio frame each token looks at.

Two uses (DESIGN.md section 3): the AlignAtt policy stops a partial decode at
the first token whose attention peak lies in the last frames of the audio
received so far, and word timestamps come from dynamic time warping over the
same attention (as Whisper's word-level timestamps do). Attention tensors
never leave the engine: results carry one peak frame per token and one
(start, end) frame span per token.

How the attention is read: a forward hook keeps the *query* projection's
output of each cross-attention layer that holds an alignment head; after the
decoder pass the weights of those heads are recomputed from that query and the
layer's cached cross-attention keys (``q k^T * scale``, softmax over the real
frames). That is independent of the attention implementation (eager, SDPA,
the static step), costs a few small matmuls, and reads the same numbers the
model attended with.

Heads: Whisper's published alignment heads (``generation_config.alignment_heads``,
written by the CTranslate2 conversion); other models (and Whisper checkpoints
without them) use every head of the last half of the decoder layers, unless
``[model] alignment_heads`` names them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "AttentionProbe",
    "CrossQuery",
    "cross_queries",
    "default_heads",
    "frame_samples",
    "token_spans",
]

#: Whisper's median filter width over frames before the warping (openai/whisper timing.py).
MEDFILT_WIDTH = 7


@dataclass(frozen=True, slots=True)
class CrossQuery:
    """One decoder layer's cross-attention: its query projection, heads and scale."""

    layer: int
    module: torch.nn.Module
    heads: int
    scale: float


def _decoder_layers(model: Any, family: str) -> list[Any]:
    """The decoder's layer modules, in order."""
    dec: Any = model.decoder if family == "sed" else model.model.decoder
    for path in ("layers", "model.decoder.layers", "bert.encoder.layer", "transformer.h"):
        obj: Any = dec
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            return list(obj)
    raise ValueError(f"no decoder layers found in {type(dec).__name__}")


def cross_queries(model: Any, family: str) -> list[CrossQuery]:
    """Every decoder layer's cross-attention query module (BART/Whisper, BERT, GPT-2 styles)."""
    out: list[CrossQuery] = []
    for i, layer in enumerate(_decoder_layers(model, family)):
        if (att := getattr(layer, "encoder_attn", None)) is not None:  # Whisper, BART family
            heads = int(att.num_heads)
            out.append(CrossQuery(i, att.q_proj, heads, _scale(att, heads, att.q_proj)))
        elif (att := getattr(layer, "crossattention", None)) is not None:
            if hasattr(att, "q_attn"):  # GPT-2
                heads = int(att.num_heads)
                out.append(CrossQuery(i, att.q_attn, heads, _scale(att, heads, att.q_attn)))
            else:  # BERT family
                sa = att.self
                heads = int(sa.num_attention_heads)
                out.append(CrossQuery(i, sa.query, heads, _scale(sa, heads, sa.query)))
        else:
            raise ValueError(f"decoder layer {i} ({type(layer).__name__}) has no cross-attention")
    return out


def _scale(att: Any, heads: int, query: Any) -> float:
    scale = getattr(att, "scaling", None)
    if scale is not None:
        return float(scale)
    width = int(getattr(query, "out_features", 0) or query.weight.shape[-1])
    return 1.0 / math.sqrt(width // heads)


def default_heads(model: Any, queries: Sequence[CrossQuery]) -> list[tuple[int, int]]:
    """Whisper's published alignment heads, else every head of the last half of the layers."""
    gen = getattr(model, "generation_config", None)
    published = getattr(gen, "alignment_heads", None) if gen is not None else None
    n = len(queries)
    if published:
        heads = [(int(a), int(b)) for a, b in published]
        if all(a < n and b < queries[a].heads for a, b in heads):
            return heads
    return [(q.layer, h) for q in queries[n // 2 :] for h in range(q.heads)]


def frame_samples(model: Any, family: str, feature_extractor: Any) -> int:
    """Audio samples per encoder output frame (20 ms for Whisper and wav2vec2)."""
    enc = model.get_encoder()
    if hasattr(enc, "conv1") and hasattr(enc, "conv2"):  # Whisper's encoder
        hop = int(getattr(feature_extractor, "hop_length", 160))
        return hop * int(enc.conv1.stride[0]) * int(enc.conv2.stride[0])
    strides = getattr(enc.config, "conv_stride", None)
    if strides:  # wav2vec2, HuBERT, ...
        return int(np.prod([int(s) for s in strides]))
    layers = getattr(model.config, "num_conv_layers", None)
    if family == "speech2text" and layers:
        rate = int(getattr(feature_extractor, "sampling_rate", 16000))
        return int(rate // 100 * 2 ** int(layers))
    raise ValueError(f"unknown encoder frame rate for {type(enc).__name__}")


class AttentionProbe:
    """Reads the alignment heads' attention of each decoder pass (engine thread only).

    ``capture()`` arms the hooks around one decoder pass; ``weights()`` then
    returns (B, Q, n, T) float32 attention probabilities of the n alignment
    heads for the Q positions of that pass.
    """

    def __init__(self, queries: Sequence[CrossQuery], heads: Sequence[tuple[int, int]]) -> None:
        by_layer: dict[int, list[int]] = {}
        for layer, head in heads:
            if layer >= len(queries) or not 0 <= head < queries[layer].heads:
                raise ValueError(f"alignment head ({layer}, {head}) does not exist in this model")
            by_layer.setdefault(layer, []).append(head)
        self.heads = [(layer, h) for layer in sorted(by_layer) for h in by_layer[layer]]
        self._layers = [(queries[layer], hs) for layer, hs in sorted(by_layer.items())]
        self._armed = False
        self._q: dict[int, torch.Tensor] = {}
        self._handles = [
            q.module.register_forward_hook(self._hook(q.layer)) for q, _ in self._layers
        ]

    @property
    def layers(self) -> list[int]:
        return [q.layer for q, _ in self._layers]

    def _hook(self, layer: int) -> Callable[..., None]:
        def keep(_module: Any, _inputs: Any, output: torch.Tensor) -> None:
            if self._armed:
                self._q[layer] = output

        return keep

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextmanager
    def capture(self) -> Iterator[None]:
        """Keep the queries of the passes run inside the block."""
        self._q.clear()
        self._armed = True
        try:
            yield
        finally:
            self._armed = False

    def weights(
        self,
        cross_keys: Callable[[int], torch.Tensor],
        frame_mask: torch.Tensor | None,
        queries: dict[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Attention (B, Q, n, T) of the alignment heads in the captured pass.

        ``cross_keys(layer)``: that layer's cached keys (B, H, T, Dh);
        ``frame_mask`` (B, T) bool marks real frames (None: all);
        ``queries``: per layer (B, Q, H*Dh) instead of the captured ones (the
        static step hands its own).
        """
        got = self._q if queries is None else queries
        out: list[torch.Tensor] = []
        for q, heads in self._layers:
            query = got[q.layer]
            keys = cross_keys(q.layer)
            b, n_q = query.shape[0], query.shape[1]
            qh = query.reshape(b, n_q, q.heads, -1)[:, :, heads].float()  # (B, Q, h, Dh)
            kh = keys[:, heads].float()  # (B, h, T, Dh)
            scores = torch.einsum("bqhd,bhtd->bqht", qh, kh) * q.scale
            if frame_mask is not None:
                scores = scores.masked_fill(~frame_mask[:, None, None, : scores.shape[-1]], -1e30)
            out.append(scores.softmax(dim=-1))
        self._q.clear()
        return torch.cat(out, dim=2)


def peak_frames(rows: torch.Tensor) -> list[int]:
    """Argmax over frames of the mean over heads: rows (N, n, T) -> N peaks."""
    if rows.shape[0] == 0:
        return []
    return [int(i) for i in rows.mean(dim=1).argmax(dim=-1).tolist()]


def _median_filter(x: np.ndarray, width: int) -> np.ndarray:
    """Median over a sliding window (odd ``width``) along the last axis (reflect padding).

    The ``width`` shifted copies are sorted elementwise by odd-even
    transposition (``width`` passes of min/max), then the middle one is taken:
    a few vector passes instead of np.median's copy-and-sort of every window
    (about 5x faster than np.median on a 12 s window of eight heads).
    """
    if width <= 1 or x.shape[-1] <= width // 2:
        return x
    pad = width // 2
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)], mode="reflect")
    n = x.shape[-1]
    lanes = [np.ascontiguousarray(padded[..., i : i + n]) for i in range(width)]
    spare = np.empty_like(lanes[0])
    for p in range(width):
        for i in range(p % 2, width - 1, 2):
            np.minimum(lanes[i], lanes[i + 1], out=spare)
            np.maximum(lanes[i], lanes[i + 1], out=lanes[i + 1])
            lanes[i], spare = spare, lanes[i]
    return lanes[pad]


def _dtw(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Monotonic path through ``cost`` (N, T) from (0, 0) to (N-1, T-1): (rows, cols).

    Row by row: ``D[i, j] = c[i, j] + min(D[i-1, j-1], D[i-1, j], D[i, j-1])``;
    the left dependency folds into a running minimum of ``b_j - S_{j-1}``
    (``S``: the row's prefix sums), so each row is a few numpy calls.
    """
    n, t = cost.shape
    acc = np.full((n + 1, t + 1), np.inf)
    acc[0, 0] = 0.0
    for i in range(1, n + 1):
        c = cost[i - 1]
        best_above = np.minimum(acc[i - 1, :-1], acc[i - 1, 1:])  # b_j for j = 1..t
        prefix = np.concatenate([[0.0], np.cumsum(c)])
        acc[i, 1:] = np.minimum.accumulate(best_above - prefix[:-1]) + prefix[1:]
    rows: list[int] = []
    cols: list[int] = []
    i, j = n, t
    while i > 0 and j > 0:
        rows.append(i - 1)
        cols.append(j - 1)
        diag, up, left = acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1]
        if diag <= up and diag <= left:
            i, j = i - 1, j - 1
        elif up <= left:
            i -= 1
        else:
            j -= 1
    return np.array(rows[::-1]), np.array(cols[::-1])


def token_spans(rows: torch.Tensor, audio_frames: int, tokens: int) -> list[tuple[int, int]]:
    """(start, end) frames of the first ``tokens`` rows, by warping over the audio frames.

    ``rows`` (N, n, T): one attention row per predicted token (N may be
    ``tokens + 1``: the end-of-text row then ends the last token). As
    Whisper's word timestamps: keep the audio's frames, renormalise, scale
    each head to zero mean and unit variance over the tokens, median-filter
    along frames, average the heads, and warp over the negated matrix. A
    token starts where the path enters its row and ends where the next row
    starts.
    """
    if tokens <= 0 or rows.shape[0] == 0:
        return []
    frames = max(1, min(audio_frames, rows.shape[-1]))
    w = rows[..., :frames].float().numpy().transpose(1, 0, 2)  # (n, N, T) float32
    w = w / np.maximum(w.sum(axis=-1, keepdims=True), 1e-12)
    mean = w.mean(axis=1, keepdims=True)
    std = w.std(axis=1, keepdims=True)
    w = (w - mean) / np.maximum(std, 1e-8)
    matrix = _median_filter(w, MEDFILT_WIDTH).mean(axis=0)  # (N, T)
    path_rows, path_cols = _dtw(-matrix)
    starts = np.full(matrix.shape[0] + 1, frames, dtype=np.int64)
    for r, c in zip(path_rows.tolist(), path_cols.tolist(), strict=True):
        if starts[r] == frames:
            starts[r] = c
    # Every row is entered (the path is monotonic and covers each row).
    last_end = int(path_cols[path_rows == min(tokens, matrix.shape[0]) - 1].max()) + 1
    spans: list[tuple[int, int]] = []
    for k in range(min(tokens, matrix.shape[0])):
        start = int(starts[k])
        end = int(starts[k + 1]) if k + 1 < matrix.shape[0] else last_end
        spans.append((start, max(end, start)))
    return spans
