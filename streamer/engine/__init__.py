"""The engine: the only code that touches the model and the device (torch, transformers).

Importing any module of this package registers streamer's own model types
with transformers' Auto classes (``streamer.engine.whisper_sed``: Whisper's
encoder and decoder inside a ``SpeechEncoderDecoderModel``), so that
``SpeechEncoderDecoderModel.from_pretrained`` and
``AutoModelForSpeechSeq2Seq.from_pretrained`` load such checkpoints in any
process that imported the engine. It lives here, not in ``streamer/__init__.py``:
a bare ``import streamer`` (configuration, CLI parsing, the pure core) stays
free of torch and transformers.
"""

from streamer.engine import whisper_sed as _whisper_sed  # noqa: F401  # registers on import
