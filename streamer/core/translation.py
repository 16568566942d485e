"""Text translation requests of the cascade: what the engine is asked, what it answers.

The speech model's text is translated into each configured target by a text
translation model (``streamer.engine.translation``). A request carries
sentences, each translated on its own, and the targets wanted for all of
them: the engine encodes each sentence once and decodes one row per
(sentence, target), batched with the other requests of its step.
"""

from __future__ import annotations

import dataclasses
import re
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from streamer.types import Hypothesis

__all__ = [
    "TranslateRequest",
    "TranslateResult",
    "TranslationTrack",
    "join_sentences",
    "split_sentences",
]

TranslateKind = Literal["partial", "final"]


@dataclass(frozen=True, slots=True)
class TranslateRequest:
    """Translate each of ``texts`` (source language ``source``) into every one of ``targets``.

    ``kind``: finals are admitted first and never dropped; a waiting partial
    is replaced by a newer partial of the same stream (answered with the error
    ``"superseded"``). ``bulk``: the stream runs ahead of real time.
    """

    stream: str
    request_id: int
    kind: TranslateKind
    texts: tuple[str, ...]
    targets: tuple[str, ...]
    source: str | None = None  # None: the configured source language
    bulk: bool = False


@dataclass(frozen=True, slots=True)
class TranslateResult:
    """Per target, one translation per text of the request (in its order)."""

    request_id: int
    translations: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    error: str | None = None


# -- sentences ------------------------------------------------------------------------

#: Sentence ends: the terminator (and closing quotes or brackets after it), then a
#: space; CJK full stops end a sentence without one.
_SENTENCE_END = re.compile(r"(?:[.!?…]+[\"'»”’)\]]*\s+|[。！？]+[」』”’)]*\s*)")
#: Targets written without spaces between sentences.
_NO_SPACE = frozenset({"ja", "zh", "th", "yue"})


