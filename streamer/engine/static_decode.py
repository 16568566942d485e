"""Optional decode step over a static KV cache, compiled with ``torch.compile``.

``[engine] compile = true`` turns it on. Why: the dynamic path (``runner.py``)
grows ``DynamicCache`` tensors by concatenation every step and changes the
batch shape whenever a row joins or leaves, so nothing can be compiled or
captured. Here running rows live in the *slots* of preallocated buffers and a
step writes one column in place: the one-token pass is a function of tensors
whose shapes change only between buckets, compiled once per bucket
(``dynamic=False``) and, on CUDA, captured as CUDA graphs
(``mode="reduce-overhead"``), which removes the kernel launch overhead that
dominates small-batch decoding on a GPU.

Layout (one :class:`StaticDecoder` per runner holds every row it serves):
  * S slots (a power of two, at most ``max_rows``); per layer self-attention
    K/V (S, H, L, Dh) and cross-attention K/V (S, H, T, Dh); L and T are powers
    of two >= 64 (T capped at the encoder's frames); boolean ``mask`` (S, L)
    and ``cmask`` (S, T) mark real tokens and frames;
  * every live row ends at the shared write column ``col`` (right-aligned, as
    the dynamic path left-pads): a step writes column ``col`` of every slot;
    position ids are per row;
  * a joining row is prefilled on the dynamic path, then its K/V are copied
    into a free slot, ending at ``col``; a leaving row frees its slot (masked);
  * when ``col`` reaches L, a joiner's prefix is longer than ``col``, rows
    outnumber slots or frames outgrow T, a *relayout* moves the rows to end at
    column ``need`` (the longest row): within a bucket the columns shift in
    place (compaction of the common left padding), else the rows move to the
    buffers of the bucket that fits (slots and frames shrink only below 1/4).

The step runs the model's own modules (projections, norms, MLPs) with
``scaled_dot_product_attention`` and in-place ``index_copy_`` writes, for
Whisper (and the SED with Whisper's decoder), BERT and GPT-2 decoders; other
families and beam search keep the dynamic path (one log line). At most
``MAX_COMPILED_SHAPES`` buckets are compiled, each compile logged with its
time; later buckets, and every bucket without ``compile``, run the same step
eagerly. Measured on the 2-core CPU with Whisper base
(``results/benchmark-whisper-base-cpu-compile.json``): a cold compile takes
8-25 s per bucket (1-9 s from a warm inductor cache) and stalls every stream
(final latency p95 23-34 s against 1.6-1.8 s) for a decode step about 10 %
faster (25 against 28 ms for one row), so the default stays off; a GPU is
where it may pay.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from streamer.engine.decoding import project
from streamer.engine.whisper_sed import DECODER_MODEL_TYPE

if TYPE_CHECKING:
    from streamer.engine.decoding import Decoder
    from streamer.engine.scheduler import Job

__all__ = ["MAX_COMPILED_SHAPES", "StaticDecoder", "make_static"]

log = logging.getLogger(__name__)

#: Shape buckets (slots, length, frames) compiled per decoder; later ones run eagerly.
MAX_COMPILED_SHAPES = 12
_MIN_LEN = 64  # smallest self-attention length bucket
_HEADROOM = 16  # free columns a relayout leaves at least, before the next one
_MIN_FRAMES = 64
_logged: set[str] = set()


def _log_once(key: str, msg: str, *args: object) -> None:
    if key not in _logged:
        _logged.add(key)
        log.info(msg, *args)


def _pow2(n: int, low: int) -> int:
    size = low
    while size < n:
        size *= 2
    return size


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(S, 1, H*Dh) -> (S, H, 1, Dh)."""
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Attention of one query per row under a boolean mask; back to (S, 1, H*Dh)."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


