"""From the configuration to a running engine: session settings, model, targets.

The config speaks in human units and names; the engine and the sans-I/O
session want sample counts, a loaded model, a translator (or the speech
model's own language rows) and scheduler limits. ``start_engine`` blocks
(model load, conversion on first use): call it off the event loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from streamer.config import Config, split_items
from streamer.core.segmenter import SegmenterSettings
from streamer.core.session import SessionSettings
from streamer.errors import ConfigError

if TYPE_CHECKING:
    from streamer.engine.core import Engine
    from streamer.engine.decoding import Decoder

__all__ = [
    "all_targets",
    "make_decoder",
    "make_translator",
    "model_spec",
    "session_settings",
    "speech_targets",
    "start_engine",
]


def session_settings(cfg: Config, sample_rate: int, frame_samples: int) -> SessionSettings:
    """Convert the config's human units (ms, s) into sample counts."""
    st, vad, model = cfg.streaming, cfg.vad, cfg.model

    def samples(seconds: float) -> int:
        return round(seconds * sample_rate)

    return SessionSettings(
        sample_rate=sample_rate,
        chunk=samples(st.chunk_ms / 1000),
        first_chunk=samples(st.first_chunk_ms / 1000),
        left_context=samples(st.left_context_s),
        max_segment=samples(st.max_segment_s),
        max_window=samples(st.max_window_s),
        agreement_n=st.agreement_n,
        policy="alignatt" if st.policy == "alignatt" else "local_agreement",
        alignatt_frames=st.alignatt_frames,
        alignatt_agreement=st.alignatt_agreement,
        partial_holdback_words=st.partial_holdback_words,
        word_timestamps=st.word_timestamps,
        short_final_rate=st.short_final_tokens_per_s,
        max_tokens_per_second=st.max_tokens_per_second,
        min_tokens=st.min_tokens,
        prompt_max_tokens=st.prompt_max_tokens,
        vad=vad.enabled,
        segmenter=SegmenterSettings(
            frame_samples=frame_samples,
            threshold=vad.threshold,
            min_speech=samples(vad.min_speech_ms / 1000),
            endpoint_silence=samples(st.endpoint_silence_ms / 1000),
        ),
        lang=None if model.source_language == "auto" else model.source_language,
        max_backlog=samples(st.max_backlog_s),
    )


def model_spec(cfg: Config) -> Any:
    from streamer.engine.loader import ModelSpec

    m = cfg.model
    return ModelSpec(
        id=m.id,
        device=m.device,
        dtype=m.dtype,
        source_language=m.source_language,
        target_language=m.target_language,
        task=m.task,
        num_beams=m.num_beams,
        cache_dir=m.cache_dir,
        alignment_heads=tuple(
            (int(layer), int(head))
            for layer, head in (item.split(":") for item in split_items(m.alignment_heads))
        ),
    )


def make_decoder(cfg: Config) -> Decoder:
    """Load the configured model into the daemon's decoder (blocking)."""
    from streamer.engine.decoding import Decoder
    from streamer.engine.loader import load_model

    return Decoder(load_model(model_spec(cfg)), cfg.streaming.whisper_input)


def all_targets(cfg: Config) -> tuple[str, ...]:
    """Every translation target the daemon serves: ``[translation] targets`` and
    ``websocket.client_targets`` (one model each, or one multilingual model)."""
    items = split_items(cfg.translation.targets) + split_items(cfg.websocket.client_targets)
    return tuple(dict.fromkeys(items))


def speech_targets(cfg: Config, decoder: Decoder) -> tuple[str, ...]:
    """The targets when the speech model decodes them itself, else ().

    A decoder that picks its output language by a token (an SED such as
    xls-r-300m-en-to-15) with a token for every target needs no cascade: each
    window is decoded once more per target from the same encoder pass
    (``MultiTargetSession``). That path is taken whenever it is possible,
    ``[translation] model`` or not.
    """
    from streamer.engine.loader import decodable_targets

    targets = all_targets(cfg)
    return targets if decodable_targets(decoder.m, targets) is not None else ()


def make_translator(cfg: Config) -> Any:
    """Load the ``[translation]`` checkpoint(s) (blocking); None without targets."""
    targets = all_targets(cfg)
    if not targets:
        return None
    from streamer.engine.translation import TranslationSpec, load_translator

    if not cfg.translation.model:
        raise ConfigError(
            "translation targets need translation.model: the speech model cannot decode "
            "them itself (its decoder has no language token for each of them)",
            key="translation.model",
        )
    m = cfg.model
    source = m.source_language if m.source_language != "auto" else "en"
    spec = TranslationSpec(cfg.translation.model, targets, source, m.device, m.dtype)
    return load_translator(spec)


def start_engine(cfg: Config) -> Engine:
    """Load the model and start the engine thread (blocking: call off the loop)."""
    from streamer.engine.core import Engine
    from streamer.engine.scheduler import SchedulerLimits
    from streamer.engine.translate_runner import TranslateLimits

    e = cfg.engine
    decoder = make_decoder(cfg)
    own = speech_targets(cfg, decoder)
    translator = None if own else make_translator(cfg)
    limits = SchedulerLimits(
        max_running=e.max_running,
        max_admit=e.max_admit,
        max_admit_samples=round(e.max_admit_audio_s * decoder.m.sample_rate),
        max_prefill_tokens=e.max_prefill_tokens,
    )
    tr = cfg.translation
    engine = Engine(
        decoder,
        max_consecutive_oom=e.max_consecutive_oom,
        limits=limits,
        compile=e.compile,
        translator=translator,
        translate_limits=TranslateLimits(max_rows=tr.max_rows, max_admit_rows=tr.max_admit_rows),
        speech_targets=own,
    )
    engine.start()
    return engine
