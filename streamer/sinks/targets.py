"""Which languages a consumer takes: the source, translation targets, or both.

With ``[translation] targets`` one stream publishes the speech model's own
events (the *source*, ``Hypothesis.target`` None) and, interleaved in the
same ``seq`` sequence, the events of each target (``target="de"``, …). Most
consumers understand one language per stream only (the OpenAI Realtime and
Wyoming adapters, Hermes, subtitle files, a caption panel): a target final
mixed into their source would overwrite a segment's text. So every
subscription names the languages it takes, and the default is the source
alone; a consumer that handles targets asks for them.

A selection is a frozenset of language names, where :data:`SOURCE` names the
source, or None for every language (the source and every target). Status
events (``source_lost``/``source_restored``) are about the stream, not a
language: every selection takes them.
"""

from __future__ import annotations

import re

from streamer.types import Hypothesis

__all__ = [
    "ALL",
    "SOURCE",
    "SOURCE_ONLY",
    "TargetSelection",
    "language_of",
    "parse_targets",
    "selects",
]

#: The pseudo-target naming the speech model's own events (never a language code).
SOURCE = "source"
#: In a query: the source and every target.
ALL = "*"
#: A selection: language names (:data:`SOURCE` included or not); None: everything.
TargetSelection = frozenset[str] | None
#: The default selection: the speech model's own events only.
SOURCE_ONLY: frozenset[str] = frozenset({SOURCE})
#: A target's name as config and clients spell it (``de``, ``pt-BR``, ``deu_Latn``).
_TARGET = re.compile(r"[A-Za-z]{2,3}([_-][A-Za-z]{2,4})?")


def language_of(event: Hypothesis) -> str:
    """The language name ``event`` belongs to: its target, or :data:`SOURCE`."""
    return SOURCE if event.target is None else event.target


def selects(targets: TargetSelection, event: Hypothesis) -> bool:
    """Whether the selection ``targets`` takes ``event``."""
    if targets is None or event.kind not in ("partial", "final"):
        return True
    return language_of(event) in targets


def parse_targets(value: str) -> TargetSelection:
    """``de,fr`` / ``source,de`` / ``*`` -> a selection; ValueError with a reason."""
    items = [item.strip() for item in value.split(",")]
    if not items or any(not item for item in items):
        raise ValueError(f"empty item in targets={value!r}")
    if ALL in items:
        return None
    for item in items:
        if item != SOURCE and not _TARGET.fullmatch(item):
            raise ValueError(
                f"bad target {item!r} (expected a language code such as de, {SOURCE!r} or '*')"
            )
    return frozenset(items)
