"""Evaluate the streaming path on audio files: quality, latency, erasure, compute.

Every clip (and, per set, all its clips joined into one long stream with
seeded random silences) goes through the project's sans-I/O ``StreamSession``
and the real ``Decoder`` in simulated, computation-aware real time: audio
arrives in blocks of ``--block-ms``, and each VAD and decode call's measured
compute time is charged to the simulated clock. The timing rules are in
``tools/simulation.py``; this module holds the data sets (manifest, sets,
joined streams), the ``Evaluator`` (streaming and offline decodes of one
stream), the report and the CLI.

Offline reference point, same model and Decoder: a clip no longer than the
window (``max_window_s``, 30 s) is decoded in one window (greedy, no commits,
empty prompt, the session's length cap); longer audio is VAD-segmented with
partial decoding off (``SessionSettings(partials=False)``). Quality is scored
against the manifest's reference (WER for transcription; BLEU and chrF for
translation into English with ``translation_en``); where no reference exists
the streaming output is scored against the offline output instead (a
"consistency" figure, labelled so). Metric definitions: ``tools/metrics.py``.

Usage (from the repository root):
    .venv/bin/python tools/evaluate.py --sets fr-en,en --limit 3 \
        [--manifest PATH] [--config FILE] [--set streaming.chunk_ms=500] \
        [--block-ms 100] [--seed 0] [--no-long] [--threads N] [--output PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make the `tools` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools import metrics
from tools.simulation import Clock, StreamRun, simulate

if TYPE_CHECKING:
    from streamer.audio.vad import FrameVad
    from streamer.config import Config
    from streamer.core.session import SessionSettings
    from streamer.engine.decoding import Decoder

VERSION = "1.0"
REPO_ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("evaluate")


# ------------------------------------------------------------------ data


@dataclass(frozen=True, slots=True)
class Clip:
    name: str  # path relative to the manifest's folder
    path: Path
    lang: str
    text: str
    translation_en: str | None = None


def default_manifest() -> Path:
    shared = REPO_ROOT.parent / "shared" / "audio" / "manifest.jsonl"
    return shared if shared.exists() else REPO_ROOT / "tests" / "data" / "audio" / "manifest.jsonl"


def load_manifest(path: Path) -> list[Clip]:
    clips = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        clips.append(
            Clip(
                name=row["path"],
                path=path.parent / row["path"],
                lang=row["lang"],
                text=row.get("text", ""),
                translation_en=row.get("translation_en"),
            )
        )
    return clips


def group_sets(clips: Sequence[Clip]) -> dict[str, list[Clip]]:
    """Sets by folder and language: the folder's name if it holds one language,
    else ``folder-lang`` (``lang`` alone at the manifest's top level)."""
    langs: dict[str, set[str]] = {}
    for c in clips:
        langs.setdefault(str(Path(c.name).parent), set()).add(c.lang)
    sets: dict[str, list[Clip]] = {}
    for c in clips:
        folder = str(Path(c.name).parent)
        if folder in ("", "."):
            name = c.lang
        elif len(langs[folder]) == 1:
            name = folder.replace("/", "-")
        else:
            name = f"{folder.replace('/', '-')}-{c.lang}"
        sets.setdefault(name, []).append(c)
    return sets


def join_stream(
    audios: Sequence[np.ndarray[Any, Any]], sample_rate: int, rng: np.random.Generator
) -> tuple[np.ndarray[Any, Any], list[float]]:
    """Clips joined with uniform random 0.3–2 s silences; returns (audio, gaps in s)."""
    gaps = [float(g) for g in rng.uniform(0.3, 2.0, size=max(len(audios) - 1, 0))]
    parts: list[np.ndarray[Any, Any]] = []
    for i, a in enumerate(audios):
        if i:
            parts.append(np.zeros(round(gaps[i - 1] * sample_rate), dtype=np.float32))
        parts.append(np.asarray(a, dtype=np.float32))
    joined = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
    return joined, gaps


# ------------------------------------------------------------------ one run


@dataclass(slots=True)
class RunResult:
    """One stream (a clip or a set's long stream), decoded streaming and offline."""

    name: str
    lang: str
    task: str
    out_lang: str
    reference: str | None
    run: StreamRun
    offline_text: str
    offline_mode: str
    offline_s: float

    @property
    def hypothesis(self) -> str:
        return " ".join(e.text for e in self.run.finals)

    def final_latencies(self) -> list[float]:
        return metrics.final_latencies(self.run.events, self.run.clock)

    def partial_latencies(self) -> list[float]:
        return metrics.partial_latencies(self.run.events, self.run.clock)

    def first_partial_latencies(self) -> list[float]:
        return metrics.first_partial_latencies(self.run.events, self.run.clock)

    def laal_ms(self) -> float | None:
        delays = [t * 1000.0 for t in metrics.stable_word_times(self.run.events)]
        target = self.reference if self.reference is not None else self.offline_text
        return metrics.laal(delays, self.run.duration_s * 1000.0, len(target.split()))

    def erasure(self) -> metrics.Erasure:
        return metrics.normalized_erasure(self.run.events)


class Evaluator:
    """Holds the model and the config; runs streams and their offline decodes."""

    def __init__(
        self, cfg: Config, decoder: Decoder, block_ms: int, clock: Clock = time.perf_counter
    ) -> None:
        self.cfg = cfg
        self.decoder = decoder
        self.sample_rate = int(decoder.m.sample_rate)
        self.block = max(1, round(self.sample_rate * block_ms / 1000))
        self.clock = clock

    def _vad(self) -> FrameVad | None:
        from streamer.audio.vad import make_vad

        if not self.cfg.vad.enabled:
            return None
        return make_vad(self.cfg.vad.backend, self.sample_rate)

    def settings(self, lang: str, vad: FrameVad | None, *, partials: bool) -> SessionSettings:
        from streamer.service.engine_setup import session_settings

        frame = vad.frame_samples if vad is not None else 512
        base = session_settings(self.cfg, self.sample_rate, frame)
        return dataclasses.replace(base, lang=lang, partials=partials)

    def stream(self, audio: np.ndarray[Any, Any], lang: str, *, partials: bool) -> StreamRun:
        vad = self._vad()
        settings = self.settings(lang, vad, partials=partials)
        return simulate(audio, settings, self.decoder.run, vad, self.block, self.clock)

    def offline(self, audio: np.ndarray[Any, Any], lang: str) -> tuple[str, str, float]:
        """(text, mode, compute seconds) of the offline decode of ``audio``."""
        from streamer.core.session import DecodeRequest
        from streamer.core.text import complete_utf8

        settings = self.settings(lang, None, partials=False)
        if len(audio) <= settings.max_window:
            req = DecodeRequest(
                stream="offline",
                request_id=0,
                kind="final",
                segment=0,
                audio=np.asarray(audio, dtype=np.float32),
                start=0,
                end=len(audio),
                prompt=(),
                forced=(),
                max_new_tokens=settings.max_new_tokens(len(audio), 0),
                lang=lang,
            )
            t0 = self.clock()
            res = self.decoder.run(req)
            took = self.clock() - t0
            text, _ = complete_utf8(b"".join(res.pieces))
            return text.strip(), "single-window", took
        run = self.stream(audio, lang, partials=False)
        text = " ".join(e.text for e in run.finals)
        return text, "vad-segmented", run.decode_s + run.vad_s

    def evaluate(
        self,
        name: str,
        audio: np.ndarray[Any, Any],
        lang: str,
        reference: str | None,
    ) -> RunResult:
        from streamer.engine.loader import whisper_task

        m = self.cfg.model
        task = whisper_task(lang, m.target_language, m.task)
        out_lang = lang if task == "transcribe" else m.target_language
        run = self.stream(audio, lang, partials=True)
        offline_text, mode, offline_s = self.offline(audio, lang)
        return RunResult(
            name=name,
            lang=lang,
            task=task,
            out_lang=out_lang,
            reference=reference,
            run=run,
            offline_text=offline_text,
            offline_mode=mode,
            offline_s=offline_s,
        )


def reference_for(clip: Clip, task: str, target: str) -> str | None:
    """The manifest's reference for what the model is asked to produce, if any."""
    if task == "transcribe":
        return clip.text or None
    if target == "en":
        return clip.translation_en or None
    return None


# ------------------------------------------------------------------ scoring


def quality(results: Sequence[RunResult]) -> dict[str, Any]:
    """Corpus-level quality of the runs' streaming and offline output."""
    return metrics.quality_figures(
        results[0].task,
        results[0].out_lang,
        [r.reference for r in results],
        [r.hypothesis for r in results],
        [r.offline_text for r in results],
    )


def row(r: RunResult) -> dict[str, Any]:
    """The per-file (or per-long-stream) row of the report."""
    run = r.run
    er = r.erasure()
    compute = run.decode_s + run.vad_s
    finals = [
        {
            "segment": e.segment,
            "text": e.text,
            "start": e.start,
            "end": e.end,
            "emitted_s": e.time,
            "latency_ms": lat,
        }
        for e, lat in zip(run.finals, r.final_latencies(), strict=True)
    ]
    return metrics.rounded(
        {
            "name": r.name,
            "lang": r.lang,
            "task": r.task,
            "duration_s": run.duration_s,
            "reference": r.reference,
            "hypothesis": r.hypothesis,
            "offline": {"text": r.offline_text, "mode": r.offline_mode, "compute_s": r.offline_s},
            "quality": quality([r]),
            "latency_ms": {
                "final": metrics.summarize(r.final_latencies()),
                "first_partial": metrics.summarize(r.first_partial_latencies()),
                "partial": metrics.summarize(r.partial_latencies()),
                "laal": r.laal_ms(),
            },
            "normalized_erasure": er.normalized,
            "erased_words": er.erased_words,
            "final_words": er.final_words,
            "segments": len(run.finals),
            "partial_events": sum(e.kind == "partial" for e in run.events),
            "compute": {
                "decode_s": run.decode_s,
                "vad_s": run.vad_s,
                "rtf": compute / run.duration_s if run.duration_s else None,
                "partial_requests": run.partial_requests,
                "final_requests": run.final_requests,
                "failed_windows": run.failed_windows,
            },
            "finals": finals,
        }
    )


def aggregate(results: Sequence[RunResult]) -> dict[str, Any]:
    """Pooled figures over runs: corpus quality, pooled latencies, mean LAAL."""
    audio_s = sum(r.run.duration_s for r in results)
    decode_s = sum(r.run.decode_s for r in results)
    vad_s = sum(r.run.vad_s for r in results)
    offline_s = sum(r.offline_s for r in results)
    erased = sum(r.erasure().erased_words for r in results)
    words = sum(r.erasure().final_words for r in results)
    laals = [x for x in (r.laal_ms() for r in results) if x is not None]
    segments = sum(len(r.run.finals) for r in results)
    with_partial = sum(len(r.first_partial_latencies()) for r in results)
    return metrics.rounded(
        {
            "files": len(results),
            "audio_s": audio_s,
            "quality": quality(results),
            "latency_ms": {
                "final": metrics.summarize(v for r in results for v in r.final_latencies()),
                "first_partial": metrics.summarize(
                    v for r in results for v in r.first_partial_latencies()
                ),
                "partial": metrics.summarize(v for r in results for v in r.partial_latencies()),
                "laal_mean": float(np.mean(laals)) if laals else None,
                "segments_without_partial": segments - with_partial,
            },
            "normalized_erasure": erased / words if words else None,
            "compute": {
                "decode_s": decode_s,
                "vad_s": vad_s,
                "rtf": (decode_s + vad_s) / audio_s if audio_s else None,
                "decode_rtf": decode_s / audio_s if audio_s else None,
                "vad_rtf": vad_s / audio_s if audio_s else None,
            },
            "offline": {
                "modes": sorted({r.offline_mode for r in results}),
                "compute_s": offline_s,
                "rtf": offline_s / audio_s if audio_s else None,
            },
        }
    )


# ------------------------------------------------------------------ report


def machine_info() -> dict[str, Any]:
    import torch
    import transformers

    return {
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def config_info(cfg: Config, block_ms: int) -> dict[str, Any]:
    from streamer.config import config_to_dict

    full = config_to_dict(cfg)
    return {
        "model": full["model"],
        "streaming": full["streaming"],
        "vad": full["vad"],
        "block_ms": block_ms,
    }


def model_info(decoder: Decoder, load_s: float) -> dict[str, Any]:
    m = decoder.m
    return {
        "id": m.spec.id,
        "spec": dataclasses.asdict(m.spec),
        "path": m.path,
        "family": m.family,
        "device": str(m.device),
        "dtype": str(m.dtype).removeprefix("torch."),
        "parameters_m": round(sum(p.numel() for p in m.model.parameters()) / 1e6, 2),
        "load_s": round(load_s, 2),
    }


def _fmt(value: Any, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def summary_line(name: str, agg: dict[str, Any]) -> str:
    q = agg["quality"]
    if q["basis"] == "reference":
        s, o = q.get("streaming") or {}, q.get("offline") or {}
        if q["metric"] == "wer":
            qual = f"WER {_fmt(s.get('wer'), '.3f')} (offline {_fmt(o.get('wer'), '.3f')})"
        else:
            qual = (
                f"BLEU {_fmt(s.get('bleu'))} chrF {_fmt(s.get('chrf'))} "
                f"(offline {_fmt(o.get('bleu'))}/{_fmt(o.get('chrf'))})"
            )
    else:
        c = q["consistency"]
        qual = f"consistency vs offline: BLEU {_fmt(c.get('bleu'))} chrF {_fmt(c.get('chrf'))}"
    lat = agg["latency_ms"]
    return (
        f"{name:<22} {agg['audio_s']:6.1f}s  {qual}; final p50/p95 "
        f"{_fmt(lat['final']['p50'], '.0f')}/{_fmt(lat['final']['p95'], '.0f')} ms, "
        f"first partial p50 {_fmt(lat['first_partial']['p50'], '.0f')} ms, "
        f"LAAL {_fmt(lat['laal_mean'], '.0f')} ms, NE {_fmt(agg['normalized_erasure'], '.2f')}, "
        f"RTF {_fmt(agg['compute']['rtf'], '.2f')}"
    )


# ------------------------------------------------------------------ CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="tools/evaluate.py",
        description="Replay audio through the streaming path in simulated real time; "
        "write a JSON report.",
    )
    p.add_argument("--manifest", type=Path, default=None, help="manifest.jsonl")
    p.add_argument("--sets", default="", help="comma-separated set names (default: all)")
    p.add_argument("--limit", type=int, default=0, help="clips per set (0: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the long streams' gaps")
    p.add_argument("--block-ms", type=int, default=100, help="audio block size (ms)")
    p.add_argument("-c", "--config", action="append", default=[], help="config file(s)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value")
    p.add_argument("--no-long", action="store_true", help="skip the joined long streams")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument(
        "--clock",
        choices=("wall", "thread"),
        default="wall",
        help="what compute costs on the simulated clock: wall time, or this thread's CPU "
        "time (with --threads 1: timings that other jobs on the machine do not shift)",
    )
    p.add_argument("--output", type=Path, default=None, help="report path (JSON)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.block_ms <= 0:
        p.error("--block-ms must be positive")
    if args.limit < 0:
        p.error("--limit must be >= 0")
    return args


def select_sets(clips: Sequence[Clip], names: str, limit: int) -> dict[str, list[Clip]]:
    sets = group_sets(clips)
    if names:
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in sets]
        if unknown:
            raise SystemExit(f"unknown set(s) {unknown}; known: {sorted(sets)}")
        sets = {n: sets[n] for n in wanted}
    return {n: (c[:limit] if limit else c) for n, c in sets.items()}


def evaluate_set(
    ev: Evaluator, name: str, clips: Sequence[Clip], seed: int, long_stream: bool
) -> dict[str, Any]:
    from streamer.audio.resample import load_audio
    from streamer.engine.loader import whisper_task

    m = ev.cfg.model
    lang = clips[0].lang
    task = whisper_task(lang, m.target_language, m.task)
    audios = [load_audio(c.path, ev.sample_rate) for c in clips]
    results = []
    for clip, audio in zip(clips, audios, strict=True):
        ref = reference_for(clip, task, m.target_language)
        r = ev.evaluate(clip.name, audio, clip.lang, ref)
        log.info("%s: %s", clip.name, r.hypothesis)
        results.append(r)
    out: dict[str, Any] = {
        "lang": lang,
        "task": task,
        "output_lang": results[0].out_lang,
        "clips": {"aggregate": aggregate(results), "files": [row(r) for r in results]},
        "long_stream": None,
    }
    if long_stream and len(clips) > 1:
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        joined, gaps = join_stream(audios, ev.sample_rate, rng)
        refs = [r.reference for r in results]
        ref = None if any(x is None for x in refs) else " ".join(x or "" for x in refs)
        r = ev.evaluate(f"{name} (joined)", joined, lang, ref)
        log.info("%s long stream: %s", name, r.hypothesis)
        out["long_stream"] = {
            "clips": [c.name for c in clips],
            "gaps_s": [round(g, 3) for g in gaps],
            "aggregate": aggregate([r]),
            "row": row(r),
        }
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from streamer.config import load_config
    from streamer.errors import StreamerError

    try:
        cfg = load_config(args.config, args.overrides)
    except StreamerError as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 2
    manifest = (args.manifest or default_manifest()).resolve()
    sets = select_sets(load_manifest(manifest), args.sets, args.limit)

    import torch

    from streamer.service.engine_setup import make_decoder

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    try:
        decoder = make_decoder(cfg)
    except StreamerError as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 2
    load_s = time.perf_counter() - t0
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    ev = Evaluator(cfg, decoder, args.block_ms, clock)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "tool": "tools/evaluate.py",
        "version": VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "argv": list(sys.argv[1:] if argv is None else argv),
        "manifest": str(manifest),
        "seed": args.seed,
        "limit": args.limit,
        "model": model_info(decoder, load_s),
        "config": config_info(cfg, args.block_ms),
        "machine": machine_info(),
        "definitions": metrics.DEFINITIONS,
        "sets": {},
    }
    for name, clips in sets.items():
        print(f"evaluate: set {name} ({len(clips)} clip(s))", file=sys.stderr)
        report["sets"][name] = evaluate_set(ev, name, clips, args.seed, not args.no_long)
    report["wall_s"] = round(time.perf_counter() - started, 2)
    output = args.output
    if output is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        output = REPO_ROOT / "results" / f"evaluate-{stamp}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"model {cfg.model.id} on {report['model']['device']}", file=sys.stderr)
    for name, s in report["sets"].items():
        print(summary_line(f"{name} clips", s["clips"]["aggregate"]), file=sys.stderr)
        if s["long_stream"] is not None:
            print(summary_line(f"{name} long", s["long_stream"]["aggregate"]), file=sys.stderr)
    print(f"report: {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
