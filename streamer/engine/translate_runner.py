"""Translation requests on the engine thread: admitted, encoded, decoded in batches.

The engine calls :meth:`TranslationWorker.step` once per engine step, after
the speech windows, so translation shares the one thread that owns the
device and never runs on the event loop. Each step:

1. admit waiting requests, finals first, then the oldest (bulk streams last),
   within ``TranslateLimits``: rows decoding at once, rows admitted per step,
   source tokens encoded per step (at least one request when nothing runs);
2. encode every distinct source of the admitted rows in one encoder pass per
   model (right-padded, with an attention mask), so a sentence wanted in
   several targets is encoded once where the target is not part of the
   source (forced-BOS models);
3. prefill each row's decoder prefix (decoder start [+ target token]) and
   pick its first token, then decode one token per running row per step.

Rows are (text, target) pairs. Rows of one model whose decoder prefixes
have the same length run as one group: one decoder pass per step, one
batched ``EncoderDecoderCache``; the group advances in lock step, so no row
needs self-attention padding (Marian, mBART and M2M100 derive positions from
the cache length). Newcomers of the same length join a group by
concatenating caches (cross-attention right-padded along source tokens,
masked); finished rows leave with ``batch_select_indices``. A row's tokens
equal ``generate(do_sample=False, num_beams=1)`` on its source alone: tests
check it per family, and that batched rows equal each alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from streamer.core.translation import TranslateRequest, TranslateResult
from streamer.engine.batch_cache import pad_time
from streamer.engine.translation import TargetPlan, TextModel, Translator

__all__ = ["TranslateCallback", "TranslateLimits", "TranslationWorker"]

TranslateCallback = Callable[[TranslateResult], None]
Answer = tuple[TranslateCallback, TranslateResult]


@dataclass(frozen=True, slots=True)
class TranslateLimits:
    """Per-step budgets of the translation rows (``[translation]``)."""

    max_rows: int = 64
    max_admit_rows: int = 32
    max_source_tokens: int = 4096

    def __post_init__(self) -> None:
        if min(self.max_rows, self.max_admit_rows, self.max_source_tokens) < 1:
            raise ValueError("translation limits must be >= 1")


@dataclass(slots=True, eq=False)
class _Job:
    req: TranslateRequest
    callback: TranslateCallback
    submitted: float
    outputs: dict[str, list[str]] = field(default_factory=dict)
    left: int = 0  # rows not finished

    @property
    def rows(self) -> int:
        return len(self.req.texts) * len(self.req.targets)

    def result(self) -> TranslateResult:
        translations = {t: tuple(texts) for t, texts in self.outputs.items()}
        return TranslateResult(self.req.request_id, translations)


@dataclass(slots=True, eq=False)
class _Row:
    job: _Job
    plan: TargetPlan
    index: int  # of the text in the request
    source: tuple[int, ...]
    limit: int  # max new tokens
    tokens: list[int] = field(default_factory=list)


@dataclass(slots=True, eq=False)
class _Group:
    model: TextModel
    rows: list[_Row]
    cache: Any  # EncoderDecoderCache, batch = len(rows)
    enc: torch.Tensor  # (B, S, D) encoder states, right-padded
    enc_mask: torch.Tensor  # (B, S) bool
    last: torch.Tensor  # (B,) each row's last token
    length: int  # decoder tokens in the cache (the same for every row)


class TranslationWorker:
    """Owns waiting and running translation rows; called on the engine thread only."""

    def __init__(self, translator: Translator, limits: TranslateLimits | None = None) -> None:
        self.translator = translator
        self.limits = limits or TranslateLimits()
        self._waiting: list[_Job] = []
        self._answers: list[Answer] = []  # answered without device work (next step)
        self.groups: list[_Group] = []
        self.requests = 0
        self.superseded = 0
        self.rows_decoded = 0  # sum over steps of rows decoded

    @property
    def idle(self) -> bool:
        return not (self._waiting or self.groups or self._answers)

    @property
    def running(self) -> int:
        return sum(len(g.rows) for g in self.groups)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, req: TranslateRequest, callback: TranslateCallback, now: float) -> None:
        """Queue a request; a waiting partial of the same stream is superseded by it."""
        unknown = [t for t in req.targets if t not in self.translator.plans]
        if unknown:
            error = f"no translation model for target {unknown[0]!r}"
            self._answers.append((callback, TranslateResult(req.request_id, error=error)))
            return
        if req.kind == "partial":
            for old in [j for j in self._waiting if j.req.stream == req.stream]:
                if old.req.kind == "partial":
                    self._waiting.remove(old)
                    self.superseded += 1
                    result = TranslateResult(old.req.request_id, error="superseded")
                    self._answers.append((old.callback, result))
        self._waiting.append(_Job(req, callback, now))

    def lag(self, now: float) -> float:
        """Seconds the oldest waiting request has waited (0 when none waits)."""
        return max((now - j.submitted for j in self._waiting), default=0.0)

    def step(self) -> list[Answer]:
        """Admit what fits, decode one token per running row; returns finished requests."""
        done, self._answers = self._answers, []
        jobs = self._plan()
        if jobs:
            done += self._admit(jobs)
        done += self._decode()
        return done

    def fail_all(self, error: str) -> list[Answer]:
        """Every waiting and running request answered with ``error`` (a failed step)."""
        jobs = {id(j): j for j in self._waiting}
        for group in self.groups:
            jobs.update({id(r.job): r.job for r in group.rows})
        self._waiting.clear()
        self.groups.clear()
        answers, self._answers = self._answers, []
        return answers + [
            (j.callback, TranslateResult(j.req.request_id, error=error)) for j in jobs.values()
        ]

    # -- admission ------------------------------------------------------------------

    def _plan(self) -> list[_Job]:
        limits = self.limits
        room = limits.max_rows - self.running
        self._waiting.sort(key=lambda j: (j.req.bulk, j.req.kind != "final", j.submitted))
        admit: list[_Job] = []
        rows = tokens = 0
        for job in self._waiting:
            size = job.rows
            cost = sum(len(t) for t in job.req.texts) // 3 * len(job.req.targets)  # ~tokens
            first = not admit and not self.groups
            over = (
                rows + size > min(room, limits.max_admit_rows)
                or tokens + cost > limits.max_source_tokens
            )
            if over and not first:
                continue  # a smaller request may still fit this step
            admit.append(job)
            rows += size
            tokens += cost
        for job in admit:
            self._waiting.remove(job)
        return admit

    def _admit(self, jobs: list[_Job]) -> list[Answer]:
        done: list[Answer] = []
        rows: list[_Row] = []
        tr = self.translator
        for job in jobs:
            self.requests += 1
            job.outputs = {t: [""] * len(job.req.texts) for t in job.req.targets}
            job.left = job.rows
            if not job.left:
                done.append((job.callback, job.result()))
                continue
            for target in job.req.targets:
                plan = tr.plans[target]
                code = tr.source_code(plan, job.req.source)
                for i, text in enumerate(job.req.texts):
                    ids = tuple(plan.model.source_ids(plan.source_prefix + text, code))
                    limit = tr.max_new_tokens(plan, len(ids))
                    rows.append(_Row(job, plan, i, ids, limit))
        by_model: dict[int, list[_Row]] = {}
        for row in rows:
            by_model.setdefault(id(row.plan.model), []).append(row)
        for model_rows in by_model.values():
            model = model_rows[0].plan.model
            sources = list(dict.fromkeys(r.source for r in model_rows))  # each encoded once
            hidden, mask = model.encode([list(s) for s in sources])
            index = {s: i for i, s in enumerate(sources)}
            by_start: dict[int, list[_Row]] = {}
            for row in model_rows:
                by_start.setdefault(len(row.plan.start), []).append(row)
            for batch in by_start.values():
                pick = torch.tensor([index[r.source] for r in batch], device=hidden.device)
                done += self._prefill(model, batch, hidden[pick], mask[pick])
        return done

    def _prefill(
        self, model: TextModel, rows: list[_Row], enc: torch.Tensor, enc_mask: torch.Tensor
    ) -> list[Answer]:
        ids = torch.tensor([list(r.plan.start) for r in rows], dtype=torch.long, device=enc.device)
        width = int(enc_mask.sum(-1).max())  # cut padding no row of this batch needs
        enc, enc_mask = enc[:, :width], enc_mask[:, :width]
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        logits = model.logits(ids, enc, enc_mask, cache)
        group = _Group(model, rows, cache, enc, enc_mask, ids[:, -1], int(ids.shape[1]))
        done = self._advance(group, logits)
        if group.rows:
            self._merge(group)
        return done

    def _merge(self, new: _Group) -> None:
        for group in self.groups:
            if group.model is new.model and group.length == new.length:
                self.groups.remove(group)
                self.groups.append(_concat(group, new))
                return
        self.groups.append(new)

    # -- decoding --------------------------------------------------------------------

    def _decode(self) -> list[Answer]:
        done: list[Answer] = []
        for group in list(self.groups):
            logits = group.model.logits(group.last[:, None], group.enc, group.enc_mask, group.cache)
            group.length += 1
            done += self._advance(group, logits)
        self.groups = [g for g in self.groups if g.rows]
        return done

    def _advance(self, group: _Group, logits: torch.Tensor) -> list[Answer]:
        """Each row's next token; finished rows leave, finished requests are answered."""
        self.rows_decoded += len(group.rows)
        chosen = torch.argmax(logits, dim=-1)
        keep: list[int] = []
        done: list[Answer] = []
        eos = group.model.eos_token_id
        for i, (row, tok) in enumerate(zip(group.rows, chosen.tolist(), strict=True)):
            if tok != eos:
                row.tokens.append(int(tok))
                if len(row.tokens) < row.limit:
                    keep.append(i)
                    continue
            job = row.job
            job.outputs[row.plan.target][row.index] = group.model.decode(row.tokens)
            job.left -= 1
            if not job.left:
                done.append((job.callback, job.result()))
        group.last = chosen
        if len(keep) != len(group.rows):
            _select(group, keep)
        return done


