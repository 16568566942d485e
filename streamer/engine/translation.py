"""Loading text translation checkpoints for the cascade, and their target conventions.

``[translation] model`` names any Hugging Face text-to-text translation
checkpoint (hub id or folder), loaded with ``AutoModelForSeq2SeqLM`` /
``AutoTokenizer`` like any user's machine would. How a checkpoint picks its
target language is read from its tokenizer, per target:

- forced BOS: M2M100 (``__de__``), NLLB-200 (``deu_Latn``), mBART-50
  (``de_DE``): the source carries the source language token (``src_lang``),
  the decoder starts with its start token and the target's token;
- source prefix: Marian multi-target (``>>de<<``), MADLAD/T5 (``<2de>``):
  the source is ``>>de<< text``, the decoder starts with its start token;
- one pair per model: Marian opus-mt (``Helsinki-NLP/opus-mt-en-{target}``).

A model id containing ``{target}`` (and optionally ``{source}``) loads one
checkpoint per target; a model without any language token serves a single
target only. Two-letter codes map to NLLB's (``de`` -> ``deu_Latn``) and
mBART-50's (``de`` -> ``de_DE``); their own codes are accepted too.
Decoding is greedy (``generate(do_sample=False, num_beams=1)``): the runner
(``translate_runner.py``) reproduces it token for token with the KV cache.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from streamer.engine.loader import (
    _from_pretrained,
    resolve_device,
    resolve_dtype,
    route_transformers_logs,
)
from streamer.errors import ConfigError, ModelLoadError

log = logging.getLogger(__name__)

__all__ = ["TargetPlan", "TextModel", "TranslationSpec", "Translator", "load_translator"]

#: ISO 639-1 -> NLLB-200 (FLORES-200) codes of widely used languages.
NLLB_CODES = {
    "af": "afr_Latn", "ar": "arb_Arab", "bg": "bul_Cyrl", "bn": "ben_Beng", "ca": "cat_Latn",
    "cs": "ces_Latn", "cy": "cym_Latn", "da": "dan_Latn", "de": "deu_Latn", "el": "ell_Grek",
    "en": "eng_Latn", "es": "spa_Latn", "et": "est_Latn", "eu": "eus_Latn", "fa": "pes_Arab",
    "fi": "fin_Latn", "fr": "fra_Latn", "ga": "gle_Latn", "gl": "glg_Latn", "he": "heb_Hebr",
    "hi": "hin_Deva", "hr": "hrv_Latn", "hu": "hun_Latn", "hy": "hye_Armn", "id": "ind_Latn",
    "is": "isl_Latn", "it": "ita_Latn", "ja": "jpn_Jpan", "ka": "kat_Geor", "ko": "kor_Hang",
    "lt": "lit_Latn", "lv": "lvs_Latn", "mk": "mkd_Cyrl", "ms": "zsm_Latn", "mt": "mlt_Latn",
    "nb": "nob_Latn", "nl": "nld_Latn", "no": "nob_Latn", "pl": "pol_Latn", "pt": "por_Latn",
    "ro": "ron_Latn", "ru": "rus_Cyrl", "sk": "slk_Latn", "sl": "slv_Latn", "sq": "als_Latn",
    "sr": "srp_Cyrl", "sv": "swe_Latn", "sw": "swh_Latn", "ta": "tam_Taml", "th": "tha_Thai",
    "tr": "tur_Latn", "uk": "ukr_Cyrl", "ur": "urd_Arab", "vi": "vie_Latn", "zh": "zho_Hans",
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class TranslationSpec:
    """What the cascade loads (``[translation]`` plus the device of ``[model]``)."""

    model: str
    targets: tuple[str, ...]
    source_language: str = "en"
    device: str = "auto"
    dtype: str = "auto"
    max_length_ratio: float = 2.0  # new tokens per source token (+ ``min_tokens``)
    min_tokens: int = 8


@dataclass(slots=True, eq=False)
class TextModel:
    """One loaded checkpoint (shared by the targets it serves)."""

    key: str
    model: Any
    tokenizer: Any
    device: torch.device
    eos_token_id: int
    pad_token_id: int
    decoder_start: int
    max_positions: int
    suppress: torch.Tensor  # token ids generate() never emits (bad_words_ids, suppress_tokens)
    _src_lang: str | None = None

    def source_ids(self, text: str, src_code: str | None) -> list[int]:
        """Token ids of one source text (with the source language token where it has one)."""
        tok = self.tokenizer
        if src_code is not None and src_code != self._src_lang:
            tok.src_lang = src_code  # re-reads the special tokens (engine thread only)
            self._src_lang = src_code
        ids: list[int] = tok(text, truncation=True, max_length=self.max_positions)["input_ids"]
        return ids

    def encode(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder states (B, S, D) of right-padded sources and their mask (B, S) bool."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        return hidden, mask.bool()

    def logits(
        self, ids: torch.Tensor, enc: torch.Tensor, enc_mask: torch.Tensor, cache: Any
    ) -> torch.Tensor:
        """Logits (B, V) of each row's last position as float32, advancing ``cache``.

        The whole model's forward with the encoder output given: it adds what
        the family adds after its decoder (Marian's and mBART's
        ``final_logits_bias``, T5's rescaling), as ``generate`` does.
        """
        from transformers.modeling_outputs import BaseModelOutput

        out = self.model(
            attention_mask=enc_mask.long(),
            encoder_outputs=BaseModelOutput(last_hidden_state=enc),
            decoder_input_ids=ids,
            past_key_values=cache,
            use_cache=True,
        )
        logits = out.logits[:, -1, :].float()
        if self.suppress.numel():
            logits[:, self.suppress] = -float("inf")
        return logits  # type: ignore[no-any-return]

    def decode(self, tokens: list[int]) -> str:
        return str(self.tokenizer.decode(tokens, skip_special_tokens=True)).strip()


@dataclass(frozen=True, slots=True)
class TargetPlan:
    """How one target is produced: which model, what goes before the source and the output."""

    target: str
    model: TextModel
    source_prefix: str = ""  # ">>de<< " / "<2de> "
    start: tuple[int, ...] = ()  # decoder prefix: decoder start [+ forced target token]
    src_code: str | None = None  # the tokenizer's ``src_lang`` for the source language


@dataclass(slots=True)
class Translator:
    """Every target's plan; the models they share are loaded once."""

    spec: TranslationSpec
    plans: dict[str, TargetPlan] = field(default_factory=dict)
    _src_codes: dict[tuple[str, str], str | None] = field(default_factory=dict)

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(self.plans)

    @property
    def models(self) -> list[TextModel]:
        return list({id(p.model): p.model for p in self.plans.values()}.values())

    def max_new_tokens(self, plan: TargetPlan, source_tokens: int) -> int:
        s = self.spec
        cap = s.min_tokens + round(s.max_length_ratio * source_tokens)
        return max(1, min(cap, plan.model.max_positions - len(plan.start)))

    def source_code(self, plan: TargetPlan, source: str | None) -> str | None:
        """The tokenizer's code of a request's source language (None: the plan's default)."""
        if source is None or source == self.spec.source_language:
            return plan.src_code
        key = (plan.model.key, source)
        if key not in self._src_codes:
            code = _src_code(plan.model.tokenizer, source)
            self._src_codes[key] = code if code is not None else plan.src_code
        return self._src_codes[key]


def _vocab(tokenizer: Any) -> dict[str, int]:
    vocab: dict[str, int] = dict(tokenizer.get_vocab())
    for token, tid in (getattr(tokenizer, "lang_token_to_id", None) or {}).items():
        vocab.setdefault(token, int(tid))  # M2M100 keeps its language tokens apart
    return vocab


def _lang_token(tokenizer: Any, lang: str) -> str | None:
    """The token that names ``lang`` in this tokenizer's convention (None: none)."""
    vocab = _vocab(tokenizer)
    own = lang if "_" in lang else ""  # a code of the model's own (deu_Latn, de_DE)
    candidates = [own, f"__{lang}__", NLLB_CODES.get(lang, ""), f">>{lang}<<", f"<2{lang}>"]
    for cand in candidates:
        if cand and cand in vocab:
            return cand
    mbart = sorted(t for t in vocab if len(t) == 5 and t[2] == "_" and t[:2] == lang)
    return mbart[0] if len(mbart) == 1 else None


def _src_code(tokenizer: Any, lang: str) -> str | None:
    """The ``src_lang`` value that makes the tokenizer mark the source as ``lang``."""
    if not hasattr(tokenizer, "src_lang"):
        return None
    token = _lang_token(tokenizer, lang)
    if token is None or not _forced(token):
        return None
    return token[2:-2] if token.startswith("__") and token.endswith("__") else token  # M2M100


def _forced(token: str) -> bool:
    """Whether a language token is forced as the decoder's first token (not a source prefix)."""
    return not (token.startswith(">>") or token.startswith("<2"))


def _load_text_model(model_id: str, device: torch.device, dtype: torch.dtype) -> TextModel:
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

    config = _from_pretrained(AutoConfig, model_id)
    if not getattr(config, "is_encoder_decoder", False):
        raise ModelLoadError(
            f"{model_id}: a {config.model_type!r} model is not a text-to-text translation model"
        )
    model = _from_pretrained(AutoModelForSeq2SeqLM, model_id, dtype=dtype)
    model.to(device)
    model.eval()
    tokenizer = _from_pretrained(AutoTokenizer, model_id)
    gen = model.generation_config

    def special(name: str) -> int | None:
        for source in (gen, model.config, tokenizer):
            value = getattr(source, name, None)
            if isinstance(value, list):
                value = value[0] if value else None
            if value is not None:
                return int(value)
        return None

    eos, pad = special("eos_token_id"), special("pad_token_id")
    start = special("decoder_start_token_id")
    if eos is None or start is None:
        raise ModelLoadError(f"{model_id}: no eos_token_id or decoder_start_token_id")
    suppress = [w[0] for w in (getattr(gen, "bad_words_ids", None) or []) if len(w) == 1]
    suppress += list(getattr(gen, "suppress_tokens", None) or [])
    positions: Any = getattr(model.config, "max_position_embeddings", None)
    max_positions = int(positions or getattr(tokenizer, "model_max_length", 512))
    return TextModel(
        key=model_id,
        model=model,
        tokenizer=tokenizer,
        device=device,
        eos_token_id=eos,
        pad_token_id=pad if pad is not None else eos,
        decoder_start=start,
        max_positions=min(max_positions, 1024),
        suppress=torch.tensor(sorted(set(suppress)), dtype=torch.long, device=device),
    )


def _plan(target: str, model: TextModel, source: str, paired: bool) -> TargetPlan:
    """How ``model`` produces ``target``; a ConfigError when it cannot."""
    token = _lang_token(model.tokenizer, target)
    src_code = _src_code(model.tokenizer, source)
    start = (model.decoder_start,)
    if token is None:
        if not paired:
            raise ConfigError(
                f"{model.key} has no language token for target {target!r}; name one model "
                "per target with '{target}' in the id (Marian opus-mt) or use a multilingual "
                "model (M2M100, NLLB-200, mBART-50, MADLAD)",
                key="translation.targets",
            )
        return TargetPlan(target, model, start=start, src_code=src_code)
    if _forced(token):
        tid = _vocab(model.tokenizer)[token]
        return TargetPlan(target, model, start=(*start, tid), src_code=src_code)
    return TargetPlan(target, model, source_prefix=f"{token} ", start=start, src_code=src_code)


def load_translator(spec: TranslationSpec) -> Translator:
    """Load the checkpoint(s) of ``spec`` and plan every target; blocking."""
    if not spec.targets:
        raise ConfigError("no translation targets", key="translation.targets")
    route_transformers_logs()
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)  # int8 loads float32 here (not quantized)
    templated = "{target}" in spec.model
    loaded: dict[str, TextModel] = {}
    translator = Translator(spec)
    for target in spec.targets:
        model_id = spec.model.replace("{target}", target).replace("{source}", spec.source_language)
        if model_id not in loaded:
            loaded[model_id] = _load_text_model(model_id, device, dtype)
        paired = templated or len(spec.targets) == 1
        translator.plans[target] = _plan(target, loaded[model_id], spec.source_language, paired)
    for model in loaded.values():
        log.info(
            "translation model %s (%s, %.1fM parameters) on %s",
            model.key,
            model.model.config.model_type,
            sum(p.numel() for p in model.model.parameters()) / 1e6,
            device,
        )
    return translator
