"""Tiny random-weight speech seq2seq checkpoints, built offline from configs.

Tests need real ``transformers`` checkpoints of every model family the engine
supports, but must not touch the network. Each ``make_*`` function builds a
model from a config under a fixed seed, a small tokenizer that behaves like the
family's real one, the family's feature extractor (and processor), saves them
all with ``save_pretrained`` and returns the folder, which then loads through
``AutoModelForSpeechSeq2Seq``, ``AutoFeatureExtractor``, ``AutoTokenizer`` and
``AutoProcessor``.

Sizes are overridable: ``make_whisper(path, d_model=64)`` sets a config field;
for the speech encoder-decoder (SED) families ``encoder_<field>`` goes to the
``Wav2Vec2Config`` and ``decoder_<field>`` to the decoder config, e.g.
``make_sed_bert(path, encoder_num_hidden_layers=3, decoder_hidden_size=64)``.
Unknown fields raise ``ValueError`` (configs would silently accept them), and
so does ``vocab_size``, which follows the tokenizer. ``build_*`` returns the
objects without saving (:class:`TinyCheckpoint`).

Special tokens follow the real families on purpose, since engine code must
cope with all of them (ids are in ``model.generation_config``); decoder start /
eos / pad are: sed_bert ``[CLS]`` / ``[SEP]`` / ``[PAD]``; sed_gpt2 one
``<|endoftext|>`` for all three; sed_mbart and speech2text ``</s>`` / ``</s>`` /
``<pad>``; whisper ``<|startoftranscript|>`` / ``<|endoftext|>`` /
``<|endoftext|>``. Whisper's ``generate()`` returns only the new tokens, the
others return the start token too.

GPT2 and Whisper tokenizers are byte-level BPE: characters outside the few
merged words (e.g. ``è``, ``ü``, ``日``) are spread over several tokens, each
of which alone decodes to U+FFFD. The BERT tokenizer is WordPiece, MBart and
Speech2Text use sentencepiece-style Unigram pieces (``▁`` marks a word start).
``sed_gpt2`` keeps encoder and decoder widths equal; the other SED families
differ, so their checkpoints carry an ``enc_to_dec_proj`` layer.

The EOS row of every output projection is zero, so greedy decoding never emits
EOS (see ``_finish``): callers fix the decode length.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import Unigram
from transformers import (
    BertConfig,
    BertTokenizer,
    FeatureExtractionMixin,
    GPT2Config,
    GPT2Tokenizer,
    MBartConfig,
    MBartTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Speech2TextConfig,
    Speech2TextFeatureExtractor,
    Speech2TextForConditionalGeneration,
    Speech2TextProcessor,
    SpeechEncoderDecoderConfig,
    SpeechEncoderDecoderModel,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2Processor,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)
from transformers.models.whisper.tokenization_whisper import LANGUAGES

SAMPLING_RATE = 16_000

# Words that get whole-word tokens; everything else falls back to pieces.
_WORDS = (
    "the", "and", "of", "to", "is", "in", "it", "hello", "world", "speech", "stream",
    "le", "la", "les", "de", "et", "est", "un", "une", "pas", "café", "été",
    "der", "die", "das", "und", "ist", "nicht",
)  # fmt: skip
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_ACCENTED = "éèêàâçùûîïôöüäß"
_DIGITS = "0123456789"
_PUNCT = ".,?!'-"

# Initialiser spread. With the usual 0.02 the logits are nearly flat (argmax
# margins ~0.03) and the audio barely reaches them; with 0.2 greedy output
# collapses into one repeated token. 0.1 gives varied tokens that depend on the
# audio, with median top-1/top-2 margins around 0.1-0.2. Whisper already
# repeats one token at 0.1 (its 30 s input is mostly padding), so it uses 0.05.
_INIT_RANGE = 0.1
_WHISPER_INIT_RANGE = 0.05

# Extra `generate()` keyword arguments per family: Whisper's prompt (without a
# language, Whisper's generate() first detects one among `lang_to_id`).
GENERATE_KWARGS: dict[str, dict[str, Any]] = {
    "sed_bert": {},
    "sed_gpt2": {},
    "sed_mbart": {},
    "whisper": {"language": "fr", "task": "translate"},
    "speech2text": {},
}


@dataclass(frozen=True, slots=True)
class _Ids:
    """Special token ids shared by model config and generation config."""

    pad: int
    bos: int
    eos: int
    start: int

    def config_fields(self) -> dict[str, int]:
        return {
            "pad_token_id": self.pad,
            "bos_token_id": self.bos,
            "eos_token_id": self.eos,
            "decoder_start_token_id": self.start,
        }


# Widths and depths shared by the tiny MBart, Whisper and Speech2Text configs.
TINY_SEQ2SEQ = {
    "d_model": 32,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
}


# --------------------------------------------------------------------------- tokenizers


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable-character table, in GPT-2's id order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _byte_level_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary: all 256 bytes plus merges for ``_WORDS``.

    Merges are built left to right per word, so every merge's parts are in the
    vocabulary. Words with a leading space (``Ġ``) come first: their merges all
    start with ``Ġ`` and outrank the rest, so each one becomes a single token.
    """
    table = _bytes_to_unicode()
    vocab = {char: i for i, char in enumerate(table.values())}
    merges: list[tuple[str, str]] = []
    for text in [" " + word for word in _WORDS] + list(_WORDS):
        symbols = [table[b] for b in text.encode("utf-8")]
        current = symbols[0]
        for symbol in symbols[1:]:
            merged = current + symbol
            if merged not in vocab:
                vocab[merged] = len(vocab)
                merges.append((current, symbol))
            current = merged
    return vocab, merges


