"""Offline-fast transcription/translation of files through the streaming core.

Files are read as fast as the machine allows and segmented by the same VAD
and session code as the daemon, with partial decoding off: each segment is
decoded once, at its endpoint, so the output equals the daemon's finals with
stabilisation off.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import TextIO

from streamer.audio.resample import probe_audio
from streamer.audio.sources import FileSource
from streamer.config import Config
from streamer.service.app import StreamFactory, start_engine
from streamer.service.output_file import output_file
from streamer.sinks.subtitles import write_srt, write_vtt
from streamer.types import Hypothesis

log = logging.getLogger(__name__)


async def transcribe_files(
    cfg: Config, files: list[Path], fmt: str, out: TextIO, srt_dir: Path | None = None
) -> int:
    """Decode ``files`` in order; ``fmt`` jsonl, text, srt or vtt. With ``srt_dir``
    (subtitle formats), one ``<stem>.srt``/``.vtt`` per file there."""
    subtitles = {"srt": write_srt, "vtt": write_vtt}
    from streamer.engine.client import EngineClient

    for f in files:
        probe_audio(f)  # fail before the model loads
    engine = await asyncio.to_thread(start_engine, cfg)
    try:
        client = EngineClient(engine)
        for index, path in enumerate(files):
            finals: list[Hypothesis] = []

            def publish(
                event: Hypothesis, sink: list[Hypothesis] = finals, name: str = str(path)
            ) -> None:
                if event.kind == "final":
                    sink.append(event)
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
            if fmt in subtitles and srt_dir is not None:
                with output_file(srt_dir / f"{path.stem}.{fmt}") as sub:
                    subtitles[fmt](finals, sub)
            elif fmt in subtitles:
                subtitles[fmt](finals, out)
            elif fmt == "text":
                for ev in finals:
                    out.write(ev.text + "\n")
            log.info("%s: %d segment(s)", path, len(finals))
        log.debug("engine stats %s", json.dumps({"rtf": engine.stats.real_time_factor}))
    finally:
        await asyncio.to_thread(engine.stop)
    return 0
