"""Tiny random-weight text translation checkpoints, built offline from configs.

The cascade (``streamer.engine.translation``) loads any Hugging Face text
translation checkpoint; tests need one of each convention it handles, and
the network is out of reach. Each ``make_*`` builds a model from a config
under a fixed seed with a tokenizer of the family's real class and layout,
saves both with ``save_pretrained`` and returns the folder, which loads
through ``AutoModelForSeq2SeqLM`` / ``AutoTokenizer`` like a hub checkpoint:

- ``marian``: ``MarianMTModel`` + ``MarianTokenizer`` (sentencepiece
  ``source.spm``/``target.spm``, a shared ``vocab.json``); decoder start =
  pad, which ``generate`` never emits (``bad_words_ids``). One pair per
  model, as opus-mt; ``targets=("de", "fr")`` instead adds opus-mt's
  ``>>de<<`` target tokens (one model, many targets by a source prefix).
- ``m2m100``: ``M2M100ForConditionalGeneration`` + ``M2M100Tokenizer``
  (``__de__`` language tokens, sentencepiece); target by forced BOS.
- ``nllb``: the M2M100 architecture with ``NllbTokenizer`` (BPE with
  Metaspace, ``deu_Latn`` codes); target by forced BOS.
- ``mbart50``: ``MBartForConditionalGeneration`` + ``MBart50Tokenizer``
  (Unigram, ``de_DE`` codes); target by forced BOS.

The sentencepiece models are trained here on a few sentences (deterministic,
one thread). As in ``tiny_models``, the EOS row of the output projection is
zero and ``forced_eos_token_id`` is unset, so greedy decoding runs to its
length cap: callers fix the decode length.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    M2M100Config,
    M2M100ForConditionalGeneration,
    MarianConfig,
    MarianMTModel,
    MBart50Tokenizer,
    MBartConfig,
    MBartForConditionalGeneration,
    NllbTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from streamer.testing.tiny_models import TINY_SEQ2SEQ

__all__ = ["TRANSLATION_FAMILIES", "make_m2m100", "make_marian", "make_mbart50", "make_nllb"]

_CORPUS = (
    "hello world. the stream is speech.",
    "it is the speech of the world, and it is in the stream!",
    "le café est la. les gens ne sont pas ici? une ville et un pays.",
    "der hund und die katze. das ist nicht gut, oder?",
    "good morning, how are you today? fine, thanks.",
    "we translate captions into many languages at once.",
)
_CHARS = "abcdefghijklmnopqrstuvwxyzéèêàâçùûîïôöüäß0123456789.,?!'-"

#: Sizes shared by every tiny translation model.
_TINY = {
    **TINY_SEQ2SEQ,
    "max_position_embeddings": 128,
    "init_std": 0.1,  # as tiny_models: varied argmax that depends on the input
    "forced_eos_token_id": None,
    "tie_word_embeddings": False,
    "scale_embedding": True,
}


def _train_spm(path: Path, vocab_size: int = 120) -> None:
    """A sentencepiece unigram model with fairseq's special ids (unk 3 is set by callers)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 4),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        required_chars=_CHARS + _CHARS.upper(),
        num_threads=1,
        unk_id=0,
        bos_id=-1,
        eos_id=1,
        pad_id=2,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    path.write_bytes(model.getvalue())


def _spm_pieces(path: Path) -> list[str]:
    import sentencepiece as spm

    proc = spm.SentencePieceProcessor(model_file=str(path))
    return [proc.id_to_piece(i) for i in range(proc.get_piece_size())]


def _finish(model: PreTrainedModel, eos: int) -> PreTrainedModel:
    """EOS unreachable for greedy search (see the module docstring); eval mode."""
    head = model.get_output_embeddings()  # type: ignore[no-untyped-call]
    with torch.no_grad():
        head.weight[eos].zero_()
        bias = getattr(model, "final_logits_bias", None)
        if bias is not None:
            bias.zero_()
    model.generation_config._from_model_config = False
    model.eval()  # type: ignore[no-untyped-call]
    return model


def _build(factory: Callable[[], PreTrainedModel], seed: int, eos: int) -> PreTrainedModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _finish(factory(), eos)


def _vocab_size(tokenizer: PreTrainedTokenizerBase) -> int:
    """Every id the tokenizer can produce (``len`` misses some added language tokens)."""
    specials: Any = tokenizer.convert_tokens_to_ids(tokenizer.all_special_tokens)
    lang_ids = list(getattr(tokenizer, "lang_token_to_id", {}).values())  # M2M100's
    return int(max([*tokenizer.get_vocab().values(), *specials, *lang_ids])) + 1


def _token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    found: Any = tokenizer.convert_tokens_to_ids(token)
    return int(found)