def _gpt2_tokenizer() -> GPT2Tokenizer:
    """GPT-2 style: one ``<|endoftext|>`` is bos, eos, unk and pad."""
    vocab, merges = _byte_level_bpe()
    vocab["<|endoftext|>"] = len(vocab)
    merge_list: Any = merges  # typed as "a b" strings; the BPE model takes pairs too
    return GPT2Tokenizer(vocab=vocab, merges=merge_list, pad_token="<|endoftext|>")


def _whisper_special_tokens() -> list[str]:
    """Whisper's multilingual special tokens in the real order (notimestamps last)."""
    return [
        "<|endoftext|>",
        "<|startoftranscript|>",
        *(f"<|{code}|>" for code in LANGUAGES),
        "<|translate|>",
        "<|transcribe|>",
        "<|startoflm|>",
        "<|startofprev|>",
        "<|nocaptions|>",
        "<|notimestamps|>",
    ]


def _whisper_tokenizer() -> WhisperTokenizer:
    """Byte-level BPE with the multilingual special-token block after it."""
    vocab, merges = _byte_level_bpe()
    specials = _whisper_special_tokens()
    for token in specials:
        vocab[token] = len(vocab)
    return WhisperTokenizer(
        vocab=vocab,
        merges=merges,
        pad_token="<|endoftext|>",
        additional_special_tokens=specials[1:],
    )


def _bert_tokenizer(
    vocab_size: int | None = None, languages: tuple[str, ...] = ()
) -> BertTokenizer:
    """WordPiece over letters, ``##``-pieces and ``_WORDS``; padded with unused slots.

    ``languages``: a ``[xx]`` token each, the form of decoder language token the
    loader looks for (``loader.language_token``).
    """
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += [*_PUNCT, *_DIGITS, *_LETTERS, *_ACCENTED, *_WORDS]
    tokens += [f"##{c}" for c in _DIGITS + _LETTERS + _ACCENTED]
    tokens += [f"[{lang}]" for lang in languages]
    if vocab_size is not None:
        tokens += [f"[unused{i}]" for i in range(vocab_size - len(tokens))]
    vocab = {token: i for i, token in enumerate(tokens)}
    return BertTokenizer(vocab=vocab, strip_accents=False, bos_token="[CLS]", eos_token="[SEP]")


def _unigram_pieces() -> list[tuple[str, float]]:
    """Sentencepiece-style pieces: fairseq specials first, then scored pieces."""
    pieces = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{word}", -3.0) for word in _WORDS]
    for char in _LETTERS + _LETTERS.upper() + _ACCENTED + _DIGITS + _PUNCT:
        pieces += [(f"▁{char}", -4.5), (char, -5.0)]
    return pieces


