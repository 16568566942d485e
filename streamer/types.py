"""Value types shared by every layer (plain data, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
EventKind = Literal["partial", "final", "source_lost", "source_restored"]
WIRE_VERSION = 1


@dataclass(frozen=True, slots=True)
class AudioBlock:
    """Mono float32 audio at the model's rate, stamped with its absolute position.

    ``start`` is the index of the first sample in the stream (samples are the
    clock); ``arrival`` is an optional monotonic wall time stamped by the
    adapter that received the block, used only for latency figures.
    """

    stream: str
    start: int
    samples: FloatArray
    sample_rate: int
    arrival: float | None = None

    @property
    def end(self) -> int:
        return self.start + len(self.samples)


@dataclass(frozen=True, slots=True)
class Word:
    """One word of a caption with its audio span (stream seconds)."""

    word: str  # as the model wrote it, leading space included
    start: float
    end: float

    def to_wire(self) -> dict[str, Any]:
        return {"word": self.word, "start": round(self.start, 3), "end": round(self.end, 3)}


@dataclass(frozen=True, slots=True)
class Hypothesis:
    """A caption event: a partial (may change) or a final (never changes).

    ``start``/``end`` are seconds of stream audio; ``committed`` is append-only
    within a segment and ``tentative`` is the unstable tail (empty in finals).
    """

    kind: EventKind
    stream: str
    segment: int
    seq: int
    text: str
    start: float
    end: float
    committed: str = ""
    tentative: str = ""
    lang: str | None = None
    latency_ms: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    run: str | None = None  # id of the daemon process that numbered it (None: offline)
    words: tuple[Word, ...] = ()  # finals: every word; partials: the committed ones
    target: str | None = None  # a translation target's event; None: the speech model's own

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> Hypothesis:
        """Parse a caption event (clients of the daemon); unknown keys go to ``extra``."""
        known = {"v", "type", "stream", "segment", "seq", "text", "committed", "tentative",
                 "start", "end", "lang", "latency_ms", "run", "words", "target"}  # fmt: skip
        if obj.get("type") not in ("partial", "final"):
            raise ValueError(f"not a caption event: type {obj.get('type')!r}")
        return cls(
            kind=obj["type"],
            stream=str(obj["stream"]),
            segment=int(obj["segment"]),
            seq=int(obj["seq"]),
            text=str(obj["text"]),
            start=float(obj["start"]),
            end=float(obj["end"]),
            committed=str(obj.get("committed", "")),
            tentative=str(obj.get("tentative", "")),
            lang=obj.get("lang"),
            latency_ms=obj.get("latency_ms"),
            extra={k: v for k, v in obj.items() if k not in known},
            run=None if obj.get("run") is None else str(obj["run"]),
            words=tuple(
                Word(str(w["word"]), float(w["start"]), float(w["end"]))
                for w in obj.get("words") or ()
            ),
            target=None if obj.get("target") is None else str(obj["target"]),
        )

    def to_wire(self) -> dict[str, Any]:
        """The JSON object of DESIGN.md section 4 (one schema for every sink)."""
        out: dict[str, Any] = {
            "v": WIRE_VERSION,
            "type": self.kind,
            "stream": self.stream,
            "segment": self.segment,
            "seq": self.seq,
            "text": self.text,
        }
        if self.run is not None:
            out["run"] = self.run
        if self.kind == "partial":
            out["committed"] = self.committed
            out["tentative"] = self.tentative
        out["start"] = round(self.start, 3)
        out["end"] = round(self.end, 3)
        out["lang"] = self.lang
        out["latency_ms"] = None if self.latency_ms is None else round(self.latency_ms, 1)
        if self.words:
            out["words"] = [w.to_wire() for w in self.words]
        if self.target is not None:
            out["target"] = self.target
        out.update(self.extra)
        return out
