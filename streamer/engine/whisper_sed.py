"""Whisper's own encoder and decoder as a ``SpeechEncoderDecoderModel``.

The seed's class composes a speech encoder from ``AutoModel`` and a text
decoder from ``AutoModelForCausalLM``. Stock transformers cannot compose it
from Whisper: ``AutoModel`` maps a ``WhisperConfig`` to the whole
``WhisperModel``, and ``WhisperForCausalLM.forward`` takes the encoder states
as ``encoder_outputs`` while ``SpeechEncoderDecoderModel.forward`` passes
``encoder_hidden_states`` (a ``TypeError``: duplicate keyword). Two small
subclasses with their own config ``model_type`` fix both:

* ``WhisperSEDEncoder`` (``streamer_whisper_encoder``): ``WhisperEncoder``,
  registered with ``AutoConfig`` and ``AutoModel``;
* ``WhisperSEDDecoder`` (``streamer_whisper_decoder``): ``WhisperForCausalLM``
  whose ``forward`` takes ``encoder_hidden_states``, registered with
  ``AutoConfig`` and ``AutoModelForCausalLM``.

:func:`register` runs when this module is imported, and
``streamer/engine/__init__.py`` imports it: every module of the engine, and
any script that imports one, can then load such a checkpoint with
``SpeechEncoderDecoderModel.from_pretrained`` or
``AutoModelForSpeechSeq2Seq.from_pretrained``. A bare ``import streamer``
does not register: it must stay light (no torch) for configuration and CLI
users. Without the registration transformers fails on the unknown model
type; :func:`unregistered_hint` is what the engine's loader then says.
:func:`build_sed_from_whisper` copies the converted Whisper base
1:1 into such a checkpoint (72.6 M parameters; both sides are 512 wide, so
there is no ``enc_to_dec_proj``); its generation config carries Whisper's
suppress lists, maximum length and prompt tables, and decoding starts from
Whisper's 4-token prompt ``<|startoftranscript|><|lang|><|task|><|notimestamps|>``
passed as ``decoder_input_ids`` (the engine's loader builds it from those tables).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder, WhisperForCausalLM

from streamer.errors import ConversionError

ENCODER_MODEL_TYPE = "streamer_whisper_encoder"
DECODER_MODEL_TYPE = "streamer_whisper_decoder"
#: Model types only this package can load (the loader's error names the import).
MODEL_TYPES = frozenset({ENCODER_MODEL_TYPE, DECODER_MODEL_TYPE})
MODEL_TYPE_PREFIX = "streamer_"
REGISTRATION_HINT = (
    "it needs the model classes of the `streamer` package: install streamer and "
    "`import streamer.engine` before loading (that import registers them with "
    "transformers' Auto classes)"
)

# Whisper's generation fields that the SED checkpoint keeps: the engine's loader
# builds Whisper's prompt from them (``streamer.engine.loader``).
_PROMPT_FIELDS = (
    "is_multilingual",
    "lang_to_id",
    "task_to_id",
    "no_timestamps_token_id",
    "prev_sot_token_id",
)


class WhisperSEDEncoderConfig(WhisperConfig):  # type: ignore[no-untyped-call]
    """A ``WhisperConfig`` that ``AutoModel`` maps to the encoder alone."""

    model_type = ENCODER_MODEL_TYPE


class WhisperSEDDecoderConfig(WhisperConfig):  # type: ignore[no-untyped-call]
    """A ``WhisperConfig`` that ``AutoModelForCausalLM`` maps to :class:`WhisperSEDDecoder`.

    Generic code (``generate()``'s cache sizing, ``DynamicCache(config=...)``)
    reads ``num_hidden_layers``; Whisper maps it to ``encoder_layers``, here it
    is the decoder's own depth.
    """

    model_type = DECODER_MODEL_TYPE
    attribute_map = {  # noqa: RUF012  # transformers reads it as a class attribute
        **WhisperConfig.attribute_map,
        "num_hidden_layers": "decoder_layers",
        "num_attention_heads": "decoder_attention_heads",
        "num_key_value_heads": "decoder_attention_heads",
    }


class WhisperSEDEncoder(WhisperEncoder):  # type: ignore[no-untyped-call]
    """Whisper's encoder (input: 3000 log-mel frames, output: 1500 frames)."""

    config_class = WhisperSEDEncoderConfig

    def _get_feature_vector_attention_mask(
        self, feature_vector_length: int, attention_mask: torch.Tensor
    ) -> torch.Tensor | None:
        """No encoder frame mask: Whisper attends to all 1500 frames (it was
        trained on zero-padded 30 s windows), as ``WhisperForConditionalGeneration`` does."""
        return None


class WhisperSEDDecoder(WhisperForCausalLM):  # type: ignore[no-untyped-call]
    """``WhisperForCausalLM`` with the decoder signature ``SpeechEncoderDecoderModel`` calls."""

    config_class = WhisperSEDDecoderConfig

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """``encoder_hidden_states`` go where ``WhisperForCausalLM`` wants ``encoder_outputs``.

        ``encoder_attention_mask`` is accepted and ignored: Whisper's decoder never
        masks encoder frames (``WhisperDecoder`` passes None to its layers).
        """
        del encoder_attention_mask
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_outputs=encoder_hidden_states,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            **kwargs,
        )


