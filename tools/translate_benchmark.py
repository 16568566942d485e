"""What captions in more languages cost: engine compute per stream-second with 0, 1, 2, 4 targets.

Two ways to caption one stream in k further languages (README, "Translation
targets"), measured on random weights of realistic size:

* ``cascade``: the speech model's text translated by a text model, here a
  random Marian of opus-mt size (d_model 512, 6 + 6 layers, 8 heads, FFN 2048,
  vocabulary 58,101, multi-target ``>>xx<<`` tokens like opus-mt-en-ROMANCE),
  batched by the ``TranslationWorker`` on the engine thread;
* ``sed``: the speech model's own decoder, one more row per target from the
  same encoder pass (``MultiTargetSession`` / ``engine.targets``).

The speech model is the random base-size SED of ``tools/benchmark.py``
(wav2vec2-base encoder + BERT-base decoder, vocabulary 30,522), given the
decoder language tokens ``[en]``, ``[de]``... so it serves both: the cascade
runs it as a one-language model, the SED path with its tokens.

One stream of the test clips (``benchmark.speech``) goes through the sans-I/O
session (no VAD: segments are cut every ``--segment-s``), and every request is
answered before the next block of audio (0.5 s) is fed: every partial a
device that keeps up would decode is decoded, whatever this machine's speed,
so the figure is the work itself, not what a slow device skipped. Compute is
the engine's busy time (speech steps plus translation steps, on its own
thread, as in the daemon) per second of stream audio; the cascade's
translation share is reported apart, and the engine thread's CPU time (with
``--threads 1`` the whole work, robust to other jobs on a shared CPU).
Random models never emit EOS (DESIGN.md section 6): decodes run to their
caps: the speech model 8 + 4 tokens per second of window (the benchmark's),
each translation 8 + 1.2 tokens per source token (``TRANSLATION_RATIO``);
the JSON records both. The speech model's ``[unusedN]`` filler tokens are
masked (``speak_words``).

``--quick`` runs the same path on tiny models (the tests' SED with an mBART
decoder and a tiny Marian) for a few seconds: the test suite runs it so the
tool keeps working; its figures mean nothing.

    .venv/bin/python tools/translate_benchmark.py --out results/translate-cpu.json
    .venv/bin/python tools/translate_benchmark.py --device cuda --dtype bfloat16 ...
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import queue
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the `tools` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools import benchmark

log = logging.getLogger("translate_benchmark")

RATE = benchmark.RATE
LANGUAGES = ("en", "de", "fr", "es", "it")
OPUS_MT: dict[str, Any] = {  # Helsinki-NLP/opus-mt-en-ROMANCE's shape
    "d_model": 512,
    "encoder_layers": 6,
    "decoder_layers": 6,
    "encoder_attention_heads": 8,
    "decoder_attention_heads": 8,
    "encoder_ffn_dim": 2048,
    "decoder_ffn_dim": 2048,
    "max_position_embeddings": 512,
}
OPUS_MT_VOCAB = 58_101
SPEECH_TOKENS_PER_S = 4.0
#: Translation cap: 8 + this many tokens per source token (a translation is about as
#: long as its source; a random model runs to the cap, so 2.0, the default, doubles it).
TRANSLATION_RATIO = 1.2


def make_marian_opus_size(path: Path, targets: Sequence[str], quick: bool = False) -> Path:
    """A random Marian with ``>>xx<<`` target tokens; opus-mt size unless ``quick``.

    The tokenizer is the tiny test one (``tiny_translation.make_marian``), its
    vocabulary padded with unused pieces to ``OPUS_MT_VOCAB``: the LM head and
    embeddings have their real size. The EOS row of the head is zero (never
    chosen over the random logits): every decode runs to its cap.
    """
    import torch
    from transformers import MarianConfig, MarianMTModel

    from streamer.testing.tiny_translation import make_marian

    if (path / "config.json").exists():
        return path
    make_marian(path, targets=tuple(targets))
    if quick:
        return path
    vocab_file = path / "vocab.json"
    vocab: dict[str, int] = json.loads(vocab_file.read_text(encoding="utf-8"))
    pad = vocab.pop("<pad>")
    for i in range(OPUS_MT_VOCAB - 1 - len(vocab)):
        vocab[f"▁unused{i}"] = len(vocab)
    vocab["<pad>"] = len(vocab)  # opus-mt: pad is the last id and the decoder start
    assert vocab["<pad>"] >= pad
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    eos = vocab["</s>"]
    config = MarianConfig(
        vocab_size=len(vocab),
        pad_token_id=vocab["<pad>"],
        eos_token_id=eos,
        decoder_start_token_id=vocab["<pad>"],
        forced_eos_token_id=None,
        scale_embedding=True,
        tie_word_embeddings=False,
        **OPUS_MT,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MarianMTModel(config)
    with torch.no_grad():
        model.get_output_embeddings().weight[eos].zero_()
        model.final_logits_bias.zero_()
    model.generation_config.bad_words_ids = [[vocab["<pad>"]]]
    model.save_pretrained(path)
    return path


def speech_model(cache: Path, quick: bool) -> str:
    """The speech checkpoint: the base-size random SED with language tokens (tiny: mBART's)."""
    if quick:
        from streamer.testing.tiny_models import make_sed_mbart

        path = cache / "tiny-sed-mbart"
        return str(path if (path / "config.json").exists() else make_sed_mbart(path))
    from streamer.testing.tiny_models import make_sed_base_random

    path = cache / "sed-base-random-languages"
    if not (path / "config.json").exists():
        make_sed_base_random(path, languages=LANGUAGES)
    return str(path)


def speak_words(decoder: Any) -> None:
    """Keep the random speech model to its real pieces (words, letters, digits).

    The base SED's vocabulary is mostly ``[unusedN]`` fillers (its LM head
    has bert-base's size); as text each is a dozen characters, which the
    translation tokenizer cuts into a dozen tokens, so the cascade would
    translate 10x longer sources than speech gives. Masked, the text has about
    one translation token per speech token, as real speech has.
    """
    import torch

    m = decoder.m
    unused = [i for tok, i in m.tokenizer.get_vocab().items() if tok.startswith("[unused")]
    if unused:
        ids = torch.tensor(unused, dtype=torch.long, device=m.device)
        decoder._suppress = torch.cat([decoder._suppress, ids])


class Driver:
    """One stream through a session (and a cascade track) with every request answered in turn."""

    def __init__(self, engine: Any, session: Any, track: Any = None) -> None:
        self.engine, self.session, self.track = engine, session, track
        self.answers: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.pending = 0
        self.events: list[Any] = []

    def _send(self) -> bool:
        sent = False
        for req in self.session.requests_to_send():
            self.engine.submit(req, self.answers.put)
            self.pending += 1
            sent = True
        for event in self.session.events_received():
            self.events.append(event)
            if self.track is not None:
                self.track.receive_source(event)
        if self.track is not None:
            for treq in self.track.requests_to_send():
                self.engine.submit_translation(treq, self.answers.put)
                self.pending += 1
                sent = True
            self.events += self.track.events_received()
        return sent

    def settle(self) -> None:
        """Answer everything the last input asked for (and what the answers ask for)."""
        from streamer.core.session import DecodeResult

        self._send()
        while self.pending:
            answer = self.answers.get(timeout=600)
            self.pending -= 1
            if isinstance(answer, DecodeResult):
                self.session.receive_result(answer)
            else:
                assert self.track is not None
                self.track.receive_result(answer)
            self._send()

    def run(self, audio: Any, block: int) -> None:
        for i in range(0, len(audio), block):
            self.session.receive_audio(audio[i : i + block])
            self.settle()
        self.session.receive_end()
        self.settle()


def measure(
    mode: str,
    targets: tuple[str, ...],
    decoder: Any,
    translator: Any,
    settings: Any,
    audio: Any,
) -> dict[str, Any]:
    """One stream with ``targets`` by ``mode`` ("cascade" or "sed"); the engine's figures."""
    from streamer.core.multi_target import MultiTargetSession
    from streamer.core.session import StreamSession
    from streamer.core.translation import TranslationTrack
    from streamer.engine.core import Engine

    cascade = mode == "cascade" and bool(targets)
    engine = Engine(
        decoder,
        translator=translator if cascade else None,
        speech_targets=targets if mode == "sed" else (),
    )
    engine.start()
    ident = engine._thread.ident
    assert ident is not None
    clock = time.pthread_getcpuclockid(ident)  # the engine thread's CPU time
    try:
        cpu0 = time.clock_gettime(clock)
        if mode == "sed" and targets:
            session: Any = MultiTargetSession("s", settings, targets)
        else:
            session = StreamSession("s", settings)
        track = TranslationTrack("s", targets) if cascade else None
        driver = Driver(engine, session, track)
        t0 = time.perf_counter()
        driver.run(audio, RATE // 2)
        wall = time.perf_counter() - t0
        cpu = time.clock_gettime(clock) - cpu0
    finally:
        engine.stop()
    stats = engine.stats
    seconds = len(audio) / RATE
    events = driver.events
    return {
        "targets": len(targets),
        "compute_per_stream_second": round(stats.busy_seconds / seconds, 4),
        # the engine thread's own CPU time: on a shared CPU with one torch thread, what the
        # work costs whatever else runs (the busy time above stretches with contention)
        "engine_cpu_per_stream_second": round(cpu / seconds, 4),
        "translation_per_stream_second": round(stats.translate_seconds / seconds, 4),
        "speech_per_stream_second": round(
            (stats.busy_seconds - stats.translate_seconds) / seconds, 4
        ),
        "wall_s": round(wall, 2),
        "speech_requests": stats.requests,
        "translation_requests": stats.translate_requests,
        "mean_rows_per_step": round(stats.mean_batch, 2),
        "events": {
            "source": sum(e.target is None for e in events),
            "target": sum(e.target is not None for e in events),
        },
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--targets", default="0,1,2,4", help="target counts to measure")
    p.add_argument("--modes", default="cascade,sed")
    p.add_argument("--seconds", type=float, default=20.0, help="stream audio per run")
    p.add_argument("--segment-s", type=float, default=5.0, help="segments cut every this long")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="tiny models, seconds: the test suite's")
    p.add_argument("--cache-dir", default="", help="model cache (default: streamer's)")
    p.add_argument("--out", default="results/translate-benchmark.json")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    from streamer.engine.ct2_whisper import default_cache_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    seconds = min(args.seconds, 4.0) if args.quick else args.seconds
    counts = [int(n) for n in args.targets.split(",") if n]
    modes = [m for m in args.modes.split(",") if m]
    languages = LANGUAGES[1 : 1 + max(counts, default=0)]
    tmp = tempfile.TemporaryDirectory(prefix="translate-bench-") if args.quick else None
    cache = Path(args.cache_dir or (tmp.name if tmp else default_cache_dir()))
    cache.mkdir(parents=True, exist_ok=True)
    try:
        return _run(args, cache, seconds, counts, modes, languages)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _run(
    args: argparse.Namespace,
    cache: Path,
    seconds: float,
    counts: list[int],
    modes: list[str],
    languages: tuple[str, ...],
) -> int:
    import torch

    from streamer.core.session import SessionSettings
    from streamer.engine.decoding import Decoder
    from streamer.engine.loader import ModelSpec, load_model
    from streamer.engine.translation import TranslationSpec, load_translator
    from tools.gpu_sweep import fix_decode_length

    t0 = time.perf_counter()
    speech = speech_model(cache, args.quick)
    marian = cache / ("tiny-marian-multi" if args.quick else "marian-opus-mt-size-random")
    make_marian_opus_size(marian, languages, quick=args.quick)
    spec = ModelSpec(id=speech, device=args.device, dtype=args.dtype, source_language="en",
                     target_language="en")  # fmt: skip
    decoder = Decoder(load_model(spec))
    fix_decode_length(decoder)
    speak_words(decoder)
    tspec = TranslationSpec(str(marian), languages, "en", args.device, args.dtype,
                            max_length_ratio=TRANSLATION_RATIO)  # fmt: skip
    translator = load_translator(tspec) if "cascade" in modes and languages else None
    setup_s = time.perf_counter() - t0
    settings = SessionSettings(
        vad=False,
        max_segment=round(args.segment_s * RATE),
        max_tokens_per_second=SPEECH_TOKENS_PER_S,
        prompt_max_tokens=0,  # random text as a prompt would only lengthen the prefill
    )
    audio = benchmark.speech(seconds, 0)
    report: dict[str, Any] = {
        "device": args.device,
        "dtype": args.dtype,
        "torch_threads": torch.get_num_threads(),
        "quick": args.quick,
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "stream_seconds": seconds,
        "segment_s": args.segment_s,
        "chunk_s": settings.chunk / RATE,
        "speech_model": "tiny SED (mBART decoder)" if args.quick else "base-size random SED",
        "translation_model": "tiny Marian" if args.quick else "random Marian, opus-mt size",
        "translation_model_config": {} if args.quick else {**OPUS_MT, "vocab_size": OPUS_MT_VOCAB},
        "decode_length": {
            "speech": f"{settings.min_tokens} + {SPEECH_TOKENS_PER_S:g} tokens per window second",
            "translation": f"{tspec.min_tokens} + {tspec.max_length_ratio:g} per source token",
        },
        "setup_s": round(setup_s, 1),
        "runs": {},
    }
    for mode in modes:
        report["runs"][mode] = {}
        for n in counts:
            res = measure(mode, languages[:n], decoder, translator, settings, audio)
            report["runs"][mode][str(n)] = res
            print(f"{mode} targets={n}: {res['compute_per_stream_second']} s compute per "
                  f"stream-second (translation {res['translation_per_stream_second']})",
                  flush=True)  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(format_rows(table_rows(report)))
    print(f"-> {out}")
    return 0


def table_rows(report: dict[str, Any]) -> list[dict[str, str]]:
    """Rows for ``tools/gpu_sweep.py``'s table: one per mode and target count."""
    rows = []
    for mode, runs in report.get("runs", {}).items():
        for n, res in runs.items():
            rows.append(
                {
                    "mode": mode,
                    "targets": n,
                    "compute/s": f"{res['compute_per_stream_second']:.3f}",
                    "engine CPU/s": f"{res.get('engine_cpu_per_stream_second', 0.0):.3f}",
                    "translation/s": f"{res['translation_per_stream_second']:.3f}",
                }
            )
    return rows


def format_rows(rows: list[dict[str, str]]) -> str:
    """``rows`` as aligned text columns (the keys of the first row)."""
    if not rows:
        return "(no runs)"
    names = list(rows[0])
    widths = {n: max(len(n), *(len(r.get(n, "-")) for r in rows)) for n in names}
    lines = ["  ".join(n.ljust(widths[n]) for n in names).rstrip()]
    lines += ["  ".join(r.get(n, "-").ljust(widths[n]) for n in names).rstrip() for r in rows]
    return "\n".join(lines)


__all__ = ["Driver", "format_rows", "main", "make_marian_opus_size", "measure", "table_rows"]

if __name__ == "__main__":
    sys.exit(main())