def _mbart_tokenizer() -> MBartTokenizer:
    """MBart's own class: adds the fairseq language codes and ``<mask>``."""
    return MBartTokenizer(vocab=_unigram_pieces())


def _speech2text_tokenizer() -> PreTrainedTokenizerFast:
    """A Unigram + Metaspace tokenizer standing in for sentencepiece.

    ``Speech2TextTokenizer`` itself needs the ``sentencepiece`` package, which
    this project does not install.
    """
    backend = Tokenizer(Unigram(_unigram_pieces(), unk_id=3, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(prepend_scheme="always")]
    )
    backend.decoder = decoders.Metaspace(prepend_scheme="always")
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


# --------------------------------------------------------------------------- configs


def _merged(
    cls: type[PretrainedConfig], defaults: Mapping[str, Any], overrides: Mapping[str, Any]
) -> dict[str, Any]:
    """Defaults updated by overrides, refusing fields the config class lacks."""
    if "vocab_size" in overrides:
        raise ValueError("vocab_size follows the tokenizer and cannot be overridden")
    probe = cls()
    unknown = sorted(key for key in overrides if not hasattr(probe, key))
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {', '.join(unknown)}")
    return {**defaults, **overrides}


def _split_sed(overrides: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``encoder_*`` / ``decoder_*`` overrides for the two SED configs."""
    encoder: dict[str, Any] = {}
    decoder: dict[str, Any] = {}
    for key, value in overrides.items():
        side, _, field = key.partition("_")
        if side == "encoder" and field:
            encoder[field] = value
        elif side == "decoder" and field:
            decoder[field] = value
        else:
            raise ValueError(f"SED override {key!r} must start with 'encoder_' or 'decoder_'")
    return encoder, decoder


def _tiny_wav2vec2(hidden_size: int) -> dict[str, Any]:
    """wav2vec2 with the real conv strides (320 samples per frame), tiny widths."""
    return {
        "hidden_size": hidden_size,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 2 * hidden_size,
        "conv_dim": (32,) * 7,
        "conv_bias": True,
        "num_conv_pos_embeddings": 128,
        "num_conv_pos_embedding_groups": 16,
        "feat_extract_norm": "layer",
        "do_stable_layer_norm": True,
        "initializer_range": _INIT_RANGE,
    }


def _sed_config(
    encoder_defaults: Mapping[str, Any],
    decoder_cls: type[PretrainedConfig],
    decoder_defaults: Mapping[str, Any],
    overrides: Mapping[str, Any],
) -> SpeechEncoderDecoderConfig:
    encoder_overrides, decoder_overrides = _split_sed(overrides)
    encoder = Wav2Vec2Config(**_merged(Wav2Vec2Config, encoder_defaults, encoder_overrides))
    decoder = decoder_cls(**_merged(decoder_cls, decoder_defaults, decoder_overrides))
    config = SpeechEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    assert isinstance(config, SpeechEncoderDecoderConfig)
    return config


# --------------------------------------------------------------------------- building


@dataclass(frozen=True, slots=True)
class TinyCheckpoint:
    """An in-memory checkpoint: what ``make_*`` saves, for tests that want the objects."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    feature_extractor: FeatureExtractionMixin
    processor: ProcessorMixin

    def save(self, path: Path) -> Path:
        """Save everything with ``save_pretrained`` into ``path`` and return it.

        ``ProcessorMixin.save_pretrained`` folds the feature extractor into
        ``processor_config.json``; real checkpoints also carry
        ``preprocessor_config.json``, which some loaders read directly.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)
        self.feature_extractor.save_pretrained(path)
        return path


def _finish(model: PreTrainedModel, ids: _Ids) -> None:
    """Set the special ids on both configs and make EOS unreachable for greedy search.

    The output projection is untied from the input embedding (tied random
    weights make every token predict itself) and its EOS row is zeroed: the EOS
    logit is then exactly 0 while some of the other random logits are positive.
    The generation config is marked as not derived from the model config, else
    ``from_pretrained`` rebuilds it and drops Whisper's language tables.
    """
    for config in (model.config, model.generation_config):
        config.pad_token_id = ids.pad
        config.bos_token_id = ids.bos
        config.eos_token_id = ids.eos
        config.decoder_start_token_id = ids.start
    model.generation_config._from_model_config = False
    head = model.get_output_embeddings()  # type: ignore[no-untyped-call]
    if head is None or head.weight is model.get_input_embeddings().weight:
        raise RuntimeError(f"{type(model).__name__}: output projection missing or tied")
    with torch.no_grad():
        head.weight[ids.eos].zero_()
        if getattr(head, "bias", None) is not None:
            head.bias[ids.eos] = 0.0


def _model(factory: Callable[[], PreTrainedModel], seed: int, ids: _Ids) -> PreTrainedModel:
    """Construct under a fixed seed without disturbing the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory()
        _finish(model, ids)
    model.eval()  # type: ignore[no-untyped-call]
    return model


def _sed(
    config: SpeechEncoderDecoderConfig, tokenizer: PreTrainedTokenizerBase, ids: _Ids, seed: int
) -> TinyCheckpoint:
    model = _model(lambda: SpeechEncoderDecoderModel(config=config), seed, ids)
    feature_extractor = Wav2Vec2FeatureExtractor(  # type: ignore[no-untyped-call]
        feature_size=1,
        sampling_rate=SAMPLING_RATE,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=True,
    )
    processor = Wav2Vec2Processor(feature_extractor, tokenizer)  # type: ignore[no-untyped-call]
    return TinyCheckpoint(model, tokenizer, feature_extractor, processor)


def _token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    found = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(found, int) or tokenizer.convert_ids_to_tokens(found) != token:
        raise RuntimeError(f"token {token!r} missing from {type(tokenizer).__name__}")
    return found


def _ids(tokenizer: PreTrainedTokenizerBase, pad: str, bos: str, eos: str, start: str) -> _Ids:
    """Look the special tokens up, so the configs cannot disagree with the tokenizer."""
    return _Ids(
        pad=_token_id(tokenizer, pad),
        bos=_token_id(tokenizer, bos),
        eos=_token_id(tokenizer, eos),
        start=_token_id(tokenizer, start),
    )


def build_sed_bert(*, seed: int = 0, **size_overrides: Any) -> TinyCheckpoint:
    """wav2vec2 (layer-norm variant) + BERT decoder, WordPiece tokenizer."""
    tokenizer = _bert_tokenizer()
    ids = _ids(tokenizer, pad="[PAD]", bos="[CLS]", eos="[SEP]", start="[CLS]")
    decoder = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 256,
        "pad_token_id": ids.pad,
        "bos_token_id": ids.bos,
        "eos_token_id": ids.eos,
        "initializer_range": _INIT_RANGE,
        "tie_word_embeddings": False,
    }
    config = _sed_config(_tiny_wav2vec2(48), BertConfig, decoder, size_overrides)
    return _sed(config, tokenizer, ids, seed)


