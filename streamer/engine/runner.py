"""Executes the scheduler's steps on the device: batched encode, prefill and decode.

Shapes: windows of one length bucket are encoded in one encoder pass
(``Decoder.encode_batch``). Prefixes are prefilled together, left-padded, with
a self-attention padding mask and per-row position ids; encoder states are
right-padded along frames with a cross-attention mask. Running sequences live
in groups, each one batched ``EncoderDecoderCache``; every step each group
decodes one token per row in one decoder pass. Newcomers join a group by
concatenating caches (self-attention left-padded along time,
cross-attention right-padded along frames); finished rows leave with
``batch_select_indices``, and left padding no row needs any more is cut.

Families whose decoders honour position ids (Whisper, and SED decoders such as
BERT and GPT-2) share one group whatever their lengths. The others (MBart,
Marian, Speech2Text) derive positions from the cache length, so they are
grouped by length: every row of a group then has the same length, needs no
padding, and the group advances in lock step. Whisper's decoder does not pass
a cross-attention mask to its layers, so :func:`_whisper_decoder` runs the
same layers with one. Beam search (``num_beams`` = k > 1) gives each window
k contiguous rows (its prefill repeated k times); after every pass each
window's :class:`BeamSearch` picks its next beams and the rows are reordered
to follow them (``batch_select_indices`` with repeats), so windows in beam
search batch like greedy ones and choose the same tokens as ``Decoder.beam``.

The tokens of a batched sequence equal those of decoding its window alone
(``Decoder.run``), in fp32: tests check it for every model family.

``compile=True`` (``[engine] compile``) moves the running rows of
position-aware families into :class:`StaticDecoder` (``static_decode.py``):
fixed slots of preallocated K/V buffers decoded by a ``torch.compile``d step;
prefill stays on the dynamic path, and families the static step cannot serve
keep the dynamic groups.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from streamer.core.session import DecodeResult
from streamer.engine.batch_cache import growing_cache, pad_time
from streamer.engine.beams import BeamSearch
from streamer.engine.decoding import Decoder, EncodedWindow, find_loop, project, stops_early
from streamer.engine.scheduler import Job
from streamer.engine.static_decode import StaticDecoder, make_static
from streamer.engine.targets import TargetRows
from streamer.engine.whisper_sed import DECODER_MODEL_TYPE

__all__ = ["POSITION_AWARE_DECODERS", "BatchRunner"]

#: SED decoder model types whose ``position_ids`` argument is honoured.
POSITION_AWARE_DECODERS = frozenset(
    {"bert", "roberta", "xlm-roberta", "electra", "gpt2", "bert-generation", DECODER_MODEL_TYPE}
)


@dataclass(slots=True, eq=False)
class _Group:
    """Running sequences decoded together: one cache, one row each."""

    jobs: list[Job]
    cache: Any  # EncoderDecoderCache, batch = len(jobs)
    mask: torch.Tensor  # (B, S) long: 1 = a real token in the self-attention cache
    positions: torch.Tensor  # (B,) long: position of each row's next token
    enc: torch.Tensor  # (B, T, D) encoder states, right-padded
    enc_mask: torch.Tensor  # (B, T) bool: real encoder frames
    last: torch.Tensor  # (B,) long: each row's last token (the next input)

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])


class BatchRunner:
    """Owns the running groups; called on the engine thread only.

    ``compile``: decode running rows through the compiled static step where the
    model allows it; ``static`` (default: ``compile``) uses the static step
    without compiling it when ``compile`` is off (tests); ``max_rows`` caps its
    slots (the scheduler's ``max_running``).
    """

    def __init__(
        self,
        decoder: Decoder,
        compile: bool = False,
        *,
        static: bool | None = None,
        max_rows: int | None = None,
    ) -> None:
        self.d = decoder
        self.m = decoder.m
        fam = self.m.family
        if fam == "sed":
            dec_type = getattr(self.m.model.config.decoder, "model_type", "")
            self.position_aware = dec_type in POSITION_AWARE_DECODERS
        else:
            self.position_aware = fam == "whisper"
        self.batchable = fam in ("whisper", "sed", "speech2text")
        self.beams = decoder.num_beams
        self._searches: dict[int, BeamSearch] = {}  # by id(job), beam search only
        self.groups: list[_Group] = []
        self.target_rows = TargetRows(decoder)  # requests decoded into several languages
        self._pad_id = int(self.m.eos_token_id)
        # Whisper's decoder (also as an SED's decoder) runs through _whisper_decoder;
        # other SED decoders compute the logits of the last position only, where they can.
        self._whisper_lm: Any = None
        self._keep_last = False
        if fam == "whisper":
            self._whisper_lm = self.m.model
        elif fam == "sed":
            lm = self.m.model.decoder
            if getattr(lm.config, "model_type", "") == DECODER_MODEL_TYPE:
                self._whisper_lm = lm
            else:
                self._keep_last = "logits_to_keep" in inspect.signature(lm.forward).parameters
        self.static: StaticDecoder | None = None
        if (compile if static is None else static) and self.batchable:
            self.static = make_static(decoder, compile=compile, max_rows=max_rows)

    @property
    def running(self) -> int:
        """Windows being decoded (rows / ``beams`` in beam search)."""
        rows = sum(len(g.jobs) for g in self.groups) // self.beams
        return rows + (self.static.running if self.static is not None else 0)

    # -- admission ----------------------------------------------------------------

    def admit(self, jobs: list[Job]) -> list[tuple[Job, DecodeResult]]:
        """Encode, prefill and choose the first token of new jobs; returns finished ones."""
        if not jobs:
            return []
        buckets: dict[int, list[Job]] = {}
        for job in jobs:
            buckets.setdefault(self.d.bucket(len(job.req.audio)), []).append(job)
        encoded: list[tuple[Job, EncodedWindow]] = []
        for bucket_jobs in buckets.values():
            windows = self.d.encode_batch([j.req.audio for j in bucket_jobs])
            encoded += zip(bucket_jobs, windows, strict=True)
        encoded = self.target_rows.expand(encoded)  # target rows share their window's pass
        prefixes: list[tuple[Job, EncodedWindow, list[int]]] = []
        for job, enc in encoded:
            job.lang = job.req.lang
            if self.m.whisper_prompt and job.lang is None and self.m.lang_to_id:
                job.lang = self.d.detect_language(enc)
            job.start = self.d.start_tokens(job.req.prompt, job.lang, job.req.task, job.req.target)
            job.align = self.d.alignment(job.req)
            prefix = job.start + list(job.req.forced)
            job.prefix_len = len(prefix)
            prefixes.append((job, enc, prefix))
        if self.position_aware:
            batches = [prefixes]
        else:
            by_len: dict[int, list[tuple[Job, EncodedWindow, list[int]]]] = {}
            for item in prefixes:
                by_len.setdefault(len(item[2]), []).append(item)
            batches = list(by_len.values())
        done: list[tuple[Job, DecodeResult]] = []
        for batch in batches:
            group, logits = self._prefill(batch)
            if self.beams > 1:
                logits = self._expand(group, logits)
            done += self._advance(group, logits, first=True)
            if group.jobs:
                self._merge(group)
        return self.target_rows.gather(done)

    def _prefill(
        self, batch: list[tuple[Job, EncodedWindow, list[int]]]
    ) -> tuple[_Group, torch.Tensor]:
        dev = self.m.device
        width = max(len(p) for _, _, p in batch)
        ids = torch.full((len(batch), width), self._pad_id, dtype=torch.long, device=dev)
        mask = torch.zeros((len(batch), width), dtype=torch.long, device=dev)
        for row, (_, _, prefix) in enumerate(batch):
            ids[row, width - len(prefix) :] = torch.tensor(prefix, dtype=torch.long)
            mask[row, width - len(prefix) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        enc, enc_mask = self._stack_encoder([e for _, e, _ in batch])
        cache = self._new_cache()
        jobs = [job for job, _, _ in batch]
        logits = self._forward_reading(jobs, ids, mask, positions, enc, enc_mask, cache)
        group = _Group(
            jobs=jobs,
            cache=cache,
            mask=mask,
            positions=mask.sum(-1),
            enc=enc,
            enc_mask=enc_mask,
            last=ids[:, -1].clone(),
        )
        return group, logits

    def _new_cache(self) -> EncoderDecoderCache:
        return EncoderDecoderCache(growing_cache(), DynamicCache())

    def _expand(self, group: _Group, logits: torch.Tensor) -> torch.Tensor:
        """Beam search: k identical rows per window (its search starts from the first)."""
        k = self.beams
        group.cache.batch_repeat_interleave(k)
        for name in ("mask", "positions", "enc", "enc_mask", "last"):
            setattr(group, name, getattr(group, name).repeat_interleave(k, 0))
        for job in group.jobs:
            self._searches[id(job)] = BeamSearch(
                k, self.m.eos_token_id, job.req.max_new_tokens, self.m.device
            )
        group.jobs = [job for job in group.jobs for _ in range(k)]
        return logits.repeat_interleave(k, 0)

    def _stack_encoder(self, encs: list[EncodedWindow]) -> tuple[torch.Tensor, torch.Tensor]:
        frames = max(e.hidden.shape[1] for e in encs)
        hidden = torch.cat([pad_time(e.hidden, 1, frames, left=False) for e in encs])
        masks = []
        for e in encs:
            row = (
                e.mask.bool()
                if e.mask is not None
                else torch.ones((1, e.hidden.shape[1]), dtype=torch.bool, device=hidden.device)
            )
            masks.append(pad_time(row, 1, frames, left=False, value=False))
        return hidden, torch.cat(masks)

    def _merge(self, new: _Group) -> None:
        """Add ``new``'s rows to a compatible group (or keep it as a group of its own)."""
        if self.static is not None:
            self.static.join(new.jobs, new.cache, new.mask, new.positions, new.enc_mask, new.last)
            return
        for group in self.groups:
            if self.position_aware or group.length == new.length:
                self.groups.remove(group)
                self.groups.append(_concat(group, new))
                return
        self.groups.append(new)

    # -- decoding ----------------------------------------------------------------------

    def step(self) -> list[tuple[Job, DecodeResult]]:
        """One token for every running row; returns the jobs that finished."""
        done: list[tuple[Job, DecodeResult]] = []
        for group in list(self.groups):
            ones = torch.ones((len(group.jobs), 1), dtype=torch.long, device=self.m.device)
            mask = torch.cat([group.mask, ones], dim=1)
            logits = self._forward_reading(
                group.jobs,
                group.last[:, None],
                mask,
                group.positions[:, None],
                group.enc,
                group.enc_mask,
                group.cache,
            )
            group.mask = mask
            group.positions = group.positions + 1
            done += self._advance(group, logits, first=False)
        self.groups = [g for g in self.groups if g.jobs]
        if self.static is not None and self.static.running:
            jobs, logits, queries = self.static.step()
            if any(job.align is not None for job in jobs):
                self._read_static(jobs, queries)
            chosen, keep, finished = self._choose(jobs, logits, first=False)
            self.static.advance(chosen, keep)
            done += finished
        return self.target_rows.gather(done)

    def drop(self, jobs: Iterable[Job]) -> None:
        """Remove rows (cancelled, or failed with their step)."""
        jobs = self.target_rows.with_children(jobs)
        gone = {id(j) for j in jobs}
        for key in gone:
            self._searches.pop(key, None)
        for group in self.groups:
            keep = [i for i, j in enumerate(group.jobs) if id(j) not in gone]
            if len(keep) != len(group.jobs):
                _select(group, keep)
        self.groups = [g for g in self.groups if g.jobs]
        if self.static is not None:
            self.static.drop(jobs)

    def clear(self) -> list[Job]:
        """Forget every running row (after a failed step); returns them."""
        jobs = list({id(j): j for g in self.groups for j in g.jobs}.values())
        self.groups = []
        self._searches.clear()
        if self.static is not None:
            jobs += self.static.clear()
        return self.target_rows.clear(jobs)

    def _advance(
        self, group: _Group, logits: torch.Tensor, first: bool
    ) -> list[tuple[Job, DecodeResult]]:
        """Choose each row's next token; finished rows leave the group."""
        if self.beams > 1:
            return self._advance_beams(group, logits)
        chosen, keep, done = self._choose(group.jobs, logits, first)
        group.last = chosen
        if len(keep) != len(group.jobs):
            _select(group, keep)
        return done

    def _advance_beams(self, group: _Group, logits: torch.Tensor) -> list[tuple[Job, DecodeResult]]:
        """Each window's search picks its next beams; rows follow them, finished ones leave."""
        k = self.beams
        rows: list[int] = []
        last: list[int] = []
        done: list[tuple[Job, DecodeResult]] = []
        for base in range(0, len(group.jobs), k):
            job = group.jobs[base]
            search = self._searches[id(job)]
            block = logits[base : base + k]
            self.d.suppress(block, first=search.step == 0)
            picked = search.advance(block)
            if picked is None:
                del self._searches[id(job)]
                job.tokens, job.looped = search.best(self.d.loop_guard)
                if job.align is not None:
                    enc = EncodedWindow(group.enc[base : base + 1], group.enc_mask[base : base + 1])
                    forced = list(job.req.forced)
                    job.rows = list(self.d.forced_rows(enc, job.start, forced + job.tokens))
                done.append((job, self.result(job)))
                continue
            rows += [base + r for r in picked]
            last += search.last_tokens
        _select(group, rows)
        if rows:
            group.last = torch.tensor(last, dtype=torch.long, device=group.mask.device)
        return done

    def _choose(
        self, jobs: list[Job], logits: torch.Tensor, first: bool
    ) -> tuple[torch.Tensor, list[int], list[tuple[Job, DecodeResult]]]:
        """Each row's next token, the rows that go on, and the finished jobs' results."""
        d = self.d
        d.suppress(logits, first)
        chosen = torch.argmax(logits, dim=-1)
        keep: list[int] = []
        done: list[tuple[Job, DecodeResult]] = []
        for row, (job, tok) in enumerate(zip(jobs, chosen.tolist(), strict=True)):
            finished = tok == self.m.eos_token_id
            if not finished:
                job.tokens.append(int(tok))
                cut = find_loop(job.tokens) if d.loop_guard else None
                if cut is not None:
                    del job.tokens[cut:]
                    del job.rows[len(job.req.forced) + cut :]
                    job.looped = finished = True
                elif len(job.tokens) >= job.req.max_new_tokens or stops_early(job.align, job.rows):
                    finished = True
            if finished:
                done.append((job, self.result(job)))
            else:
                keep.append(row)
        return chosen, keep, done

    def result(self, job: Job) -> DecodeResult:
        rows = torch.stack(job.rows) if job.align is not None and job.rows else None
        return self.d.result(job.req, job.tokens, job.looped, job.lang, job.align, rows)

    # -- the decoder pass ----------------------------------------------------------------

    def _read_static(self, jobs: list[Job], queries: dict[int, torch.Tensor]) -> None:
        """Attention rows of a static step (its queries against the slots' cross keys)."""
        static = self.static
        assert static is not None
        slots = [s for s, j in enumerate(static.slots) if j is not None]
        idx = torch.tensor(slots, dtype=torch.long, device=self.m.device)
        weights = self.d.probe.weights(
            lambda layer: static.cross_keys(layer, idx), static.cmask.index_select(0, idx), queries
        )  # (n, 1, h, T)
        for row, (slot, job) in enumerate(zip(slots, jobs, strict=True)):
            if job.align is not None:
                job.rows.append(weights[row, 0, :, : static.frames[slot]])

    def _forward_reading(
        self,
        jobs: list[Job],
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        enc: torch.Tensor,
        enc_mask: torch.Tensor,
        cache: Any,
    ) -> torch.Tensor:
        """``_forward``, appending the attention rows of the rows that read it.

        Greedy rows keep the rows of their forced tokens (prefill) and of each
        token chosen from these logits; beam search reads its rows once, when
        its best sequence is known (``Decoder.forced_rows``).
        """
        if self.beams > 1 or not any(job.align is not None for job in jobs):
            return self._forward(ids, mask, positions, enc, enc_mask, cache)
        with self.d.probe.capture():
            logits = self._forward(ids, mask, positions, enc, enc_mask, cache)
            weights = self.d.attention(cache, enc_mask)  # (B, Q, n, T)
        for row, job in enumerate(jobs):
            if job.align is not None:
                keep = len(job.req.forced) + 1 if ids.shape[1] > 1 else 1
                frames = int(enc_mask[row].sum())  # its own frames (groups pad to the longest)
                job.rows.extend(weights[row, -keep:, :, :frames].unbind(0))
        return logits

    def _forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        enc: torch.Tensor,
        enc_mask: torch.Tensor,
        cache: Any,
    ) -> torch.Tensor:
        """Logits (B, V) of each row's last position, advancing ``cache``."""
        fam = self.m.family
        full = bool(enc_mask.all())
        if self._whisper_lm is not None:  # Whisper's decoder, run by _whisper_decoder
            lm = self._whisper_lm
            hidden = _whisper_decoder(
                lm, ids, mask, positions, enc, None if full else enc_mask, cache
            )
            return project(lm.get_output_embeddings(), hidden[:, -1, :])
        kw: dict[str, Any] = {}
        if not full:
            kw["encoder_attention_mask"] = enc_mask.long()
        if self.position_aware:
            kw["position_ids"] = positions
        if fam == "sed":  # a *ForCausalLM: logits of the last position only, where it can
            if self._keep_last:
                kw["logits_to_keep"] = 1
            decoder = self.m.model.decoder
        else:
            decoder = self.m.model.model.decoder
        out = decoder(
            input_ids=ids,
            attention_mask=mask,
            encoder_hidden_states=enc,
            past_key_values=cache,
            use_cache=True,
            **kw,
        )
        if fam == "sed":
            return out.logits[:, -1, :].float()  # type: ignore[no-any-return]
        head = self.m.model.get_output_embeddings()
        return project(head, out.last_hidden_state[:, -1, :])


