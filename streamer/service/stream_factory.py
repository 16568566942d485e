"""Stream runners: one per stream id (a session, its VAD, its translation track).

``StreamFactory`` builds the runner of a new stream (file, microphone or
client) and remembers ended ids, so a stream that comes back continues its
numbering; ``open_source`` opens a configured file or microphone source.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from streamer.audio.vad import FrameVad, make_vad
from streamer.config import Config, SourceConfig, resolve_audio_path, split_items
from streamer.core.multi_target import MultiTargetSession
from streamer.core.segmenter import SegmenterSettings
from streamer.core.session import StreamSession
from streamer.core.translation import TranslationTrack
from streamer.service.engine_setup import session_settings
from streamer.service.seq_store import SeqReservations, SeqStoreError
from streamer.service.streams import StreamRunner
from streamer.types import Hypothesis

if TYPE_CHECKING:
    from streamer.engine.client import EngineClient

__all__ = ["MAX_REMEMBERED_STREAMS", "StreamFactory", "open_source", "probe_file_sources"]

log = logging.getLogger(__name__)


#: Stream ids whose numbering is remembered after they end (oldest forgotten first).
MAX_REMEMBERED_STREAMS = 4096


@dataclass
class StreamFactory:
    """Builds a runner (session + VAD) for a new stream id, and tracks the live ones.

    A stream id that comes back (a client reconnecting) continues its ``seq``
    and ``segment`` numbering, so subscribers that drop duplicates by ``seq``
    do not drop the new session's events. With ``seqs`` (the daemon), ``seq``
    also rises across restarts: a new stream id numbers after its durable mark,
    and every event's ``seq`` is reserved (on disk) before it is published; an
    event whose reservation cannot be written is not published (logged,
    counted in ``unsent``). ``run`` (the daemon's run id) is stamped on every
    event. Offline runs (``streamer transcribe``) have neither: ``seq`` from 1.
    """

    cfg: Config
    client: EngineClient
    publish: Callable[[Hypothesis], None]
    partials: bool = True
    catch_up: bool = True  # False: one final per segment whatever the timing (offline runs)
    run: str | None = None
    seqs: SeqReservations | None = None
    runners: dict[str, StreamRunner] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)
    _ended: OrderedDict[str, tuple[int, int]] = field(default_factory=OrderedDict)
    _released_held: float = 0.0
    _released_merged: int = 0
    unsent: int = 0  # events not published: their seq could not be reserved
    _store_failing: bool = False

    def create(
        self,
        stream: str,
        *,
        language: str | None = None,
        task: str | None = None,
        origin: str = "source",
        segmenter: Callable[[SegmenterSettings], SegmenterSettings] | None = None,
        seq_floor: int = 0,
        start: int = 0,
        targets: tuple[str, ...] | None = None,
    ) -> StreamRunner:
        """A runner for ``stream``; ``language`` ("auto" = detect), ``task`` and
        ``segmenter`` (endpointing) override the configuration for this stream only.

        A resumed stream: ``seq`` continues above ``seq_floor`` too (never below
        what this process or its durable marks know), and its audio begins at
        sample ``start`` of the stream: the session counts from 0 as always, and
        its events are moved onto the stream's clock as they are published.
        ``targets``: this stream's translation targets (None: ``[translation]
        targets``; ``()``: none)."""
        if stream in self.runners:
            raise ValueError(f"stream {stream!r} is already running")
        sr = self.client.sample_rate
        vad: FrameVad | None = make_vad(self.cfg.vad.backend, sr) if self.cfg.vad.enabled else None
        frame = vad.frame_samples if vad is not None else 512
        settings = session_settings(self.cfg, sr, frame)
        if not self.partials:
            settings = dataclasses.replace(settings, partials=False)
        if not self.catch_up:
            settings = dataclasses.replace(settings, catch_up=False)
        if language is not None:
            settings = dataclasses.replace(settings, lang=None if language == "auto" else language)
        if task is not None:
            settings = dataclasses.replace(settings, task=task)
        if segmenter is not None:
            settings = dataclasses.replace(settings, segmenter=segmenter(settings.segmenter))
        seq_after, first_segment = self._ended.pop(stream, (-1, 0))
        if seq_after < 0:  # not seen in this process: after its durable mark
            seq_after = self.seqs.start(stream) if self.seqs is not None else 0
        if targets is None:
            targets = split_items(self.cfg.translation.targets)
        seq_after = max(seq_after, seq_floor)
        track = None
        session: StreamSession
        if targets and set(targets) <= set(self.client.speech_targets):
            session = MultiTargetSession(  # the speech decode itself, one row per target
                stream, settings, targets, seq_after=seq_after, first_segment=first_segment
            )
        else:
            session = StreamSession(
                stream, settings, seq_after=seq_after, first_segment=first_segment
            )
            track = TranslationTrack(stream, targets) if targets else None
        publish: Callable[[Hypothesis], None] = self._publish
        if start:
            publish = functools.partial(self._publish_at, start / sr)
        runner = StreamRunner(session, self.client, publish, vad, translation=track)
        self.runners[stream] = runner
        self.origins[stream] = origin
        return runner

    def _publish_at(self, offset: float, event: Hypothesis) -> None:
        """Publish an event of a session whose audio begins ``offset`` s into its stream."""
        words = tuple(
            dataclasses.replace(w, start=w.start + offset, end=w.end + offset) for w in event.words
        )
        start, end = event.start + offset, event.end + offset
        self._publish(dataclasses.replace(event, start=start, end=end, words=words))

    def _publish(self, event: Hypothesis) -> None:
        """Reserve the event's ``seq`` durably, stamp the run id, then publish."""
        if self.seqs is not None:
            try:
                self.seqs.reserve(event.stream, event.seq)
            except SeqStoreError as exc:
                self.unsent += 1
                if not self._store_failing:  # once per failing streak
                    log.error("%s; events are not sent until it can be written", exc)
                self._store_failing = True
                return
            if self._store_failing:
                log.warning("seq reservations written again; %d event(s) were not sent",
                            self.unsent)  # fmt: skip
                self._store_failing = False
        if self.run is not None:
            event = dataclasses.replace(event, run=self.run)
        self.publish(event)

    def held_seconds(self) -> float:
        """Wall time, over every stream so far, that input was held back (engine behind)."""
        return self._released_held + sum(r.held_seconds for r in self.runners.values())

    def merged_segments(self) -> int:
        """Segments, over every stream so far, decoded together with an earlier one."""
        live = sum(r.session.merged_segments for r in self.runners.values())
        return self._released_merged + live

    def counts(self) -> dict[str, int]:
        """Live streams by origin ("source": configured, "client": /v1/stream)."""
        out = {"source": 0, "client": 0}
        for origin in self.origins.values():
            out[origin] = out.get(origin, 0) + 1
        return out

    def release(self, stream: str) -> None:
        """Forget a finished stream's runner, keeping its numbering for a comeback."""
        runner = self.runners.pop(stream, None)
        self.origins.pop(stream, None)
        if runner is None:
            return
        self._ended[stream] = (runner.session.last_seq, runner.session.next_segment)
        self._released_held += runner.held_seconds
        self._released_merged += runner.session.merged_segments
        while len(self._ended) > MAX_REMEMBERED_STREAMS:
            self._ended.popitem(last=False)


def open_source(
    src: SourceConfig, sample_rate: int, on_state: Callable[[str, str], None] | None = None
) -> Any:
    """The async block iterator for one configured source.

    ``on_state`` hears a microphone's "lost"/"restored" changes (on the loop).
    """
    if src.type == "file":
        from streamer.audio.sources import FileSource

        path = resolve_audio_path(src.path)
        return FileSource(
            path, src.stream, sample_rate, block_ms=src.block_ms, realtime=src.pace == "realtime"
        )
    from streamer.audio.capture import MicrophoneSource

    return MicrophoneSource(
        src.stream,
        sample_rate,
        device=src.device or None,
        block_ms=src.block_ms,
        channels=src.channels,
        device_rate=src.sample_rate or None,
        required=src.required,
        on_state=on_state,
    )


def probe_file_sources(cfg: Config) -> None:
    """Fail fast on unreadable source files, before the model loads."""
    from streamer.audio.resample import probe_audio

    for src in cfg.sources:
        if src.type == "file":
            probe_audio(resolve_audio_path(src.path))