def build_sed_gpt2(*, seed: int = 0, **size_overrides: Any) -> TinyCheckpoint:
    """wav2vec2 + GPT-2 decoder, byte-level BPE; start, eos and pad are one token."""
    tokenizer = _gpt2_tokenizer()
    eot = "<|endoftext|>"
    ids = _ids(tokenizer, pad=eot, bos=eot, eos=eot, start=eot)
    decoder = {
        "vocab_size": len(tokenizer),
        "n_embd": 32,
        "n_layer": 2,
        "n_head": 2,
        "n_inner": 64,
        "n_positions": 256,
        "bos_token_id": ids.eos,
        "eos_token_id": ids.eos,
        "pad_token_id": ids.eos,
        "initializer_range": _INIT_RANGE,
        "tie_word_embeddings": False,
    }
    config = _sed_config(_tiny_wav2vec2(32), GPT2Config, decoder, size_overrides)
    return _sed(config, tokenizer, ids, seed)


def build_sed_mbart(*, seed: int = 0, **size_overrides: Any) -> TinyCheckpoint:
    """wav2vec2 + MBart decoder, Unigram pieces plus fairseq language codes.

    ``generate()`` sizes its cache from ``num_hidden_layers``, which MBart maps
    to ``encoder_layers``: that count always follows ``decoder_decoder_layers``.
    MBart's default ``forced_eos_token_id`` (EOS forced at max length) is unset.
    """
    tokenizer = _mbart_tokenizer()
    ids = _ids(tokenizer, pad="<pad>", bos="<s>", eos="</s>", start="</s>")
    decoder = {
        "vocab_size": len(tokenizer),
        **TINY_SEQ2SEQ,
        "max_position_embeddings": 256,
        "scale_embedding": True,
        **ids.config_fields(),
        "forced_eos_token_id": None,
        "init_std": _INIT_RANGE,
        "tie_word_embeddings": False,
    }
    overrides = dict(size_overrides)
    overrides["decoder_encoder_layers"] = overrides.get("decoder_decoder_layers", 2)
    config = _sed_config(_tiny_wav2vec2(48), MBartConfig, decoder, overrides)
    return _sed(config, tokenizer, ids, seed)


