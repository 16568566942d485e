"""Offline-fast transcription/translation of files through the streaming core.

Files are read as fast as the machine allows and segmented by the same VAD
and session code as the daemon, with partial decoding off: each segment is
decoded once, at its endpoint, so the output equals the daemon's finals with
stabilisation off.

With translation targets (``[translation] targets``, ``--target-language
de,fr``), each final is also translated into every target. JSONL holds them
all, in order, each target's with its ``target``; subtitles and text hold one
language each, so they go to a folder: ``<stem>.srt`` (the source) and
``<stem>.<target>.srt`` per target (``.vtt``, ``.txt`` alike).
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import TextIO

from streamer.audio.resample import probe_audio
from streamer.audio.sources import FileSource
from streamer.config import Config, split_items
from streamer.service.engine_setup import start_engine
from streamer.service.output_file import output_file
from streamer.service.stream_factory import StreamFactory
from streamer.sinks.subtitles import write_srt, write_vtt
from streamer.types import Hypothesis

log = logging.getLogger(__name__)

#: File name extension per format written to a folder.
EXTENSIONS = {"srt": "srt", "vtt": "vtt", "text": "txt"}


def output_name(stem: str, fmt: str, target: str | None) -> str:
    """``<stem>.<ext>`` for the source, ``<stem>.<target>.<ext>`` for a target."""
    return f"{stem}.{EXTENSIONS[fmt]}" if target is None else f"{stem}.{target}.{EXTENSIONS[fmt]}"


def write_finals(fmt: str, finals: list[Hypothesis], out: TextIO) -> None:
    """One language's finals as ``fmt`` (srt, vtt or text)."""
    if fmt == "srt":
        write_srt(finals, out)
    elif fmt == "vtt":
        write_vtt(finals, out)
    else:
        for ev in finals:
            out.write(ev.text + "\n")


async def transcribe_files(
    cfg: Config, files: list[Path], fmt: str, out: TextIO, out_dir: Path | None = None
) -> int:
    """Decode ``files`` in order; ``fmt`` jsonl, text, srt or vtt. With ``out_dir``
    (not jsonl), one file per input file and language there (:func:`output_name`);
    translation targets need it."""
    from streamer.engine.client import EngineClient

    targets = split_items(cfg.translation.targets)
    if targets and fmt != "jsonl" and out_dir is None:
        raise ValueError("translation targets with srt, vtt or text need an output folder")
    for f in files:
        probe_audio(f)  # fail before the model loads
    engine = await asyncio.to_thread(start_engine, cfg)
    try:
        client = EngineClient(engine)
        for index, path in enumerate(files):
            finals: dict[str | None, list[Hypothesis]] = {None: []}
            finals.update((target, []) for target in targets)

            def publish(
                event: Hypothesis,
                sink: dict[str | None, list[Hypothesis]] = finals,
                name: str = str(path),
            ) -> None:
                if event.kind == "final":
                    sink.setdefault(event.target, []).append(event)
                    if fmt == "jsonl":
                        out.write(
                            json.dumps({**event.to_wire(), "file": name}, ensure_ascii=False) + "\n"
                        )
                        out.flush()

            stream = f"file{index}" if len(files) > 1 else "file"
            factory = StreamFactory(cfg, client, publish, partials=False, catch_up=False)
            runner = factory.create(stream)
            source = FileSource(path, stream, client.sample_rate, realtime=False)
            await runner.run(source.blocks())
            await runner.wait_done()
            if fmt != "jsonl" and out_dir is not None:
                for target, events in finals.items():
                    with output_file(out_dir / output_name(path.stem, fmt, target)) as sub:
                        write_finals(fmt, events, sub)
            elif fmt != "jsonl":
                write_finals(fmt, finals[None], out)
            log.info("%s: %d segment(s)", path, len(finals[None]))
        log.debug("engine stats %s", json.dumps({"rtf": engine.stats.real_time_factor}))
    finally:
        await asyncio.to_thread(engine.stop)
    return 0
