"""streamer: a streaming real-time speech translation daemon."""

__version__ = "0.1.0"