def _select(group: _Group, keep: list[int]) -> None:
    group.rows = [group.rows[i] for i in keep]
    if not keep:
        return
    index = torch.tensor(keep, dtype=torch.long, device=group.enc.device)
    group.cache.batch_select_indices(index)
    group.enc, group.enc_mask = group.enc[index], group.enc_mask[index]
    group.last = group.last[index]


def _concat(a: _Group, b: _Group) -> _Group:
    """One group of both groups' rows (equal decoder lengths; sources padded, masked)."""
    frames = max(a.enc.shape[1], b.enc.shape[1])
    self_kv = [
        (torch.cat([x.keys, y.keys]), torch.cat([x.values, y.values]))
        for x, y in zip(
            a.cache.self_attention_cache.layers, b.cache.self_attention_cache.layers, strict=True
        )
    ]
    cross_kv = [
        (
            torch.cat([pad_time(x.keys, 2, frames), pad_time(y.keys, 2, frames)]),
            torch.cat([pad_time(x.values, 2, frames), pad_time(y.values, 2, frames)]),
        )
        for x, y in zip(
            a.cache.cross_attention_cache.layers, b.cache.cross_attention_cache.layers, strict=True
        )
    ]
    cache = EncoderDecoderCache(DynamicCache(self_kv), DynamicCache(cross_kv))
    for i in range(len(cross_kv)):
        cache.is_updated[i] = True
    return _Group(
        model=a.model,
        rows=a.rows + b.rows,
        cache=cache,
        enc=torch.cat([pad_time(a.enc, 1, frames), pad_time(b.enc, 1, frames)]),
        enc_mask=torch.cat(
            [
                pad_time(a.enc_mask, 1, frames, value=False),
                pad_time(b.enc_mask, 1, frames, value=False),
            ]
        ),
        last=torch.cat([a.last, b.last]),
        length=a.length,
    )
