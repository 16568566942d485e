"""``start.resume`` of /v1/stream: what a reconnecting client may claim, without sockets."""

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamer.core.wire import (
    MAX_RESUME_OFFSET_S,
    MAX_RESUME_SEQ,
    IngestPolicy,
    Resume,
    parse_start,
)
from streamer.errors import ProtocolError
from streamer.service.resume import SEQ_GAP, plan_resume
from streamer.sinks.history import FinalHistory
from streamer.types import Hypothesis


def start(**fields: object) -> str:
    return json.dumps({"type": "start", "sample_rate": 16000, "stream": "alice", **fields})


def test_resume_parsed_and_echoed_in_ready() -> None:
    msg = parse_start(start(resume={"seq": 41, "offset": 12.48}), IngestPolicy())
    assert msg.resume == Resume(41, 12.48)
    assert parse_start(start(resume={"seq": 0, "offset": 0}), IngestPolicy()).resume == Resume(0, 0)
    assert parse_start(start(), IngestPolicy()).resume is None
    ready = msg.ready(16000, "alice", Resume(1041, 12.48))
    assert ready["resume"] == {"seq": 1041, "offset": 12.48}
    assert "resume" not in msg.ready(16000, "alice")


@pytest.mark.parametrize(
    ("resume", "words"),
    [
        ([1, 2], "must be {"),
        ({"seq": 1}, "must be {"),
        ({"seq": 1, "offset": 0, "run": "x"}, "must be {"),
        ({"seq": True, "offset": 0}, "resume.seq must be an integer"),
        ({"seq": 1.0, "offset": 0}, "resume.seq must be an integer"),
        ({"seq": "1", "offset": 0}, "resume.seq must be an integer"),
        ({"seq": -1, "offset": 0}, "resume.seq must be an integer"),
        ({"seq": MAX_RESUME_SEQ + 1, "offset": 0}, "resume.seq must be an integer"),
        ({"seq": 1, "offset": -0.001}, "resume.offset must be seconds"),
        ({"seq": 1, "offset": "3"}, "resume.offset must be seconds"),
        ({"seq": 1, "offset": False}, "resume.offset must be seconds"),
        ({"seq": 1, "offset": None}, "resume.offset must be seconds"),
        ({"seq": 1, "offset": MAX_RESUME_OFFSET_S * 2}, "resume.offset must be seconds"),
    ],
)
def test_bad_resume_is_a_1008_naming_the_field(resume: object, words: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_start(start(resume=resume), IngestPolicy())
    assert info.value.close_code == 1008
    assert words in str(info.value)


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_offset_refused(number: str) -> None:
    text = start()[:-1] + f', "resume": {{"seq": 1, "offset": {number}}}}}'
    with pytest.raises(ProtocolError, match=r"resume\.offset") as info:
        parse_start(text, IngestPolicy())
    assert info.value.close_code == 1008


def test_resume_needs_the_stream_it_continues() -> None:
    text = json.dumps({"type": "start", "sample_rate": 16000, "resume": {"seq": 1, "offset": 0}})
    with pytest.raises(ProtocolError, match="needs the 'stream'"):
        parse_start(text, IngestPolicy())


def test_a_huge_integer_is_bad_json_not_a_crash() -> None:
    text = start()[:-1] + ', "resume": {"seq": ' + "9" * 5000 + ', "offset": 0}}'
    with pytest.raises(ProtocolError) as info:
        parse_start(text, IngestPolicy())
    assert info.value.close_code == 1007


@given(
    seq=st.integers(min_value=0, max_value=MAX_RESUME_SEQ),
    offset=st.floats(min_value=0, max_value=MAX_RESUME_OFFSET_S),
)
def test_every_valid_resume_round_trips(seq: int, offset: float) -> None:
    msg = parse_start(start(resume={"seq": seq, "offset": offset}), IngestPolicy())
    assert msg.resume == Resume(seq, offset) and math.isfinite(msg.resume.offset)


# -- where the new session begins (streamer.service.resume) ------------------------------


def final(seq: int, start: float, end: float, stream: str = "alice") -> Hypothesis:
    return Hypothesis("final", stream, seq, seq, f"text {seq}", start, end)


def test_plan_on_a_daemon_that_never_ran_the_stream() -> None:
    plan = plan_resume(Resume(41, 12.48), FinalHistory(), "alice", 16000)
    assert (plan.seq_floor, plan.start, plan.skip, plan.replay) == (41 + SEQ_GAP, 199680, 0, ())


def test_plan_replays_what_this_daemon_finalised_after_the_client_left() -> None:
    history = FinalHistory()
    for event in (
        final(40, 10.0, 12.48),  # the client has it (seq <= 41)
        final(45, 12.48, 14.0),  # finalised after its connection broke
        final(47, 14.0, 15.5),
        final(50, 0.0, 1.0, stream="bob"),
    ):
        history.record(event)
    plan = plan_resume(Resume(41, 12.48), history, "alice", 16000)
    assert [e.seq for e in plan.replay] == [45, 47]
    assert all(e.extra == {"replay": True} for e in plan.replay)
    assert (plan.start, plan.skip) == (248000, 248000 - 199680)
    assert plan.seq_floor == 41 + SEQ_GAP  # the factory also numbers above 47