def register() -> None:
    """Make the two model types known to transformers' Auto classes (idempotent)."""
    AutoConfig.register(ENCODER_MODEL_TYPE, WhisperSEDEncoderConfig, exist_ok=True)
    AutoConfig.register(DECODER_MODEL_TYPE, WhisperSEDDecoderConfig, exist_ok=True)
    AutoModel.register(WhisperSEDEncoderConfig, WhisperSEDEncoder, exist_ok=True)
    AutoModelForCausalLM.register(WhisperSEDDecoderConfig, WhisperSEDDecoder, exist_ok=True)


def checkpoint_model_types(path: str | Path) -> set[str]:
    """The model types named in a local checkpoint's ``config.json`` (top level and parts)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    if not isinstance(config, dict):
        return set()
    found = {config.get("model_type")}
    for part in ("encoder", "decoder"):
        sub = config.get(part)
        if isinstance(sub, dict):
            found.add(sub.get("model_type"))
    return {t for t in found if isinstance(t, str)}


def unregistered_hint(path: str | Path) -> str | None:
    """Why transformers cannot read ``path``, when it names streamer's own model types.

    Stock transformers only says that it does not recognise the model type and
    lists several hundred others; this names the package and the import. Model
    types with our prefix that this version does not define come from a newer
    streamer. None when the checkpoint names none of them (or all are registered).
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    ours = sorted(
        t
        for t in checkpoint_model_types(path)
        if t.startswith(MODEL_TYPE_PREFIX) and t not in CONFIG_MAPPING
    )
    if not ours:
        return None
    known = [t for t in ours if t in MODEL_TYPES]
    if known:
        return f"model type {', '.join(known)}: {REGISTRATION_HINT}"
    from streamer import __version__

    return (
        f"model type {', '.join(ours)} belongs to the streamer package, but this version "
        f"({__version__}) does not define it: the checkpoint was built by a newer streamer; "
        "upgrade streamer to load it"
    )


def load_whisper_encoder(path: str | Path) -> WhisperSEDEncoder:
    """Whisper's encoder alone (float32), for ``from_encoder_decoder_pretrained(encoder_model=)``.

    ``path`` is a Whisper checkpoint (``WhisperForConditionalGeneration``) or a
    SED checkpoint built by :func:`build_sed_from_whisper`. ``AutoModel`` cannot
    do this: for a Whisper config it builds the whole ``WhisperModel``.
    """
    import transformers

    tf: Any = transformers  # partly untyped; keep mypy --strict quiet in one place
    kinds = checkpoint_model_types(path)
    try:
        if "whisper" in kinds:
            whisper = tf.WhisperForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
            config = _sub_config(WhisperSEDEncoderConfig, whisper.config.to_dict())
            encoder = WhisperSEDEncoder(config)
            encoder.load_state_dict(whisper.model.encoder.state_dict(), strict=True)
            encoder.train(False)
            return encoder
        if ENCODER_MODEL_TYPE in kinds:
            sed = tf.SpeechEncoderDecoderModel.from_pretrained(path, dtype=torch.float32)
            if not isinstance(sed.encoder, WhisperSEDEncoder):
                raise ConversionError(f"{path}: the encoder is not Whisper's")
            return sed.encoder
    except (OSError, ValueError) as exc:
        raise ConversionError(f"cannot load a Whisper encoder from {path}: {exc}") from exc
    raise ConversionError(f"{path} is neither a Whisper checkpoint nor a Whisper SED checkpoint")


# --------------------------------------------------------------------------- building

_README = """\
# Whisper base as a SpeechEncoderDecoderModel (built by streamer)

OpenAI Whisper base (MIT licence, https://github.com/openai/whisper), its
encoder and decoder copied 1:1 into a `transformers.SpeechEncoderDecoderModel`
by `streamer.engine.whisper_sed.build_sed_from_whisper` (`tools/make_whisper_sed.py`).

Loading needs the model classes of the `streamer` package (config model
types `streamer_whisper_encoder` and `streamer_whisper_decoder`):

    import streamer.engine  # registers them with transformers' Auto classes
    from transformers import SpeechEncoderDecoderModel
    model = SpeechEncoderDecoderModel.from_pretrained("THIS_FOLDER")

Decode with Whisper's prompt as `decoder_input_ids`, e.g.
`<|startoftranscript|><|fr|><|translate|><|notimestamps|>` (the ids are in
`generation_config.json`: `decoder_start_token_id`, `lang_to_id`, `task_to_id`,
`no_timestamps_token_id`). The streamer daemon does this itself: set
`model.id` to this folder. Weights are stored as {dtype}; `config.json` asks
for float32 by default (an exact upcast).
"""