def _whisper_decoder(
    model: Any,
    ids: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    enc: torch.Tensor,
    enc_mask: torch.Tensor | None,
    cache: Any,
) -> torch.Tensor:
    """``WhisperDecoder.forward`` with a cross-attention mask over padded frames.

    ``model`` is a ``WhisperForConditionalGeneration`` or ``WhisperForCausalLM``
    (both hold the decoder at ``model.model.decoder``); ``enc_mask`` None:
    every frame is real. One-token steps build their self-attention mask
    directly (the left-padding mask; None without padding, as
    ``create_causal_mask`` returns for one query) instead of through
    transformers' general mask builder.
    """
    dec = model.model.decoder
    embeds = dec.embed_tokens(ids)
    past = cache.get_seq_length()
    hidden = embeds + dec.embed_positions(ids, past_key_values_length=past, position_ids=positions)
    causal: Any
    if ids.shape[1] == 1:
        causal = None if bool(mask[:, 0].all()) else mask[:, None, None, :].bool()
    else:
        from transformers.masking_utils import create_causal_mask

        causal = create_causal_mask(
            config=dec.config,
            inputs_embeds=embeds,
            attention_mask=mask,
            past_key_values=cache,
            position_ids=positions,
        )
    cross = None
    if enc_mask is not None:
        neg = torch.finfo(hidden.dtype).min
        cross = torch.zeros(enc_mask.shape, dtype=hidden.dtype, device=hidden.device)
        cross = cross.masked_fill(~enc_mask, neg)[:, None, None, :]
    for layer in dec.layers:
        hidden = layer(
            hidden,
            causal,
            enc,
            encoder_attention_mask=cross,
            past_key_values=cache,
            use_cache=True,
        )
    return dec.layer_norm(hidden)  # type: ignore[no-any-return]