def split_sentences(text: str, final: bool) -> tuple[list[str], str]:
    """``text`` as closed sentences and the open rest (stripped).

    A sentence is closed by its terminator and the space after it, so appending
    text never reopens it: the closed sentences of a committed prefix are
    closed sentences of every longer text, the final included. ``final``: the
    text is complete, its rest is a sentence too.
    """
    closed: list[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        sentence = text[start : match.end()].strip()
        if sentence:
            closed.append(sentence)
        start = match.end()
    rest = text[start:].strip()
    if final and rest:
        closed.append(rest)
        rest = ""
    return closed, rest


def join_sentences(parts: list[str], target: str) -> str:
    sep = "" if target.split("_")[0].split("-")[0] in _NO_SPACE else " "
    return sep.join(p for p in parts if p)


# -- one stream's targets ---------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Segment:
    index: int
    committed: str = ""  # the source's committed text of the newest partial request
    partial: int | None = None  # newest partial request
    closing: bool = False  # the source final arrived: no more partials
    shown: set[str] = field(default_factory=set)  # targets that showed a partial


@dataclass(slots=True, eq=False)
class _Final:
    seg: _Segment
    source: Hypothesis
    sentences: list[str]
    ready: bool = False


@dataclass(slots=True, eq=False)
class _Pending:
    kind: TranslateKind
    seg: _Segment
    source: Hypothesis
    closed: list[str]
    rest: str
    texts: tuple[str, ...]
    final: _Final | None = None


class TranslationTrack:
    """One stream's captions in its target languages (sans-I/O, like ``StreamSession``).

    Feed it the source's events (``receive_source``) and the engine's answers
    (``receive_result``); drain ``requests_to_send()`` and ``events_received()``
    (events carry ``target`` and ``seq`` 0: the adapter numbers them in the
    stream's sequence and stamps their latency). Per target:

    - a partial translates the source's *committed* text only, so it never
      flickers with the tentative tail: its ``committed`` is the translation
      of the closed sentences, its ``tentative`` that of the open one;
    - a final translates the source final; finals go out in segment order and
      never change; a source final with empty text retracts the target's
      partials with an empty final;
    - sentences are translated once: a closed sentence's translation is kept
      (``cache_size`` sentences, least recently used forgotten) and reused by
      later partials and the final; only the open sentence is re-translated.
    """

    def __init__(self, stream: str, targets: tuple[str, ...], cache_size: int = 512) -> None:
        self.stream = stream
        self.targets = targets
        self.cache_size = cache_size
        self._cache: OrderedDict[str, dict[str, str]] = OrderedDict()
        self._segments: dict[int, _Segment] = {}
        self._finals: deque[_Final] = deque()
        self._in_flight: dict[int, _Pending] = {}
        self._requests: list[TranslateRequest] = []
        self._events: list[Hypothesis] = []
        self._next_request = 0
        self.failed = 0  # requests answered with an error other than "superseded"
        self.translated = 0  # sentences sent for translation

    # -- input --------------------------------------------------------------------------

    def receive_source(self, event: Hypothesis) -> None:
        """A source event of this stream (partials and finals; others are ignored)."""
        if event.target is not None or event.kind not in ("partial", "final"):
            return
        seg = self._segments.setdefault(event.segment, _Segment(event.segment))
        if event.kind == "final":
            self._receive_final(seg, event)
        elif not seg.closing:
            self._receive_partial(seg, event)

    def receive_result(self, result: TranslateResult) -> None:
        pending = self._in_flight.pop(result.request_id, None)
        if pending is None:
            return
        done: dict[str, dict[str, str]] = {}
        if result.error is None:
            for i, text in enumerate(pending.texts):
                done[text] = {t: result.translations[t][i] for t in self.targets}
            for sentence in pending.closed:
                if sentence in done:
                    self._remember(sentence, done[sentence])
        elif result.error != "superseded":
            self.failed += 1
        if pending.final is not None:
            pending.final.ready = True
            self._flush_finals()
        elif (  # a newer partial or the source final makes it moot
            result.error is None
            and pending.seg.partial == result.request_id
            and not pending.seg.closing
        ):
            self._emit_partial(pending, done)

    # -- output -------------------------------------------------------------------------

    def requests_to_send(self) -> list[TranslateRequest]:
        out, self._requests = self._requests, []
        return out

    def events_received(self) -> list[Hypothesis]:
        out, self._events = self._events, []
        return out

    @property
    def idle(self) -> bool:
        """No translation in flight and no target final waiting."""
        return not (self._in_flight or self._finals or self._requests)

    # -- internals ----------------------------------------------------------------------

    def _receive_partial(self, seg: _Segment, event: Hypothesis) -> None:
        committed = event.committed.strip()
        if not committed or committed == seg.committed:
            return
        seg.committed = committed
        closed, rest = split_sentences(event.committed, final=False)
        texts = [s for s in closed if s not in self._cache] + ([rest] if rest else [])
        pending = _Pending("partial", seg, event, closed, rest, tuple(dict.fromkeys(texts)))
        if not pending.texts:
            self._emit_partial(pending, {})
            return
        seg.partial = self._request(pending)

    def _receive_final(self, seg: _Segment, event: Hypothesis) -> None:
        seg.closing = True
        closed, _ = split_sentences(event.text, final=True)
        final = _Final(seg, event, closed)
        self._finals.append(final)
        texts = tuple(dict.fromkeys(s for s in closed if s not in self._cache))
        if texts:
            self._request(_Pending("final", seg, event, closed, "", texts, final))
        else:
            final.ready = True
            self._flush_finals()

    def _request(self, pending: _Pending) -> int:
        rid = self._next_request
        self._next_request += 1
        self._in_flight[rid] = pending
        self.translated += len(pending.texts)
        src = pending.source
        self._requests.append(
            TranslateRequest(self.stream, rid, pending.kind, pending.texts, self.targets, src.lang)
        )
        return rid

    def _remember(self, sentence: str, translations: dict[str, str]) -> None:
        self._cache[sentence] = translations
        self._cache.move_to_end(sentence)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _lookup(self, sentence: str, target: str, done: dict[str, dict[str, str]]) -> str:
        found = done.get(sentence) or self._cache.get(sentence)
        if found is not None and sentence in self._cache:
            self._cache.move_to_end(sentence)
        return found.get(target, "") if found is not None else ""

    def _emit_partial(self, pending: _Pending, done: dict[str, dict[str, str]]) -> None:
        src, seg = pending.source, pending.seg
        for target in self.targets:
            committed = join_sentences(
                [self._lookup(s, target, done) for s in pending.closed], target
            )
            tentative = self._lookup(pending.rest, target, done) if pending.rest else ""
            if committed and tentative and target.split("_")[0] not in _NO_SPACE:
                tentative = " " + tentative
            text = committed + tentative
            if not text.strip():
                continue
            seg.shown.add(target)
            self._events.append(
                dataclasses.replace(
                    src, seq=0, text=text, committed=committed, tentative=tentative,
                    latency_ms=None, words=(), target=target,
                )
            )  # fmt: skip

    def _flush_finals(self) -> None:
        """Emit the target finals whose translations are in, in segment order."""
        while self._finals and self._finals[0].ready:
            final = self._finals.popleft()
            src, seg = final.source, final.seg
            for target in self.targets:
                parts = [self._lookup(s, target, {}) for s in final.sentences]
                text = join_sentences(parts, target).strip()
                if not text and target not in seg.shown:
                    continue  # nothing shown, nothing to say (or retract)
                self._events.append(
                    dataclasses.replace(
                        src, seq=0, text=text, committed="", tentative="",
                        latency_ms=None, words=(), target=target,
                    )
                )  # fmt: skip
            if self._segments.get(seg.index) is seg:
                del self._segments[seg.index]
