"""Command line: ``streamer serve | transcribe | devices | check-config``.

Expected faults (``StreamerError``) print one line on stderr and exit with
their code (78 for configuration errors); only bugs print tracebacks.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from streamer import __version__
from streamer.config import Config, check_config, dump_toml, load_config, may_pick_language
from streamer.errors import EX_CONFIG, ConfigError, StreamerError
from streamer.service.exposure import exposure_warnings
from streamer.service.logs import configure_logging, report_error

log = logging.getLogger("streamer")

# OpenMP threads that spin while waiting turn every decode step 10-20x slower as
# soon as another process takes a core of a small machine (tools/profile_engine.py,
# README "Where the CPU time goes"); passive waiting costs nothing when it is
# quiet. Set before torch loads (it is imported lazily); the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _config(args: argparse.Namespace) -> Config:
    overrides = list(args.set or [])
    if getattr(args, "model", None):
        overrides.append(f"model.id={args.model!r}".replace("'", '"'))
    if getattr(args, "translation_model", None):
        overrides.append(f"translation.model={args.translation_model!r}".replace("'", '"'))
    for key in ("source_language", "device", "dtype"):
        value = getattr(args, key, None)
        if value:
            overrides.append(f'model.{key}="{value}"')
    target = getattr(args, "target_language", None)
    if target:
        overrides.append(_target_override(target, load_config(args.config or [], overrides)))
    return load_config(args.config or [], overrides)


def _target_override(value: str, cfg: Config) -> str:
    """``--target-language``: the translation targets when a translation model is
    configured (``[translation] model`` or ``--translation-model``), so the speech
    model keeps its own target (Whisper: ``en``), and several codes on a speech
    model that may pick its language by a token; else the speech model's target
    (one code, as before translation targets existed)."""
    items = [item.strip() for item in value.split(",") if item.strip()]
    if cfg.translation.model or (len(items) > 1 and may_pick_language(cfg.model.id)):
        # a cascade, or a speech-encoder-decoder whose decoder picks its language by
        # a token: decoded as rows beside the model's own target (README "Translation
        # targets"); the daemon refuses at start if the model lacks a target's token
        return f'translation.targets="{",".join(items)}"'
    if len(items) != 1:
        raise ConfigError(
            "several target languages need a translation model "
            "(--translation-model or [translation] model) or a speech model whose "
            "decoder picks its language by a token",
            key="translation.model",
        )
    return f'model.target_language="{items[0]}"'


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = _config(args)
    configure_logging(cfg.logging, level_override=args.log_level)
    from streamer.service.app import App

    app = App(
        cfg, keep_serving=True if args.keep_serving else None, reload_config=lambda: _config(args)
    )
    return asyncio.run(app.run())


def cmd_transcribe(args: argparse.Namespace) -> int:
    cfg = _config(args)
    configure_logging(cfg.logging, level_override=args.log_level or "warning")
    from streamer.service.output_file import output_file
    from streamer.service.transcribe import transcribe_files

    files = [Path(f) for f in args.files]
    folder = Path(args.output) if args.output and Path(args.output).is_dir() else None
    if args.format != "jsonl" and folder is None:
        if cfg.translation.targets:
            raise ConfigError(
                f"{args.format} output holds one language: with translation targets, "
                "-o must name a folder (it gets <stem>.<target>.<ext> per target)"
            )
        if args.format in ("srt", "vtt") and len(files) > 1:
            raise ConfigError(
                f"a {args.format.upper()} file holds one recording: with several files, "
                "-o must name a folder"
            )
    if args.format != "jsonl" and folder is not None:
        return asyncio.run(transcribe_files(cfg, files, args.format, sys.stdout, folder))
    with output_file(args.output or "-") as out:
        return asyncio.run(transcribe_files(cfg, files, args.format, out))


def cmd_devices(args: argparse.Namespace) -> int:
    from streamer.audio.devices import format_devices, list_devices

    print(format_devices(list_devices()))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    """Every error ``serve`` would meet short of loading weights, one line each."""
    from streamer.config_checks import check_everything

    report = check_config(args.files, args.set or [])
    errors = [*report.errors, *check_everything(report)]
    for error in errors:
        report_error(str(error), exit_code=EX_CONFIG)
    if errors:
        return EX_CONFIG
    cfg = report.config
    print(dump_toml(cfg), end="")
    print(f"# {', '.join(args.files) or 'defaults'}: valid", file=sys.stderr)
    for warning in exposure_warnings(cfg):
        print(f"# WARNING: {warning}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamer", description="Streaming real-time speech translation daemon."
    )
    parser.add_argument("--version", action="version", version=f"streamer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config",
            "-c",
            action="append",
            metavar="FILE",
            help="TOML config (repeatable; later files override earlier ones)",
        )
        p.add_argument(
            "--set",
            action="append",
            metavar="SECTION.KEY=VALUE",
            help="override one config key (repeatable)",
        )
        p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])

    serve = sub.add_parser(
        "serve", help="run the daemon (default: demo clip, WebSocket on localhost)"
    )
    common(serve)
    serve.add_argument(
        "--keep-serving", action="store_true", help="keep serving after the file sources end"
    )
    serve.set_defaults(func=cmd_serve)

    tr = sub.add_parser("transcribe", help="translate/transcribe audio files as fast as possible")
    common(tr)
    tr.add_argument("files", nargs="+", metavar="FILE")
    tr.add_argument(
        "--format",
        choices=["jsonl", "srt", "vtt", "text"],
        default="jsonl",
        help="jsonl: one final per line (with word timestamps; translations with 'target'); "
        "srt/vtt: subtitles timed by the words; text: plain lines. With -o a folder: "
        "<stem>.srt etc. per file, <stem>.<target>.srt per translation target",
    )
    tr.add_argument("--output", "-o", metavar="PATH", help="write here instead of stdout")
    tr.add_argument("--model", help="model id or checkpoint folder (overrides model.id)")
    tr.add_argument("--source-language", help="source language code, or auto")
    tr.add_argument(
        "--target-language",
        metavar="L[,L…]",
        help="with a translation model: the translation targets (e.g. de,fr; the speech "
        "model keeps its own target); without one: the speech model's target language",
    )
    tr.add_argument(
        "--translation-model", metavar="ID", help="text translation model (translation.model)"
    )
    tr.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    tr.add_argument("--dtype", help="auto, float32, float16, bfloat16, int8 (CPU)")
    tr.set_defaults(func=cmd_transcribe)

    dev = sub.add_parser("devices", help="list audio capture devices")
    dev.set_defaults(func=cmd_devices)

    chk = sub.add_parser("check-config", help="validate config files and print effective values")
    chk.add_argument("files", nargs="*", metavar="FILE")
    chk.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE")
    chk.set_defaults(func=cmd_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except StreamerError as exc:
        report_error(str(exc), exit_code=exc.exit_code)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
