"""JSONL sink and SRT writer: real files, wire schema, SubRip times."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import pytest

from streamer.sinks.fanout import Fanout
from streamer.sinks.jsonl import JsonlSink, format_event
from streamer.types import Hypothesis

FINAL_KEYS = {"v", "type", "stream", "segment", "seq", "text", "start", "end", "lang", "latency_ms"}
PARTIAL_KEYS = FINAL_KEYS | {"committed", "tentative"}


def partial(seq: int, stream: str = "mic0") -> Hypothesis:
    return Hypothesis(
        kind="partial",
        stream=stream,
        segment=3,
        seq=seq,
        text="Guten Morgen, wie",
        committed="Guten Morgen,",
        tentative=" wie",
        start=12.48,
        end=14.02,
        lang="de",
        latency_ms=180.04,
    )


def final(seq: int, text: str = "Guten Morgen, wie geht es Ihnen? Grüße", **kw: Any) -> Hypothesis:
    args: dict[str, Any] = dict(
        kind="final",
        stream="mic0",
        segment=seq,
        seq=seq,
        text=text,
        start=12.48,
        end=15.3,
        lang="de",
        latency_ms=420.0,
    )
    args.update(kw)
    return Hypothesis(**args)


def check_schema(obj: dict[str, Any]) -> None:
    keys = PARTIAL_KEYS if obj["type"] == "partial" else FINAL_KEYS
    assert set(obj) == keys
    assert obj["v"] == 1
    assert isinstance(obj["segment"], int) and isinstance(obj["seq"], int)
    assert isinstance(obj["start"], float) and isinstance(obj["end"], float)


def test_format_event_is_one_line_of_wire_json() -> None:
    line = format_event(partial(41))
    assert "\n" not in line
    obj = json.loads(line)
    check_schema(obj)
    assert obj == {
        "v": 1,
        "type": "partial",
        "stream": "mic0",
        "segment": 3,
        "seq": 41,
        "text": "Guten Morgen, wie",
        "committed": "Guten Morgen,",
        "tentative": " wie",
        "start": 12.48,
        "end": 14.02,
        "lang": "de",
        "latency_ms": 180.0,
    }
    assert "Grüße" in format_event(final(1))  # not \u-escaped


async def run_sink(sink: JsonlSink, events: list[Hypothesis]) -> None:
    fan = Fanout()
    sub = fan.subscribe(kinds=sink.kinds, max_finals=1000)
    task = asyncio.create_task(sink.run(sub))
    for e in events:
        fan.publish(e)
    fan.close_all("done")
    await asyncio.wait_for(task, 5.0)
    assert sub.drained.is_set()


async def test_file_sink_appends_parseable_lines(tmp_path: Path) -> None:
    path = tmp_path / "captions.jsonl"
    path.write_text('{"existing": true}\n', encoding="utf-8")
    events = [partial(0), final(1), partial(2, stream="other"), final(3)]
    sink = JsonlSink(str(path))
    await run_sink(sink, events)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == '{"existing": true}'  # appended, not truncated
    objs = [json.loads(line) for line in lines[1:]]
    for obj in objs:
        check_schema(obj)
    assert [(o["type"], o["seq"]) for o in objs] == [
        ("partial", 0),
        ("final", 1),
        ("partial", 2),
        ("final", 3),
    ]
    assert sink.lines == 4


async def test_file_sink_finals_only(tmp_path: Path) -> None:
    path = tmp_path / "finals.jsonl"
    sink = JsonlSink(str(path), partials=False)
    await run_sink(sink, [partial(0), final(1), partial(2), final(3)])
    objs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [o["seq"] for o in objs] == [1, 3]
    assert all(o["type"] == "final" for o in objs)


async def test_dash_writes_to_stdout() -> None:
    out = io.StringIO()
    sink = JsonlSink("-", stdout=out)
    await run_sink(sink, [final(i) for i in range(300)])  # more than one batch
    objs = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [o["seq"] for o in objs] == list(range(300))
    assert not out.closed  # stdout is not ours to close


async def test_unwritable_path_raises(tmp_path: Path) -> None:
    sink = JsonlSink(str(tmp_path / "missing-dir" / "x.jsonl"))
    fan = Fanout()
    sub = fan.subscribe()
    with pytest.raises(FileNotFoundError):
        await sink.run(sub)
    assert sub.closed and fan.subscribers == 0  # no queue left behind for a dead sink