def _sub_config(cls: type[WhisperConfig], whisper: dict[str, Any]) -> WhisperConfig:
    skip = ("model_type", "architectures", "_name_or_path", "transformers_version")
    fields = {k: v for k, v in whisper.items() if k not in skip}
    fields["dtype"] = "float32"
    return cls(**fields)


def _generation_config(wgen: Any, max_length: int) -> Any:
    """Whisper's ids, suppress lists, length and prompt tables (no forced ids: the
    prompt goes in as ``decoder_input_ids``)."""
    import transformers

    tf: Any = transformers
    ids = {
        "decoder_start_token_id": int(wgen.decoder_start_token_id),
        "pad_token_id": int(wgen.pad_token_id),
        "eos_token_id": int(wgen.eos_token_id),
        "bos_token_id": int(wgen.bos_token_id),
    }
    prompt = {k: getattr(wgen, k) for k in _PROMPT_FIELDS if getattr(wgen, k, None) is not None}
    missing = {"lang_to_id", "task_to_id", "no_timestamps_token_id"} - set(prompt)
    if missing:
        raise ConversionError(f"the Whisper generation config lacks {sorted(missing)}")
    gen = tf.GenerationConfig(
        **ids,
        suppress_tokens=[int(t) for t in wgen.suppress_tokens or []],
        begin_suppress_tokens=[int(t) for t in wgen.begin_suppress_tokens or []],
        max_length=int(wgen.max_length or max_length),
        **prompt,
    )
    gen._from_model_config = False  # keep it as saved: from_pretrained would rebuild it
    return gen


def build_sed_from_whisper(
    whisper_dir: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float16
) -> Path:
    """Save Whisper's encoder and decoder as a ``SpeechEncoderDecoderModel`` in ``out_dir``.

    The weights are copied 1:1 (``proj_out`` stays tied to the token
    embedding where Whisper's is) and stored as ``dtype``; ``config.json`` asks for float32, so a
    plain ``from_pretrained`` upcasts float16 exactly. The tokenizer and
    feature extractor are Whisper's. Writes into a temporary folder next to
    ``out_dir`` and renames it into place (an existing ``out_dir`` is
    replaced). Raises ``ConversionError``.
    """
    import transformers

    tf: Any = transformers

    register()
    whisper_dir, out_dir = Path(whisper_dir), Path(out_dir)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ConversionError(f"unsupported storage dtype {dtype}")
    try:
        whisper = tf.WhisperForConditionalGeneration.from_pretrained(
            whisper_dir, dtype=torch.float32
        )
        processor = tf.WhisperProcessor.from_pretrained(whisper_dir)
    except (OSError, ValueError) as exc:
        raise ConversionError(f"cannot load the Whisper checkpoint {whisper_dir}: {exc}") from exc
    wcfg = whisper.config.to_dict()
    encoder = WhisperSEDEncoder(_sub_config(WhisperSEDEncoderConfig, wcfg))
    decoder = WhisperSEDDecoder(_sub_config(WhisperSEDDecoderConfig, wcfg))
    encoder.load_state_dict(whisper.model.encoder.state_dict(), strict=True)
    decoder.model.decoder.load_state_dict(whisper.model.decoder.state_dict(), strict=True)
    tied = bool(whisper.config.tie_word_embeddings)  # real Whisper checkpoints: tied
    if tied:
        decoder.tie_weights()
    else:
        decoder.proj_out.load_state_dict(whisper.proj_out.state_dict(), strict=True)
    # The seed's composition: a speech encoder and a causal LM decoder with cross-attention.
    model = tf.SpeechEncoderDecoderModel(encoder=encoder, decoder=decoder)
    if tied and model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise ConversionError("the decoder's proj_out is not tied to its token embedding")
    if hasattr(model, "enc_to_dec_proj"):
        raise ConversionError("encoder and decoder widths differ: a projection would be random")
    gen = _generation_config(whisper.generation_config, whisper.config.max_target_positions)
    for key in ("decoder_start_token_id", "pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.config, key, getattr(gen, key))
    model.generation_config = gen
    model.to(dtype)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        # save_pretrained records the stored dtype; ask for float32 by default instead.
        for config in (model.config, model.config.encoder, model.config.decoder):
            config.dtype = torch.float32
        model.config.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        # some loaders read preprocessor_config.json directly
        processor.feature_extractor.save_pretrained(tmp)
        name = str(dtype).removeprefix("torch.")
        (tmp / "README.md").write_text(_README.format(dtype=name), encoding="utf-8")
        _fix_modes(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _fix_modes(folder: Path) -> None:
    """mkdtemp makes the folder 0700 (and safetensors writes 0600): use the umask's modes."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


register()