def _save(path: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_marian(
    path: Path, *, seed: int = 0, targets: tuple[str, ...] = (), **overrides: Any
) -> Path:
    """A Marian (opus-mt layout) checkpoint; ``targets`` adds ``>>xx<<`` target tokens."""
    from transformers import MarianTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    spm_file = path / "source.spm"
    _train_spm(spm_file)
    (path / "target.spm").write_bytes(spm_file.read_bytes())
    tokens = ["</s>", "<unk>", *(f">>{t}<<" for t in targets)]
    tokens += [p for p in _spm_pieces(spm_file) if p not in ("<unk>", "</s>", "<pad>")]
    tokens.append("<pad>")  # opus-mt: pad is the last id and the decoder start
    vocab = {tok: i for i, tok in enumerate(tokens)}
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    tokenizer = MarianTokenizer(str(spm_file), str(path / "target.spm"), str(path / "vocab.json"))
    pad, eos = vocab["<pad>"], vocab["</s>"]
    fields = {**_TINY, **overrides}
    fields.pop("scale_embedding")
    config = MarianConfig(
        vocab_size=len(vocab),
        pad_token_id=pad,
        eos_token_id=eos,
        decoder_start_token_id=pad,
        scale_embedding=True,
        **fields,
    )
    model = _build(lambda: MarianMTModel(config), seed, eos)
    model.generation_config.bad_words_ids = [[pad]]  # as every opus-mt checkpoint
    return _save(path, model, tokenizer)


def _forced_bos_config(
    cls: Any, tokenizer: PreTrainedTokenizerBase, ids: dict[str, int], fields: dict[str, Any]
) -> Any:
    """The config of a model whose decoder starts at ``</s>``, then a forced language token."""
    return cls(
        vocab_size=_vocab_size(tokenizer),
        pad_token_id=ids["pad"],
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        decoder_start_token_id=ids["eos"],
        **fields,
    )


def make_m2m100(path: Path, *, seed: int = 0, **overrides: Any) -> Path:
    """An M2M100 checkpoint (``__xx__`` language tokens, target by forced BOS)."""
    from transformers import M2M100Tokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    spm_file = path / "sentencepiece.bpe.model"
    _train_spm(spm_file)
    tokens = ["<s>", "<pad>", "</s>", "<unk>"]
    tokens += [p for p in _spm_pieces(spm_file) if p not in ("<unk>", "</s>", "<pad>", "<s>")]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    tokenizer = M2M100Tokenizer(str(path / "vocab.json"), str(spm_file), num_madeup_words=0)
    return _m2m100_model(path, tokenizer, seed, overrides)


def _m2m100_model(
    path: Path, tokenizer: PreTrainedTokenizerBase, seed: int, overrides: dict[str, Any]
) -> Path:
    ids = {name: int(getattr(tokenizer, f"{name}_token_id")) for name in ("pad", "bos", "eos")}
    # Unscaled embeddings: with scale_embedding the sinusoidal positions drown the
    # tiny model's input and every source decodes alike (measured at d_model 32).
    fields = {**_TINY, "scale_embedding": False, **overrides}
    config = _forced_bos_config(M2M100Config, tokenizer, ids, fields)
    model = _build(lambda: M2M100ForConditionalGeneration(config), seed, ids["eos"])
    return _save(path, model, tokenizer)


def make_nllb(path: Path, *, seed: int = 0, **overrides: Any) -> Path:
    """NLLB-200's layout: the M2M100 architecture, ``NllbTokenizer`` with ``deu_Latn`` codes."""
    path = Path(path)
    pieces = ["<s>", "<pad>", "</s>", "<unk>", "▁"]
    pieces += [f"▁{c}" for c in _CHARS] + list(_CHARS)
    pieces += [f"▁{w}" for w in ("the", "hello", "world", "stream", "speech", "is", "and")]
    vocab = {p: i for i, p in enumerate(dict.fromkeys(pieces))}
    tokenizer = NllbTokenizer(vocab=vocab, merges=[])
    return _m2m100_model(path, tokenizer, seed, overrides)


def make_mbart50(path: Path, *, seed: int = 0, **overrides: Any) -> Path:
    """mBART-50 many-to-many's layout: ``MBart50Tokenizer`` (``de_DE`` codes), forced BOS."""
    from transformers.models.mbart50.tokenization_mbart50 import FAIRSEQ_LANGUAGE_CODES

    path = Path(path)
    scored = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    for c in _CHARS:
        scored += [(f"▁{c}", -4.5), (c, -5.0)]
    scored += [(code, 0.0) for code in FAIRSEQ_LANGUAGE_CODES] + [("<mask>", 0.0)]
    tokenizer = MBart50Tokenizer(vocab=scored)
    names = (("pad", "<pad>"), ("bos", "<s>"), ("eos", "</s>"))
    ids = {name: _token_id(tokenizer, tok) for name, tok in names}
    fields = {**_TINY, **overrides}
    config = _forced_bos_config(MBartConfig, tokenizer, ids, fields)
    model = _build(lambda: MBartForConditionalGeneration(config), seed, ids["eos"])
    return _save(path, model, tokenizer)


TRANSLATION_FAMILIES: dict[str, Callable[..., Path]] = {
    "marian": make_marian,
    "m2m100": make_m2m100,
    "nllb": make_nllb,
    "mbart50": make_mbart50,
}
