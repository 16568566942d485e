"""The cascade's per-stream state: sentences, the sentence cache, target partials and finals."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamer.core.translation import (
    TranslateRequest,
    TranslateResult,
    TranslationTrack,
    split_sentences,
)
from streamer.core.wire import IngestPolicy, ProtocolError, parse_start
from streamer.types import Hypothesis


def fake(req: TranslateRequest) -> TranslateResult:
    """A translator: "<target>:<TEXT>" per text."""
    return TranslateResult(
        req.request_id, {t: tuple(f"{t}:{x.upper()}" for x in req.texts) for t in req.targets}
    )


def partial(seg: int, committed: str, tentative: str = " tail", seq: int = 1) -> Hypothesis:
    return Hypothesis(
        "partial", "s", seg, seq, committed + tentative, 0.0, 1.0,
        committed=committed, tentative=tentative, lang="en",
    )  # fmt: skip


def final(seg: int, text: str, seq: int = 9) -> Hypothesis:
    return Hypothesis("final", "s", seg, seq, text, 0.0, 2.0, lang="en")


def answer_all(track: TranslationTrack) -> list[TranslateRequest]:
    reqs = track.requests_to_send()
    for req in reqs:
        track.receive_result(fake(req))
    return reqs


def test_split_sentences() -> None:
    assert split_sentences("Hello. How are", final=False) == (["Hello."], "How are")
    assert split_sentences("Hello. How are you?", final=False) == (["Hello."], "How are you?")
    assert split_sentences("Hello. How are you?", final=True) == (["Hello.", "How are you?"], "")
    assert split_sentences('He said "no!" Then', final=False) == (['He said "no!"'], "Then")
    assert split_sentences("数字。次", final=False) == (["数字。"], "次")
    assert split_sentences("3.5 million", final=False) == ([], "3.5 million")


@given(st.text(alphabet="ab .!?\n", max_size=40), st.text(alphabet="ab .!?", max_size=20))
def test_closed_sentences_survive_extension(text: str, more: str) -> None:
    closed, _ = split_sentences(text, final=False)
    longer, _ = split_sentences(text + more, final=False)
    final_closed, _ = split_sentences(text + more, final=True)
    assert longer[: len(closed)] == closed
    assert final_closed[: len(closed)] == closed


def test_partials_translate_committed_text_only_and_sentences_once() -> None:
    track = TranslationTrack("s", ("de", "fr"))
    track.receive_source(partial(0, "", " hello"))  # nothing committed: nothing to translate
    assert not track.requests_to_send() and not track.events_received()
    track.receive_source(partial(0, "Hello world. How"))
    (req,) = answer_all(track)
    assert req.texts == ("Hello world.", "How") and req.targets == ("de", "fr")
    assert req.kind == "partial" and req.source == "en"
    de, fr = track.events_received()
    assert (de.target, de.committed, de.tentative) == ("de", "de:HELLO WORLD.", " de:HOW")
    assert fr.text == "fr:HELLO WORLD. fr:HOW" and fr.segment == 0 and fr.seq == 0
    track.receive_source(partial(0, "Hello world. How are you? Fine"))
    (req,) = answer_all(track)
    assert req.texts == ("How are you?", "Fine")  # the closed first sentence is reused
    de, _ = track.events_received()
    assert de.committed == "de:HELLO WORLD. de:HOW ARE YOU?"
    track.receive_source(partial(0, "Hello world. How are you? Fine", " changed tail"))
    assert not track.requests_to_send()  # committed text unchanged: nothing new
    track.receive_source(final(0, "Hello world. How are you? Fine thanks."))
    (req,) = answer_all(track)
    assert req.kind == "final" and req.texts == ("Fine thanks.",)
    de, fr = track.events_received()
    assert de.kind == "final" and de.text == "de:HELLO WORLD. de:HOW ARE YOU? de:FINE THANKS."
    assert de.text.startswith(de.text[: len("de:HELLO WORLD. de:HOW ARE YOU?")])
    assert track.idle and track.translated == 5


def test_finals_in_segment_order_and_stale_partials_dropped() -> None:
    track = TranslationTrack("s", ("de",))
    track.receive_source(partial(0, "One two"))
    stale = track.requests_to_send()
    track.receive_source(partial(0, "One two three"))
    newer = track.requests_to_send()
    track.receive_result(fake(newer[0]))
    track.receive_result(fake(stale[0]))  # an older partial's answer: not shown
    assert [e.text for e in track.events_received()] == ["de:ONE TWO THREE"]
    track.receive_source(final(0, "One two three four."))
    track.receive_source(final(1, "Five."))
    first, second = track.requests_to_send()
    track.receive_result(fake(second))  # segment 1 answered first: held back
    assert not track.events_received() and not track.idle
    track.receive_result(fake(first))
    assert [(e.segment, e.text) for e in track.events_received()] == [
        (0, "de:ONE TWO THREE FOUR."),
        (1, "de:FIVE."),
    ]


def test_empty_final_retracts_shown_targets_and_errors_are_counted() -> None:
    track = TranslationTrack("s", ("de",))
    track.receive_source(partial(0, "Um"))
    answer_all(track)
    assert track.events_received()
    track.receive_source(final(0, ""))
    (retract,) = track.events_received()
    assert retract.kind == "final" and retract.text == "" and retract.target == "de"
    track.receive_source(final(1, ""))  # nothing shown: nothing to retract
    assert not track.events_received()
    track.receive_source(final(2, "Broken."))
    (req,) = track.requests_to_send()
    track.receive_result(TranslateResult(req.request_id, error="out of memory"))
    assert track.failed == 1 and track.idle
    assert not track.events_received()  # nothing shown, nothing translated


def test_cache_is_bounded_and_target_events_are_ignored() -> None:
    track = TranslationTrack("s", ("de",), cache_size=2)
    for i in range(4):
        track.receive_source(final(i, f"Sentence {i}."))
        answer_all(track)
    assert len(track._cache) == 2
    event = track.events_received()[0]
    track.receive_source(event)  # its own output fed back: not translated again
    assert not track.requests_to_send()


def test_start_targets_from_the_allowed_list() -> None:
    def start(**fields: object) -> str:
        return json.dumps({"type": "start", "sample_rate": 16000, **fields})

    policy = IngestPolicy(targets=frozenset({"de", "fr"}))
    assert parse_start(start(), policy).targets is None  # the server's targets
    assert parse_start(start(targets=["fr", "de", "fr"]), policy).targets == ("fr", "de")
    assert parse_start(start(targets=[]), policy).targets == ()
    for bad, reason in (
        (["es"], "'es' is not allowed"),
        ("de", "must be a list"),
        ([1], "must be a list"),
    ):
        with pytest.raises(ProtocolError, match=reason) as info:
            parse_start(start(targets=bad), policy)
        assert info.value.close_code == 1008
    with pytest.raises(ProtocolError, match="does not let clients choose 'targets'"):
        parse_start(start(targets=["de"]), IngestPolicy())
