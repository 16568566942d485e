"""Pure metric functions of the evaluation tool (no model, no clock, no I/O).

Everything here works on plain data: texts, and caption events stamped with
the simulated time at which the session emitted them (``TimedEvent``). The
definitions follow DESIGN.md section 6; where a figure comes from the
literature, its docstring cites it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

_WORD = re.compile(r"\S+")


@dataclass(frozen=True, slots=True)
class TimedEvent:
    """A caption event and the simulated time (s since stream start) it was emitted at."""

    kind: str  # "partial" | "final"
    segment: int
    text: str
    start: float  # seconds of stream audio (as in Hypothesis)
    end: float
    time: float
    committed: str = ""


# ------------------------------------------------------------------ text quality


def text_normalizer(lang: str) -> Callable[[str], str]:
    """Whisper's normaliser: the English one for English text, the basic one otherwise.

    Both sides of every comparison go through the same function, so casing,
    punctuation and (for English) spelled numbers and contractions do not count
    as errors.
    """
    from transformers.models.whisper.english_normalizer import (
        BasicTextNormalizer,
        EnglishTextNormalizer,
    )

    norm: Callable[[str], str] = (
        EnglishTextNormalizer({}) if lang == "en" else BasicTextNormalizer()
    )

    def apply(text: str) -> str:
        return " ".join(norm(text).split())

    return apply


def word_error_rate(refs: Sequence[str], hyps: Sequence[str], lang: str) -> dict[str, Any] | None:
    """Corpus WER (jiwer) over normalised pairs; pairs with an empty reference are skipped.

    Returns None when no pair has a non-empty reference (WER is undefined).
    """
    import jiwer

    if len(refs) != len(hyps):
        raise ValueError("refs and hyps differ in length")
    norm = text_normalizer(lang)
    pairs = [(norm(r), norm(h)) for r, h in zip(refs, hyps, strict=True)]
    kept = [(r, h) for r, h in pairs if r]
    if not kept:
        return None
    out = jiwer.process_words([r for r, _ in kept], [h for _, h in kept])
    return {
        "wer": float(out.wer),
        "ref_words": int(out.hits + out.substitutions + out.deletions),
        "substitutions": int(out.substitutions),
        "deletions": int(out.deletions),
        "insertions": int(out.insertions),
        "skipped_empty_refs": len(pairs) - len(kept),
    }


def bleu_chrf(refs: Sequence[str], hyps: Sequence[str], lang: str) -> dict[str, Any] | None:
    """Corpus BLEU and chrF (sacrebleu, one reference each) on normalised text.

    Normalising first (the same as for WER) matters because some references
    (FLEURS, CoVoST) are lowercase without punctuation.
    """
    import sacrebleu

    if len(refs) != len(hyps):
        raise ValueError("refs and hyps differ in length")
    if not refs:
        return None
    norm = text_normalizer(lang)
    r = [norm(x) for x in refs]
    h = [norm(x) for x in hyps]
    return {
        "bleu": float(sacrebleu.corpus_bleu(h, [r]).score),
        "chrf": float(sacrebleu.corpus_chrf(h, [r]).score),
    }


def relative_diff(streaming: float | None, offline: float | None) -> float | None:
    """(streaming − offline) / offline, or None when undefined."""
    if streaming is None or offline is None or offline == 0:
        return None
    return (streaming - offline) / offline


# ------------------------------------------------------------------ latency


def summarize(values: Iterable[float]) -> dict[str, Any]:
    """n, mean, p50, p95 (numpy linear percentiles) and max; None figures when empty."""
    arr = np.asarray(list(values), dtype=np.float64)
    if not arr.size:
        return {"n": 0, "mean": None, "p50": None, "p95": None, "max": None}
    return {
        "n": int(arr.size),
        "mean": float(arr.mean()),
        "p50": float(np.percentile(arr, 50)),
        "p95": float(np.percentile(arr, 95)),
        "max": float(arr.max()),
    }


@dataclass(frozen=True, slots=True)
class BlockClock:
    """Arrival times of a stream delivered in blocks of ``block`` samples.

    Block k holds samples ``[k·block, min((k+1)·block, total))`` and arrives
    when its last sample has been spoken, at ``min((k+1)·block, total) / sr``.
    """

    block: int
    total: int
    sample_rate: int

    def containing(self, sample: int) -> float:
        """Arrival time (s) of the block that holds ``sample``."""
        s = min(max(sample, 0), max(self.total - 1, 0))
        return min((s // self.block + 1) * self.block, self.total) / self.sample_rate

    def covering(self, end: int) -> float:
        """Arrival time (s) of the block holding the last sample before ``end`` (exclusive).

        This is ``StreamRunner._latency_ms``'s rule: the first block whose end
        is at or after ``end``.
        """
        return self.containing(max(end, 1) - 1)


def _sample(seconds: float, clock: BlockClock) -> int:
    return round(seconds * clock.sample_rate)


def final_latencies(events: Sequence[TimedEvent], clock: BlockClock) -> list[float]:
    """Per final (ms): emission time − arrival of the last speech sample of its segment."""
    return [
        (e.time - clock.covering(_sample(e.end, clock))) * 1000.0
        for e in events
        if e.kind == "final"
    ]


def partial_latencies(events: Sequence[TimedEvent], clock: BlockClock) -> list[float]:
    """Per partial (ms): emission time − arrival of the newest sample it covers."""
    return [
        (e.time - clock.covering(_sample(e.end, clock))) * 1000.0
        for e in events
        if e.kind == "partial"
    ]


def first_partial_latencies(events: Sequence[TimedEvent], clock: BlockClock) -> list[float]:
    """Per segment with a partial (ms): its first partial − arrival of its first sample."""
    seen: set[int] = set()
    out: list[float] = []
    for e in events:
        if e.kind == "partial" and e.segment not in seen:
            seen.add(e.segment)
            out.append((e.time - clock.containing(_sample(e.start, clock))) * 1000.0)
    return out


# ------------------------------------------------------------------ stability


def _by_segment(events: Sequence[TimedEvent]) -> dict[int, list[TimedEvent]]:
    segs: dict[int, list[TimedEvent]] = {}
    for e in events:
        segs.setdefault(e.segment, []).append(e)
    return dict(sorted(segs.items()))


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def stable_word_times(events: Sequence[TimedEvent]) -> list[float]:
    """Per output word (the finals' words, in order): when it was first shown as stable (s).

    A word is stable once a partial's ``committed`` text covers all of its
    characters in the segment's final text (committed text is append-only and
    the final is forced with it, so committed is a prefix of the final), or
    when the final is emitted, whichever comes first. Segments without a
    final contribute no words.
    """
    times: list[float] = []
    for evs in _by_segment(events).values():
        finals = [e for e in evs if e.kind == "final"]
        if not finals:
            continue
        final = finals[0]
        ends = [m.end() for m in _WORD.finditer(final.text)]
        word_times = [final.time] * len(ends)
        for p in evs:
            if p.kind != "partial" or p.time > final.time:
                continue
            covered = _common_prefix(p.committed.strip(), final.text)
            for i, end in enumerate(ends):
                if end > covered:
                    break
                word_times[i] = min(word_times[i], p.time)
        times.extend(word_times)
    return times


def laal(delays_ms: Sequence[float], source_ms: float, ref_words: int) -> float | None:
    """Length-adaptive average lagging (ms), computation-aware when delays are.

    LAAL = (1/τ) Σ_{i=1..τ} [d_i − (i−1)·|X| / max(|Y|, |Y*|)], with d_i the
    time word i was emitted, |X| the source duration, |Y| the hypothesis and
    |Y*| the reference length in words, and τ the index of the first word
    emitted at or after the end of the source (|Y| if none). Papi et al.,
    "Over-Generation Cannot Be Rewarded: Length-Adaptive Average Lagging for
    Simultaneous Speech Translation" (AutoSimTrans 2022, arXiv:2206.05807),
    as implemented by SimulEval's ``LAALScorer``; AL is Ma et al., STACL
    (arXiv:1810.08398). None without output words or source.
    """
    if not delays_ms or source_ms <= 0:
        return None
    rate = source_ms / max(len(delays_ms), ref_words)
    total = 0.0
    tau = 0
    for i, d in enumerate(delays_ms):
        total += d - i * rate
        tau = i + 1
        if d >= source_ms:
            break
    return total / tau


@dataclass(frozen=True, slots=True)
class Erasure:
    erased_words: int
    final_words: int

    @property
    def normalized(self) -> float | None:
        return self.erased_words / self.final_words if self.final_words else None


def _lcp_words(a: list[str], b: list[str]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def normalized_erasure(events: Sequence[TimedEvent]) -> Erasure:
    """Normalised erasure (Arivazhagan et al. 2020, "Re-translation versus Streaming
    for Simultaneous Translation", arXiv:1912.03393).

    Per segment the displayed texts are its partials' ``text`` then its final's
    (an empty display when the segment's final is empty and was not emitted);
    each update erases the words of the previous display beyond the words it
    shares as a common prefix with the new one. NE = erased words / words in
    the finals.
    """
    erased = 0
    final_words = 0
    for evs in _by_segment(events).values():
        prev: list[str] = []
        displays = [e for e in evs if e.kind == "partial"]
        finals = [e for e in evs if e.kind == "final"]
        texts = [e.text.split() for e in displays]
        texts.append(finals[0].text.split() if finals else [])
        for cur in texts:
            erased += len(prev) - _lcp_words(prev, cur)
            prev = cur
        final_words += len(texts[-1])
    return Erasure(erased, final_words)


# ------------------------------------------------------------------ report helpers


def quality_figures(
    task: str,
    out_lang: str,
    refs: Sequence[str | None],
    hyps: Sequence[str],
    offline: Sequence[str],
) -> dict[str, Any]:
    """Quality of streaming and offline output against the references, and their consistency.

    Transcription is scored with WER, translation with BLEU and chrF. When any
    reference is missing, the basis is "offline": only the consistency figures
    (streaming scored against the offline output) are given.
    """
    wer = word_error_rate(offline, hyps, out_lang)
    consistency: dict[str, Any] = {"wer": None if wer is None else wer["wer"]}
    consistency.update(bleu_chrf(offline, hyps, out_lang) or {})
    has_ref = all(r is not None for r in refs)
    out: dict[str, Any] = {
        "basis": "reference" if has_ref else "offline",
        "metric": "wer" if task == "transcribe" else "bleu,chrf",
        "normaliser": "EnglishTextNormalizer" if out_lang == "en" else "BasicTextNormalizer",
        "consistency": consistency,
    }
    if not has_ref:
        out["note"] = (
            "no reference for this task: streaming is scored against the same model's "
            "offline output (consistency figures)"
        )
        return out
    ref_texts = [r or "" for r in refs]
    if task == "transcribe":
        keys = ["wer"]
        streaming, off = (word_error_rate(ref_texts, h, out_lang) for h in (hyps, offline))
    else:
        keys = ["bleu", "chrf"]
        streaming, off = (bleu_chrf(ref_texts, h, out_lang) for h in (hyps, offline))
    out["streaming"] = streaming
    out["offline"] = off
    out["relative_diff"] = {
        k: relative_diff(
            None if streaming is None else streaming[k], None if off is None else off[k]
        )
        for k in keys
    }
    return out


def rounded(value: dict[str, Any], digits: int = 4) -> dict[str, Any]:
    """A JSON object with its floats rounded (reports are read by people)."""
    out: dict[str, Any] = _round(value, digits)
    return out


def _round(value: Any, digits: int) -> Any:
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: _round(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [_round(v, digits) for v in value]
    return value


DEFINITIONS = {
    "simulation": (
        "blocks arrive at block_end/sr; VAD is a serial worker (block fed at "
        "max(arrival, vad_free)+vad_time); a decode issued at t is delivered at "
        "max(t, engine_free)+measured wall time; events stamped with simulated time"
    ),
    "final_latency": (
        "final emission time - arrival of the block holding the segment's last speech sample "
        "(includes the endpointing silence)"
    ),
    "partial_latency": "partial emission time - arrival of the block holding its newest sample",
    "first_partial_latency": (
        "per segment: first partial's emission time - arrival of the block holding the "
        "segment's first sample (segments without partials are not counted)"
    ),
    "laal": (
        "length-adaptive average lagging (Papi et al. 2022), computation-aware, over the "
        "finals' words; a word's delay is when it was first shown stable (covered by a "
        "partial's committed text, or in the final); |Y*| = reference words, or offline "
        "output words where there is no reference"
    ),
    "normalized_erasure": (
        "Arivazhagan et al. 2020: words erased per display update (partials then final, "
        "per segment) / words in the finals"
    ),
    "rtf": "(decode + VAD compute seconds) / audio seconds",
    "offline": (
        "same Decoder: one greedy window (no commits, empty prompt) up to max_window_s, "
        "else VAD-segmented finals with partial decoding off"
    ),
    "quality": (
        "both sides normalised with Whisper's EnglishTextNormalizer (English output) or "
        "BasicTextNormalizer; WER with jiwer; BLEU/chrF with sacrebleu at corpus level; "
        "relative_diff = (streaming - offline) / offline"
    ),
}