class _Arch:
    """One decoder family's one-token pass over the slot buffers."""

    layers: int
    heads: int
    head_dim: int
    probe_layers: tuple[int, ...] = ()  # layers whose cross-attention queries forward returns

    def embed(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def layer(
        self, i: int, h: torch.Tensor, kv: _LayerKV, queries: list[torch.Tensor]
    ) -> torch.Tensor:
        """One layer's pass; appends its cross-attention query projection to ``queries``."""
        raise NotImplementedError

    def head(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self,
        ids: torch.Tensor,  # (S, 1) each slot's input token
        pos: torch.Tensor,  # (S, 1) its position id
        mask: torch.Tensor,  # (S, L) bool, updated in place (column col)
        cmask: torch.Tensor,  # (S, T) bool
        col: torch.Tensor,  # (1,) long: the write column
        sk: Sequence[torch.Tensor],  # per layer (S, H, L, Dh), written in place
        sv: Sequence[torch.Tensor],
        ck: Sequence[torch.Tensor],  # per layer (S, H, T, Dh)
        cv: Sequence[torch.Tensor],
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Logits (S, V) in float32 and the cross-attention queries (S, 1, H*Dh) of
        ``probe_layers`` (alignment heads, read by the runner); writes this token's
        K/V at ``col``."""
        mask.index_fill_(1, col, True)
        smask = mask[:, None, None, :]
        xmask = cmask[:, None, None, :]
        h = self.embed(ids, pos)
        queries: list[torch.Tensor] = []
        for i in range(self.layers):
            h = self.layer(i, h, (sk[i], sv[i], ck[i], cv[i], smask, xmask, col), queries)
        return self.head(h)[:, -1, :].float(), tuple(queries[i] for i in self.probe_layers)


#: One layer's step state: (self K, self V, cross K, cross V, self mask, cross mask, col).
_LayerKV = tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]


def _self_attend(
    kv: _LayerKV, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Write this token's K/V at the write column, then attend over the slot's row."""
    sk, sv, _, _, smask, _, col = kv
    sk.index_copy_(2, col, k)
    sv.index_copy_(2, col, v)
    return _attend(q, sk, sv, smask, scale)


def _cross_attend(kv: _LayerKV, q: torch.Tensor, scale: float) -> torch.Tensor:
    return _attend(q, kv[2], kv[3], kv[5], scale)


class _Whisper(_Arch):
    """``WhisperDecoder`` (pre-norm; q scaled before attention, as its attention does)."""

    def __init__(self, dec: Any, head: Any) -> None:
        self.dec, self.out = dec, head
        self.layers = len(dec.layers)
        attn = dec.layers[0].self_attn
        self.heads, self.head_dim = attn.num_heads, attn.head_dim

    def embed(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.dec.embed_tokens(ids) + self.dec.embed_positions.weight[pos]  # type: ignore[no-any-return]

    def layer(
        self, i: int, h: torch.Tensor, kv: _LayerKV, queries: list[torch.Tensor]
    ) -> torch.Tensor:
        layer = self.dec.layers[i]
        sa, ea, n = layer.self_attn, layer.encoder_attn, self.heads
        x = layer.self_attn_layer_norm(h)
        q = _heads(sa.q_proj(x) * sa.scaling, n)
        a = _self_attend(kv, q, _heads(sa.k_proj(x), n), _heads(sa.v_proj(x), n), 1.0)
        h = h + sa.out_proj(a)
        x = layer.encoder_attn_layer_norm(h)
        queries.append(ea.q_proj(x))
        h = h + ea.out_proj(_cross_attend(kv, _heads(queries[-1] * ea.scaling, n), 1.0))
        x = layer.activation_fn(layer.fc1(layer.final_layer_norm(h)))
        return h + layer.fc2(x)  # type: ignore[no-any-return]

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return project(self.out, self.dec.layer_norm(h)[:, -1, :])[:, None, :]


class _Bert(_Arch):
    """``BertLMHeadModel`` as a decoder (post-norm, absolute positions, token type 0)."""

    def __init__(self, lm: Any) -> None:
        self.lm = lm
        self.layers = len(lm.bert.encoder.layer)
        attn = lm.bert.encoder.layer[0].attention.self
        self.heads, self.head_dim = attn.num_attention_heads, attn.attention_head_size

    def embed(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        emb = self.lm.bert.embeddings
        x = emb.word_embeddings(ids) + emb.token_type_embeddings(torch.zeros_like(ids))
        return emb.LayerNorm(x + emb.position_embeddings(pos))  # type: ignore[no-any-return]

    def layer(
        self, i: int, h: torch.Tensor, kv: _LayerKV, queries: list[torch.Tensor]
    ) -> torch.Tensor:
        layer = self.lm.bert.encoder.layer[i]
        sa, ca, n = layer.attention.self, layer.crossattention.self, self.heads
        q = _heads(sa.query(h), n)
        a = _self_attend(kv, q, _heads(sa.key(h), n), _heads(sa.value(h), n), sa.scaling)
        h = layer.attention.output(a, h)
        queries.append(ca.query(h))
        a = _cross_attend(kv, _heads(queries[-1], n), ca.scaling)
        h = layer.crossattention.output(a, h)
        return layer.output(layer.intermediate(h), h)  # type: ignore[no-any-return]

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm.cls(h)  # type: ignore[no-any-return]


class _GPT2(_Arch):
    """``GPT2LMHeadModel`` with cross-attention (pre-norm, Conv1D projections)."""

    def __init__(self, lm: Any) -> None:
        self.lm = lm
        self.tr = lm.transformer
        self.layers = len(self.tr.h)
        attn = self.tr.h[0].attn
        self.heads, self.head_dim = attn.num_heads, attn.head_dim
        self.width = attn.split_size

    def embed(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.tr.wte(ids) + self.tr.wpe(pos)  # type: ignore[no-any-return]

    def layer(
        self, i: int, h: torch.Tensor, kv: _LayerKV, queries: list[torch.Tensor]
    ) -> torch.Tensor:
        block = self.tr.h[i]
        sa, ca, n = block.attn, block.crossattention, self.heads
        q, k, v = sa.c_attn(block.ln_1(h)).split(self.width, dim=2)
        a = _self_attend(kv, _heads(q, n), _heads(k, n), _heads(v, n), sa.scaling)
        h = sa.c_proj(a) + h
        queries.append(ca.q_attn(block.ln_cross_attn(h)))
        a = _cross_attend(kv, _heads(queries[-1], n), ca.scaling)
        h = h + ca.c_proj(a)
        return h + block.mlp(block.ln_2(h))  # type: ignore[no-any-return]

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return project(self.lm.lm_head, self.tr.ln_f(h)[:, -1, :])[:, None, :]


def _arch(decoder: Decoder) -> tuple[_Arch | None, str]:
    """The static step for this model, or None and why not."""
    m = decoder.m
    model = m.model
    if decoder.num_beams > 1:
        return None, "beam search"
    if m.family == "whisper":
        dec = model.model.decoder
        return _Whisper(dec, model.get_output_embeddings()), ""
    if m.family != "sed":
        return None, f"family {m.family}"
    lm = model.decoder
    cfg = lm.config
    kind = getattr(cfg, "model_type", "")
    if not (getattr(cfg, "add_cross_attention", False) or kind == DECODER_MODEL_TYPE):
        return None, f"{kind} decoder without cross-attention"
    if kind == DECODER_MODEL_TYPE:
        return _Whisper(lm.model.decoder, lm.get_output_embeddings()), ""
    if kind == "bert" and getattr(cfg, "position_embedding_type", "absolute") == "absolute":
        return _Bert(lm), ""
    if kind == "gpt2" and not getattr(cfg, "reorder_and_upcast_attn", False):
        return _GPT2(lm), ""
    return None, f"{kind} decoder"


def make_static(
    decoder: Decoder, *, compile: bool, max_rows: int | None = None
) -> StaticDecoder | None:
    """The static decoder for this model, or None (logged once) when it cannot serve it."""
    arch, why = _arch(decoder)
    if arch is None:
        _log_once(why, "static decode path unavailable (%s): dynamic decoding", why)
        return None
    arch.probe_layers = tuple(decoder.probe.layers)
    return StaticDecoder(
        arch,
        device=decoder.m.device,
        dtype=decoder.m.dtype,
        compile=compile,
        max_rows=max_rows,
        max_frames=_max_frames(decoder),
    )


def _max_frames(decoder: Decoder) -> int | None:
    enc_cfg = getattr(decoder.m.model.config, "encoder", decoder.m.model.config)
    frames = getattr(enc_cfg, "max_source_positions", None)
    return int(frames) if frames else None


_Key = tuple[int, int, int]  # (slots, length, frames)


class StaticDecoder:
    """Running rows in fixed slots of preallocated K/V buffers; one token per step.

    Its buffers are inference tensors: every method that touches them runs in
    inference mode (the engine drops and clears rows outside it).
    """

    def __init__(
        self,
        arch: _Arch,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
        compile: bool,
        max_rows: int | None = None,
        max_frames: int | None = None,
        max_shapes: int = MAX_COMPILED_SHAPES,
    ) -> None:
        self.arch = arch
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_rows = max_rows
        self.max_frames = max_frames
        self.max_shapes = max_shapes
        self.cuda = self.device.type == "cuda"
        self.steps = 0  # static steps run (compiled or eager)
        self.relayouts = 0
        self.shapes: set[_Key] = set()  # shape buckets stepped
        self.compile_seconds: dict[_Key, float] = {}  # per compiled shape bucket
        self._compiled: Callable[..., tuple[torch.Tensor, tuple[torch.Tensor, ...]]] | None = None
        if compile:
            cfg = torch._dynamo.config
            cfg.recompile_limit = max(cfg.recompile_limit, 4 * max_shapes)
            self._compiled = torch.compile(
                arch.forward,
                dynamic=False,
                mode="reduce-overhead" if self.cuda else "default",
            )
        self._pool: dict[_Key, tuple[list[torch.Tensor], ...]] = {}
        self._alloc((0, 0, 0))

    # -- bookkeeping -----------------------------------------------------------------

    @property
    def key(self) -> _Key:
        return (len(self.slots), self.length, self.frames_cap)

    @property
    def running(self) -> int:
        return sum(j is not None for j in self.slots)

    def _live(self) -> list[int]:
        return [s for s, j in enumerate(self.slots) if j is not None]

    def _need(self, live: list[int]) -> int:
        """Columns left of ``col`` that live rows occupy."""
        return self.col - min((self.start[s] for s in live), default=self.col)

    def _alloc(self, key: _Key) -> None:
        """Buffers of one bucket (pooled on CUDA: captured graphs keep their addresses)."""
        slots, length, frames = key
        self.slots: list[Job | None] = [None] * slots
        self.start = [0] * slots
        self.frames = [0] * slots
        self.length, self.frames_cap, self.col = length, frames, 0
        self.pos = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.last = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.live = torch.zeros(slots, dtype=torch.long, device=self.device)
        pooled = self._pool.get(key)
        if pooled is not None:
            self.sk, self.sv, self.ck, self.cv, (self.mask, self.cmask) = pooled
            self.mask.fill_(False)
            self.cmask.fill_(True)
            return
        a = self.arch
        kw: dict[str, Any] = {"dtype": self.dtype, "device": self.device}
        self.sk = [torch.zeros(slots, a.heads, length, a.head_dim, **kw) for _ in range(a.layers)]
        self.sv = [torch.zeros_like(t) for t in self.sk]
        self.ck = [torch.zeros(slots, a.heads, frames, a.head_dim, **kw) for _ in range(a.layers)]
        self.cv = [torch.zeros_like(t) for t in self.ck]
        self.mask = torch.zeros(slots, length, dtype=torch.bool, device=self.device)
        # free slots attend to every (finite) frame: no fully masked row, no NaN
        self.cmask = torch.ones(slots, frames, dtype=torch.bool, device=self.device)
        if self.cuda and self._compiled is not None and slots and len(self._pool) < self.max_shapes:
            for t in (*self.sk, *self.sv, *self.ck, *self.cv, self.mask, self.cmask):
                torch._dynamo.mark_static_address(t)
            self._pool[key] = (self.sk, self.sv, self.ck, self.cv, [self.mask, self.cmask])

    def _bucket(self, rows: int, need: int, frames: int) -> _Key:
        """The bucket for a relayout; slots and frames shrink only below a quarter (fewer
        shapes to compile as streams come and go)."""
        slots, _, cap = self.key
        if not (rows <= slots <= 4 * rows):
            slots = _pow2(rows, 1)
            if self.max_rows is not None and rows <= self.max_rows:
                slots = min(slots, self.max_rows)
        if not (frames <= cap <= 4 * frames):
            cap = _pow2(frames, _MIN_FRAMES)
            if self.max_frames is not None and frames <= self.max_frames:
                cap = min(cap, self.max_frames)
        return (slots, _pow2(need + _HEADROOM, _MIN_LEN), cap)

    def _relayout(self, rows: int, need: int, frames: int) -> None:
        """Move the live rows so that they end at column ``need``, in the bucket that fits.

        Within the same bucket only the self-attention columns shift (in place);
        otherwise the live rows move to the first slots of the new bucket's buffers.
        """
        key, live, col = self._bucket(rows, need, frames), self._live(), self.col
        width = self._need(live)
        a, b = col - width, need - width
        self.relayouts += 1
        if key == self.key:
            for t in (*self.sk, *self.sv):
                t[:, :, b:need] = t[:, :, a:col].clone()
            mask = torch.zeros_like(self.mask)
            mask[:, b:need] = self.mask[:, a:col]
            self.mask.copy_(mask)
            self.start = [s - col + need for s in self.start]
            self.col = need
            return
        src = torch.tensor(live, dtype=torch.long, device=self.device)
        old = [[t.index_select(0, src) for t in ts] for ts in (self.sk, self.sv, self.ck, self.cv)]
        mask, cmask = self.mask.index_select(0, src), self.cmask.index_select(0, src)
        pos, last, start, frames_of, slots = (
            self.pos,
            self.last,
            self.start,
            self.frames,
            self.slots,
        )
        self._alloc(key)
        k, f = len(live), min(self.frames_cap, cmask.shape[1])
        for dst, got in zip((self.sk, self.sv), old[:2], strict=True):
            for t, x in zip(dst, got, strict=True):
                t[:k, :, b:need] = x[:, :, a:col]
        for dst, got in zip((self.ck, self.cv), old[2:], strict=True):
            for t, x in zip(dst, got, strict=True):
                t[:k, :, :f] = x[:, :, :f]
        self.mask[:k, b:need] = mask[:, a:col]
        self.cmask[:k] = False
        self.cmask[:k, :f] = cmask[:, :f]
        self.col = need
        self.pos[:k], self.last[:k], self.live[:k] = pos[src], last[src], 1
        for i, s in enumerate(live):
            self.slots[i], self.frames[i] = slots[s], frames_of[s]
            self.start[i] = start[s] - col + need

    # -- rows joining and leaving ------------------------------------------------------

    @torch.inference_mode()
    def join(
        self,
        jobs: list[Job],
        cache: Any,
        mask: torch.Tensor,
        positions: torch.Tensor,
        enc_mask: torch.Tensor,
        last: torch.Tensor,
    ) -> None:
        """Copy freshly prefilled rows (a dynamic ``EncoderDecoderCache``) into free slots.

        ``mask`` (B, W) marks each row's real tokens, right-aligned (left-padded);
        ``enc_mask`` (B, T') its real frames; ``last`` the token each row feeds next.
        """
        lens = [int(n) for n in mask.sum(-1).tolist()]
        width = int(mask.shape[1])
        seen = enc_mask.shape[1] - (enc_mask.flip(-1).cumsum(-1) == 0).sum(-1)
        frames = [max(int(n), 1) for n in seen.tolist()]
        live = self._live()
        rows = len(live) + len(jobs)
        need = max(self._need(live), width)
        most = max([self.frames[s] for s in live] + frames)
        if (
            rows > len(self.slots)
            or need > self.col
            or self.col >= self.length
            or most > self.frames_cap
        ):
            self._relayout(rows, need, most)
        free = [s for s, j in enumerate(self.slots) if j is None][: len(jobs)]
        idx = torch.tensor(free, dtype=torch.long, device=self.device)
        col, f = self.col, min(self.frames_cap, int(enc_mask.shape[1]))
        self_layers = cache.self_attention_cache.layers
        cross_layers = cache.cross_attention_cache.layers
        for i in range(self.arch.layers):
            self.sk[i][idx, :, col - width : col] = self_layers[i].keys.to(self.dtype)
            self.sv[i][idx, :, col - width : col] = self_layers[i].values.to(self.dtype)
            self.ck[i][idx, :, :f] = cross_layers[i].keys[:, :, :f].to(self.dtype)
            self.cv[i][idx, :, :f] = cross_layers[i].values[:, :, :f].to(self.dtype)
        row_mask = torch.zeros((len(free), self.length), dtype=torch.bool, device=self.device)
        row_mask[:, col - width : col] = mask.bool()
        self.mask[idx] = row_mask
        row_cmask = torch.zeros((len(free), self.frames_cap), dtype=torch.bool, device=self.device)
        row_cmask[:, :f] = enc_mask[:, :f].bool()
        self.cmask[idx] = row_cmask
        self.pos[idx] = positions
        self.last[idx] = last
        self.live[idx] = 1
        for s, job, n, fr in zip(free, jobs, lens, frames, strict=True):
            self.slots[s] = job
            self.start[s] = col - n
            self.frames[s] = fr

    def _free(self, slots: list[int]) -> None:
        if not slots:
            return
        idx = torch.tensor(slots, dtype=torch.long, device=self.device)
        self.mask[idx] = False
        self.cmask[idx] = True
        self.pos[idx] = 0
        self.live[idx] = 0
        for s in slots:
            self.slots[s] = None

    @torch.inference_mode()
    def drop(self, jobs: list[Job]) -> None:
        gone = {id(j) for j in jobs}
        self._free([s for s, j in enumerate(self.slots) if j is not None and id(j) in gone])

    @torch.inference_mode()
    def clear(self) -> list[Job]:
        jobs = [j for j in self.slots if j is not None]
        self._free(self._live())
        return jobs

    # -- the step --------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> tuple[list[Job], torch.Tensor, dict[int, torch.Tensor]]:
        """One token for every live row, in slot order: (their jobs, logits (n, V),
        per probed layer the cross-attention queries (n, 1, H*Dh))."""
        live = self._live()
        if self.col >= self.length:
            self._relayout(len(live), self._need(live), max(self.frames[s] for s in live))
            live = self._live()
        args = (
            self.last[:, None],
            self.pos[:, None],
            self.mask,
            self.cmask,
            torch.tensor([self.col], dtype=torch.long, device=self.device),
            self.sk,
            self.sv,
            self.ck,
            self.cv,
        )
        logits, queries = self._run(args)
        self.shapes.add(self.key)
        self.col += 1
        self.pos += self.live
        self.steps += 1
        idx = torch.tensor(live, dtype=torch.long, device=self.device)
        probed = {
            layer: q.index_select(0, idx)
            for layer, q in zip(self.arch.probe_layers, queries, strict=True)
        }
        return [j for j in self.slots if j is not None], logits.index_select(0, idx), probed

    def cross_keys(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """Cross-attention keys (n, H, T, Dh) of a layer's ``slots``."""
        return self.ck[layer].index_select(0, slots)

    @torch.inference_mode()
    def advance(self, chosen: torch.Tensor, keep: list[int]) -> None:
        """Record each live row's chosen token; rows not in ``keep`` (indices) leave."""
        live = self._live()
        idx = torch.tensor(live, dtype=torch.long, device=self.device)
        self.last.index_copy_(0, idx, chosen.to(self.last.dtype))
        kept = set(keep)
        self._free([s for i, s in enumerate(live) if i not in kept])

    def _run(self, args: tuple[Any, ...]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """The step, compiled for at most ``max_shapes`` buckets (each compile logged)."""
        key, fn = self.key, self._compiled
        known = key in self.compile_seconds
        if fn is None or not (known or len(self.compile_seconds) < self.max_shapes):
            if fn is not None:
                _log_once(f"shapes:{id(self)}", "static decode: %d buckets compiled; "
                          "later ones run eagerly", self.max_shapes)  # fmt: skip
            return self.arch.forward(*args)
        if self.cuda:  # a new iteration for CUDA graph trees: earlier outputs may be reused
            torch.compiler.cudagraph_mark_step_begin()  # type: ignore[no-untyped-call]
        if known:
            return fn(*args)
        t0 = time.monotonic()
        try:
            logits = fn(*args)
        except torch.OutOfMemoryError:
            raise
        except Exception:  # a compiler failure: the same step runs eagerly from now on
            log.exception("torch.compile of the static decode step failed; running it eagerly")
            self._compiled = None
            return self.arch.forward(*args)  # its in-place writes are idempotent
        spent = self.compile_seconds[key] = time.monotonic() - t0
        log.info("static decode: compiled slots=%d length=%d frames=%d in %.1f s", *key, spent)
        return logits