def build_whisper(*, seed: int = 0, **size_overrides: Any) -> TinyCheckpoint:
    """Whisper with the multilingual special-token layout and 80 mel bins.

    The generation config carries ``lang_to_id``, ``task_to_id`` and
    ``no_timestamps_token_id``, so ``generate(language="fr", task="translate")``
    builds the real prompt. There are no timestamp tokens: ``<|notimestamps|>``
    is the last id, so ``return_timestamps=True`` is not supported.
    """
    tokenizer = _whisper_tokenizer()

    def token_id(token: str) -> int:
        return _token_id(tokenizer, token)

    eot = "<|endoftext|>"
    ids = _ids(tokenizer, pad=eot, bos=eot, eos=eot, start="<|startoftranscript|>")
    begin_suppress = [token_id("Ġ"), ids.eos]  # as in the real checkpoints
    defaults = {
        "vocab_size": len(tokenizer),
        "num_mel_bins": 80,
        **TINY_SEQ2SEQ,
        "max_source_positions": 1500,
        "max_target_positions": 448,
        **ids.config_fields(),
        "suppress_tokens": [],
        "begin_suppress_tokens": begin_suppress,
        "init_std": _WHISPER_INIT_RANGE,
        "tie_word_embeddings": False,
    }
    config = WhisperConfig(**_merged(WhisperConfig, defaults, size_overrides))
    model = _model(lambda: WhisperForConditionalGeneration(config), seed, ids)
    whisper_generation = {  # the fields WhisperGenerationMixin reads
        "is_multilingual": True,
        "lang_to_id": {f"<|{code}|>": token_id(f"<|{code}|>") for code in LANGUAGES},
        "task_to_id": {task: token_id(f"<|{task}|>") for task in ("transcribe", "translate")},
        "no_timestamps_token_id": token_id("<|notimestamps|>"),
        "prev_sot_token_id": token_id("<|startofprev|>"),
        "suppress_tokens": [],
        "begin_suppress_tokens": begin_suppress,
        "forced_decoder_ids": None,
        "max_length": config.max_target_positions,
    }
    for key, value in whisper_generation.items():
        setattr(model.generation_config, key, value)
    feature_extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins)  # type: ignore[no-untyped-call]
    processor = WhisperProcessor(feature_extractor, tokenizer)  # type: ignore[no-untyped-call]
    return TinyCheckpoint(model, tokenizer, feature_extractor, processor)