def _select(group: _Group, rows: list[int]) -> None:
    """Keep ``rows`` of a group, then cut left padding that no row needs any more."""
    jobs = [group.jobs[i] for i in rows]
    group.jobs = jobs
    if not jobs:
        return
    index = torch.tensor(rows, dtype=torch.long, device=group.mask.device)
    group.cache.batch_select_indices(index)
    group.mask = group.mask[index]
    group.positions = group.positions[index]
    group.enc = group.enc[index]
    group.enc_mask = group.enc_mask[index]
    group.last = group.last[index]
    lead = int((group.mask.cumsum(-1) == 0).sum(-1).min())
    if lead > 0:
        group.mask = group.mask[:, lead:]
        for layer in group.cache.self_attention_cache.layers:
            layer.keys = layer.keys[:, :, lead:]
            layer.values = layer.values[:, :, lead:]


def _concat(a: _Group, b: _Group) -> _Group:
    """One group holding the rows of both (caches padded to a common shape)."""
    length = max(a.length, b.length)
    frames = max(a.enc.shape[1], b.enc.shape[1])
    self_kv: list[tuple[torch.Tensor, torch.Tensor]] = []
    cross_kv: list[tuple[torch.Tensor, torch.Tensor]] = []
    for la, lb, ca, cb in zip(
        a.cache.self_attention_cache.layers,
        b.cache.self_attention_cache.layers,
        a.cache.cross_attention_cache.layers,
        b.cache.cross_attention_cache.layers,
        strict=True,
    ):
        self_kv.append(
            (
                torch.cat([pad_time(la.keys, 2, length, True), pad_time(lb.keys, 2, length, True)]),
                torch.cat(
                    [pad_time(la.values, 2, length, True), pad_time(lb.values, 2, length, True)]
                ),
            )
        )
        cross_kv.append(
            (
                torch.cat(
                    [pad_time(ca.keys, 2, frames, False), pad_time(cb.keys, 2, frames, False)]
                ),
                torch.cat(
                    [pad_time(ca.values, 2, frames, False), pad_time(cb.values, 2, frames, False)]
                ),
            )
        )
    cache = EncoderDecoderCache(growing_cache(self_kv), DynamicCache(cross_kv))
    for i in range(len(cross_kv)):
        cache.is_updated[i] = True
    return _Group(
        jobs=a.jobs + b.jobs,
        cache=cache,
        mask=torch.cat([pad_time(a.mask, 1, length, True), pad_time(b.mask, 1, length, True)]),
        positions=torch.cat([a.positions, b.positions]),
        enc=torch.cat([pad_time(a.enc, 1, frames, False), pad_time(b.enc, 1, frames, False)]),
        enc_mask=torch.cat(
            [
                pad_time(a.enc_mask, 1, frames, False, value=False),
                pad_time(b.enc_mask, 1, frames, False, value=False),
            ]
        ),
        last=torch.cat([a.last, b.last]),
    )