def build_speech2text(*, seed: int = 0, **size_overrides: Any) -> TinyCheckpoint:
    """Speech2Text (conv subsampler + transformer) over 80 log-mel filterbanks.

    Speech2Text rejects ``attn_implementation="sdpa"``; the default loads eager.
    """
    tokenizer = _speech2text_tokenizer()
    ids = _ids(tokenizer, pad="<pad>", bos="<s>", eos="</s>", start="</s>")
    defaults = {
        "vocab_size": len(tokenizer),
        **TINY_SEQ2SEQ,
        "max_source_positions": 6000,
        "max_target_positions": 256,
        "num_conv_layers": 2,
        "conv_kernel_sizes": [5, 5],
        "conv_channels": 32,
        "input_feat_per_channel": 80,
        "input_channels": 1,
        "scale_embedding": True,
        **ids.config_fields(),
        "init_std": _INIT_RANGE,
        "tie_word_embeddings": False,
    }
    config = Speech2TextConfig(**_merged(Speech2TextConfig, defaults, size_overrides))
    model = _model(lambda: Speech2TextForConditionalGeneration(config), seed, ids)
    feature_extractor = Speech2TextFeatureExtractor(  # type: ignore[no-untyped-call]
        feature_size=config.input_feat_per_channel,
        num_mel_bins=config.input_feat_per_channel,
        sampling_rate=SAMPLING_RATE,
        return_attention_mask=True,
    )
    processor = Speech2TextProcessor(feature_extractor, tokenizer)  # type: ignore[no-untyped-call]
    return TinyCheckpoint(model, tokenizer, feature_extractor, processor)


def make_sed_bert(path: Path, *, seed: int = 0, **size_overrides: Any) -> Path:
    """Save :func:`build_sed_bert` into ``path``."""
    return build_sed_bert(seed=seed, **size_overrides).save(path)


def make_sed_gpt2(path: Path, *, seed: int = 0, **size_overrides: Any) -> Path:
    """Save :func:`build_sed_gpt2` into ``path``."""
    return build_sed_gpt2(seed=seed, **size_overrides).save(path)


def make_sed_mbart(path: Path, *, seed: int = 0, **size_overrides: Any) -> Path:
    """Save :func:`build_sed_mbart` into ``path``."""
    return build_sed_mbart(seed=seed, **size_overrides).save(path)


def make_whisper(path: Path, *, seed: int = 0, **size_overrides: Any) -> Path:
    """Save :func:`build_whisper` into ``path``."""
    return build_whisper(seed=seed, **size_overrides).save(path)


def make_speech2text(path: Path, *, seed: int = 0, **size_overrides: Any) -> Path:
    """Save :func:`build_speech2text` into ``path``."""
    return build_speech2text(seed=seed, **size_overrides).save(path)


# --------------------------------------------------------------------------- base size

_BASE_VOCAB = 30_522  # bert-base-uncased: the LM head's cost is part of a benchmark


def sed_base_config(vocab_size: int = _BASE_VOCAB) -> SpeechEncoderDecoderConfig:
    """wav2vec2-base widths (layer-norm variant) + BERT-base decoder: ≈ 256 M params."""
    encoder = Wav2Vec2Config(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)
    decoder = BertConfig(
        vocab_size=vocab_size,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=False,
    )
    config = SpeechEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    assert isinstance(config, SpeechEncoderDecoderConfig)
    return config


def make_sed_base_random(
    path: Path, *, seed: int = 0, vocab_size: int = _BASE_VOCAB, languages: tuple[str, ...] = ()
) -> Path:
    """A base-size random SED for benchmarks (≈ 1 GB on disk, ≈ 12 s to build; not for tests).

    The tokenizer is the tiny WordPiece one padded with ``[unusedN]`` tokens to
    ``vocab_size``, so every id the model emits decodes. ``languages``: decoder
    language tokens ``[en]``, ``[de]``... (the decoder then picks its target by
    its second start token, like xls-r-300m-en-to-15's mBART: random weights,
    the same cost).
    """
    tokenizer = _bert_tokenizer(vocab_size, languages)
    ids = _ids(tokenizer, pad="[PAD]", bos="[CLS]", eos="[SEP]", start="[CLS]")
    return _sed(sed_base_config(vocab_size), tokenizer, ids, seed).save(path)


BUILDERS: dict[str, Callable[..., TinyCheckpoint]] = {
    "sed_bert": build_sed_bert,
    "sed_gpt2": build_sed_gpt2,
    "sed_mbart": build_sed_mbart,
    "whisper": build_whisper,
    "speech2text": build_speech2text,
}

FAMILIES: dict[str, Callable[[Path], Path]] = {
    "sed_bert": make_sed_bert,
    "sed_gpt2": make_sed_gpt2,
    "sed_mbart": make_sed_mbart,
    "whisper": make_whisper,
    "speech2text": make_speech2text,
}
