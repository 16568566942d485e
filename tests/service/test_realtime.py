"""``/v1/realtime``: the official ``openai`` package's realtime client against the daemon.

The daemon runs in-process on a free port with the tiny random Whisper (its
text is noise), so the tests check the protocol: event order, append-only
deltas, that each ``completed`` transcript is the final text the other sinks
got for the same audio, the error shape, auth and shared limits. The item
mapping itself is pinned down on :class:`ItemTracker` with made-up events.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import soxr
from openai import AsyncOpenAI
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from streamer.config import (
    Config,
)
from streamer.service.app import App
from streamer.service.client_io import Transcript, decode_g711
from streamer.service.realtime_protocol import (
    ItemTracker,
    RealtimeError,
    SessionConfig,
    TurnDetection,
    parse_session_update,
)
from streamer.service.streams import StreamRunner
from streamer.sinks.fanout import Subscription
from streamer.testing.daemon import client_config, running_app
from streamer.types import Hypothesis

CLIP = Path(__file__).resolve().parents[1] / "data" / "audio" / "fleurs-en-004.ogg"
TIMEOUT = 30.0
TURN = TurnDetection(threshold=0.5, prefix_padding_ms=300, silence_duration_ms=600)


def make_config(model: Path, **ws: Any) -> Config:
    # agreement_n=1 commits every partial's words: deltas on the random model too
    return client_config(model, streaming={"agreement_n": 1}, **ws)


@pytest.fixture
async def app(tiny_whisper: Path) -> AsyncIterator[App]:
    async with running_app(make_config(tiny_whisper), TIMEOUT) as daemon:
        yield daemon


def client(app: App, key: str = "unused") -> AsyncOpenAI:
    assert app.server is not None
    return AsyncOpenAI(base_url=f"http://127.0.0.1:{app.server.port}/v1", api_key=key)


def clip_b64(rate: int = 24000, silence_s: float = 1.5, piece_s: float = 0.2) -> list[str]:
    """The clip, then ``silence_s`` of silence, as base64 PCM16 pieces."""
    audio, clip_rate = sf.read(CLIP, dtype="float32")
    audio = np.concatenate([soxr.resample(audio, clip_rate, rate), np.zeros(int(silence_s * rate))])
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    step = int(piece_s * rate) * 2
    return [base64.b64encode(pcm[i : i + step]).decode() for i in range(0, len(pcm), step)]


async def events_until(conn: Any, done: Callable[[Any], bool]) -> list[Any]:
    """The server's events up to and including the first one ``done`` accepts."""
    out: list[Any] = []
    async with asyncio.timeout(TIMEOUT):
        async for event in conn:
            out.append(event)
            if done(event):
                return out
    raise AssertionError(f"connection closed before the awaited event: {[e.type for e in out]}")


async def finals_of(app: App, sub: Subscription, stream: str) -> list[str]:
    """Texts of every final the fanout published for ``stream``, once it has ended."""
    assert app.factory is not None
    async with asyncio.timeout(TIMEOUT):
        while stream in app.factory.runners:
            await asyncio.sleep(0.02)
    texts = []
    while True:
        try:
            texts.append(sub.get_nowait().text)
        except asyncio.QueueEmpty:
            return texts


async def runner_of(app: App, stream: str) -> StreamRunner:
    """The stream's runner, once the server has started it (with the first audio)."""
    assert app.factory is not None
    async with asyncio.timeout(TIMEOUT):
        while stream not in app.factory.runners:
            await asyncio.sleep(0.02)
    return app.factory.runners[stream]


def check_items(events: list[Any]) -> dict[str, str]:
    """Per item: deltas before its completed and append-only; returns item → transcript."""
    deltas: dict[str, str] = {}
    completed: dict[str, str] = {}
    for event in events:
        assert event.event_id.startswith("event_")
        if event.type == "conversation.item.input_audio_transcription.delta":
            assert event.item_id not in completed, "a delta after its item completed"
            assert event.delta and event.content_index == 0
            deltas[event.item_id] = deltas.get(event.item_id, "") + event.delta
        elif event.type == "conversation.item.input_audio_transcription.completed":
            assert event.content_index == 0 and event.usage.type == "duration"
            assert event.transcript == deltas.get(event.item_id, ""), "deltas != transcript"
            completed[event.item_id] = event.transcript
    assert len({e.event_id for e in events}) == len(events)
    return completed


# -- the openai client against the daemon --------------------------------------------------


async def test_manual_commit_gives_deltas_then_completed(app: App) -> None:
    """turn_detection null: the client's commit ends the item, whatever its segments."""
    sub = app.fanout.subscribe({"rt-manual"}, kinds={"final"})
    query = {"intent": "transcription", "stream": "rt-manual"}
    async with client(app).realtime.connect(extra_query=query) as conn:
        created = await conn.recv()
        assert created.type == "session.created" and created.session.type == "transcription"
        await conn.session.update(
            session={
                "type": "transcription",
                "audio": {
                    "input": {
                        "format": {"type": "audio/pcm", "rate": 24000},
                        "transcription": {"model": "gpt-4o-transcribe", "language": "en"},
                        "turn_detection": None,
                    }
                },
            }
        )
        updated = await conn.recv()
        assert updated.type == "session.updated"
        assert updated.session.audio.input.turn_detection is None
        assert updated.session.audio.input.transcription.language == "en"
        for piece in clip_b64():
            await conn.input_audio_buffer.append(audio=piece)
        # the text streams before the client ends the item
        events = await events_until(conn, lambda e: e.type.endswith("transcription.delta"))
        await conn.input_audio_buffer.commit()
        events += await events_until(
            conn, lambda e: e.type == "conversation.item.input_audio_transcription.completed"
        )
    kinds = [e.type for e in events]
    assert "input_audio_buffer.speech_started" not in kinds  # the client ends turns here
    (committed,) = [e for e in events if e.type == "input_audio_buffer.committed"]
    assert committed.item_id.startswith("item_") and committed.previous_item_id is None
    (transcript,) = check_items(events).values()
    assert {e.item_id for e in events if hasattr(e, "item_id")} == {committed.item_id}
    assert events[-1].usage.seconds > 4.0  # the clip and its silence
    # the other sinks got the same text, under the stream id the client chose
    assert transcript == " ".join(t for t in await finals_of(app, sub, "rt-manual") if t)
    assert transcript  # (the random model writes something for 4 s of speech)


async def test_server_vad_items_follow_the_segments(app: App) -> None:
    """The default server_vad: every segment is an item, started, stopped, committed."""
    sub = app.fanout.subscribe({"rt-vad"}, kinds={"final"})
    query = {"intent": "transcription", "stream": "rt-vad"}
    async with client(app).realtime.connect(extra_query=query) as conn:
        created = await conn.recv()
        assert created.session.audio.input.turn_detection.silence_duration_ms == 600  # [streaming]
        vad = {"type": "server_vad", "threshold": 0.4, "silence_duration_ms": 500}
        await conn.session.update(
            session={"type": "transcription", "audio": {"input": {"turn_detection": vad}}}
        )
        updated = await conn.recv()
        assert updated.session.audio.input.turn_detection.prefix_padding_ms == 300
        for piece in clip_b64(rate=24000, silence_s=1.5):
            await conn.input_audio_buffer.append(audio=piece)
        segmenter = (await runner_of(app, "rt-vad")).session.segmenter.s  # the session's VAD
        assert (segmenter.threshold, segmenter.endpoint_silence) == (0.4, 8000)
        events = await events_until(
            conn, lambda e: e.type == "conversation.item.input_audio_transcription.completed"
        )
    completed = check_items(events)
    order: dict[str, list[str]] = {}
    for event in events:
        if hasattr(event, "item_id"):
            order.setdefault(event.item_id, []).append(event.type.rsplit(".", 1)[-1])
    for item, steps in order.items():
        assert steps[0] == "speech_started" and steps[-1] == "completed", (item, steps)
        assert steps.index("speech_stopped") < steps.index("committed"), steps
        assert all(s == "delta" for s in steps[1 : steps.index("speech_stopped")]), steps
    started = next(e for e in events if e.type == "input_audio_buffer.speech_started")
    stopped = next(e for e in events if e.type == "input_audio_buffer.speech_stopped")
    assert 0 <= started.audio_start_ms < stopped.audio_end_ms <= 4400
    finals = await finals_of(app, sub, "rt-vad")
    assert list(completed.values()) == finals[: len(completed)]


async def test_bad_events_get_errors_and_the_session_goes_on(app: App) -> None:
    async with client(app).realtime.connect(extra_query={"intent": "transcription"}) as conn:
        assert (await conn.recv()).type == "session.created"
        cases: list[tuple[str, str, str | None]] = [
            ('{"type": "response.create", "event_id": "e1"}', "unsupported_value", "type"),
            ('{"type": "nope", "event_id": "e2"}', "invalid_value", "type"),
            ("{not json", "invalid_json", None),
            ('{"type": "input_audio_buffer.commit", "event_id": "e4"}',
             "input_audio_buffer_commit_empty", None),
            ('{"type": "session.update", "event_id": "e5", "session": {"type": "realtime"}}',
             "unsupported_value", "session.type"),
            (json.dumps({"type": "session.update", "event_id": "e6", "session": {
                "type": "transcription",
                "audio": {"input": {"turn_detection": {"type": "semantic_vad"}}}}}),
             "unsupported_value", "session.audio.input.turn_detection.type"),
            (json.dumps({"type": "session.update", "event_id": "e7", "session": {
                "type": "transcription",
                "audio": {"input": {"transcription": {"prompt": "expect words"}}}}}),
             "unsupported_parameter", "session.audio.input.transcription.prompt"),
            (json.dumps({"type": "session.update", "event_id": "e8", "session": {
                "type": "transcription", "audio": {"input": {"format": {"type": "audio/mp3"}}}}}),
             "invalid_value", "session.audio.input.format.type"),
            (json.dumps({"type": "session.update", "event_id": "e9", "session": {
                "type": "transcription",
                "audio": {"input": {"transcription": {"language": "de"}}}}}),
             "unsupported_value", "session.audio.input.transcription.language"),
            ('{"type": "input_audio_buffer.append", "event_id": "e10", "audio": "***"}',
             "invalid_value", "audio"),
            ('{"type": "input_audio_buffer.clear", "event_id": "e11", "colour": 1}',
             "unknown_parameter", "colour"),
        ]  # fmt: skip
        for raw, code, param in cases:
            await conn.send_raw(raw)
            raw_error = json.loads(await conn.recv_bytes())
            assert raw_error["type"] == "error" and raw_error["event_id"].startswith("event_")
            error = raw_error["error"]
            assert set(error) == {"type", "code", "message", "param", "event_id"}, error
            assert error["type"] == "invalid_request_error" and error["message"], error
            assert (error["code"], error["param"]) == (code, param), (raw, error)
            sent = json.loads(raw).get("event_id") if raw.startswith('{"') else None
            assert error["event_id"] == sent
        # still serving: an update that is fine, and pcmu audio after it
        await conn.session.update(
            session={
                "type": "transcription",
                "audio": {"input": {"format": {"type": "audio/pcmu"}}},
            }
        )
        updated = await conn.recv()
        assert updated.type == "session.updated"
        assert updated.session.audio.input.format.type == "audio/pcmu"
        await conn.input_audio_buffer.append(audio=base64.b64encode(b"\xff" * 8000).decode())
        await conn.input_audio_buffer.clear()
        assert (await conn.recv()).type == "input_audio_buffer.cleared"


async def test_token_is_required_as_bearer(tiny_whisper: Path, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    cfg = make_config(tiny_whisper, auth_token_file=str(token))
    async with running_app(cfg, TIMEOUT) as app:
        for key in ("wrong",):
            with pytest.raises(InvalidStatus) as refused:
                async with client(app, key).realtime.connect(
                    extra_query={"intent": "transcription"}
                ):
                    pass
            assert refused.value.response.status_code == 401
        assert app.server is not None
        with pytest.raises(InvalidStatus) as bare:  # no header at all: no in-band token either
            async with connect(f"ws://127.0.0.1:{app.server.port}/v1/realtime"):
                pass
        assert bare.value.response.status_code == 401
        body = app.metrics.render()[0].decode()
        assert 'streamer_rejected_connections_total{endpoint="realtime",reason="auth"} 2.0' in body
        async with client(app, "s3cret").realtime.connect(
            extra_query={"intent": "transcription"}
        ) as conn:
            assert (await conn.recv()).type == "session.created"


async def test_max_streams_is_shared_with_v1_stream(tiny_whisper: Path) -> None:
    async with running_app(make_config(tiny_whisper, max_streams=1), TIMEOUT) as app:
        assert app.server is not None
        async with connect(f"ws://127.0.0.1:{app.server.port}/v1/stream"):
            with pytest.raises(InvalidStatus) as full:
                async with client(app).realtime.connect(extra_query={"intent": "transcription"}):
                    pass
            assert full.value.response.status_code == 503
        with pytest.raises(InvalidStatus) as bad:
            async with client(app).realtime.connect(extra_query={"intent": "conversation"}):
                pass
        assert bad.value.response.status_code == 400


async def test_shutdown_completes_the_open_item_then_closes_1001(app: App) -> None:
    query = {"intent": "transcription", "stream": "rt-shutdown"}
    async with client(app).realtime.connect(extra_query=query) as conn:
        assert (await conn.recv()).type == "session.created"
        await conn.session.update(
            session={"type": "transcription", "audio": {"input": {"turn_detection": None}}}
        )
        assert (await conn.recv()).type == "session.updated"
        for piece in clip_b64(silence_s=0.0):
            await conn.input_audio_buffer.append(audio=piece)
        runner = await runner_of(app, "rt-shutdown")
        async with asyncio.timeout(TIMEOUT):  # every piece was taken
            while runner.session.buffer.end < 60000:
                await asyncio.sleep(0.02)
        app.request_stop()
        events = []
        async with asyncio.timeout(TIMEOUT):
            async for event in conn:  # ends at the server's close
                events.append(event)
        steps = [e.type.rsplit(".", 1)[-1] for e in events]
        assert steps[-1] == "completed" and "committed" in steps[-3:], steps
        check_items(events)
    assert conn._connection.close_code == 1001


# -- the mapping, with made-up events ---------------------------------------------------------


def ev(
    kind: Any, segment: int, start: float, end: float, text: str = "", committed: str = ""
) -> Hypothesis:
    return Hypothesis(kind, "s", segment, 0, text, start, end, committed=committed)


def kinds(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"].rsplit(".", 1)[-1] for e in events]


def test_server_vad_turn_is_one_segment() -> None:
    t = ItemTracker(16000)
    out = t.on_event(ev("partial", 0, 1.0, 2.0, "hello wor", committed="hello "))
    assert kinds(out) == ["speech_started", "delta"] and out[1]["delta"] == "hello"
    item = out[0]["item_id"]
    assert out[0]["audio_start_ms"] == 1000
    out = t.on_event(ev("final", 0, 1.0, 2.5, "hello world."))
    assert kinds(out) == ["speech_stopped", "committed", "delta", "completed"]
    assert {e["item_id"] for e in out} == {item} and out[2]["delta"] == " world."
    assert out[1]["previous_item_id"] is None and out[3]["transcript"] == "hello world."
    assert out[3]["usage"] == {"type": "duration", "seconds": 1.5}
    out = t.on_event(ev("final", 1, 3.0, 4.0, "again"))  # never shown as a partial
    assert kinds(out) == ["speech_started", "speech_stopped", "committed", "delta", "completed"]
    assert out[2]["previous_item_id"] == item


def test_manual_item_holds_every_segment_before_the_commit() -> None:
    t = ItemTracker(16000, vad=False)
    assert kinds(t.on_event(ev("partial", 0, 0.0, 1.0, "a b", committed="a"))) == ["delta"]
    assert [e["delta"] for e in t.on_event(ev("final", 0, 0.0, 1.2, "a b"))] == [" b"]
    assert kinds(t.on_event(ev("partial", 1, 2.0, 3.0, "c", committed=""))) == []
    committed = t.commit(3 * 16000)
    assert kinds(committed) == ["committed"] and t.waiting
    assert t.settle(lambda at: True) == []  # segment 1 still waits for its final
    out = t.on_event(ev("final", 1, 2.0, 3.0, "c d"))
    assert [e["delta"] for e in out] == [" c d"]
    (done,) = t.settle(lambda at: False)
    assert done["transcript"] == "a b c d" and done["item_id"] == committed[0]["item_id"]
    assert done["usage"]["seconds"] == 3.0 and not t.waiting
    # later audio starts the next item; a clear drops it without a word
    t.on_event(ev("partial", 2, 3.5, 4.0, "x", committed="x"))
    assert kinds(t.clear(4 * 16000)) == ["cleared"]
    assert t.on_event(ev("final", 2, 3.5, 4.0, "x y")) == []
    assert t.settle(lambda at: False) == [] and t.uncommitted_ms(4 * 16000 + 1600) == 100


def test_an_event_after_the_commit_point_completes_the_item() -> None:
    t = ItemTracker(16000, vad=False)
    t.on_event(ev("final", 0, 0.0, 1.0, "one"))
    t.commit(16000)
    out = t.on_event(ev("partial", 1, 1.5, 2.0, "two", committed="two"))
    assert kinds(out) == ["completed", "delta"] and out[0]["transcript"] == "one"
    assert out[1]["item_id"] != out[0]["item_id"]
    finished = t.finish()  # end of stream: the open item is committed for the client
    assert kinds(finished) == ["committed", "completed"] and finished[1]["transcript"] == ""


def test_session_update_rules() -> None:
    cfg = SessionConfig(turn_detection=TURN)

    def update(inp: dict[str, Any], stream_turn: TurnDetection | None = None) -> SessionConfig:
        event = {"session": {"type": "transcription", "audio": {"input": inp}}}
        return parse_session_update(event, cfg, TURN, stream_turn=stream_turn)

    assert update({"format": {"type": "audio/pcm", "rate": 16000}}).rate == 16000
    assert update({"format": "g711_ulaw"}).format == "audio/pcmu"
    assert update({"turn_detection": {"type": "server_vad", "silence_duration_ms": 800}}) \
        .turn_detection == dataclasses.replace(TURN, silence_duration_ms=800)  # fmt: skip
    assert update({"turn_detection": None}, stream_turn=TURN).turn_detection is None
    refused = [
        ({"format": {"type": "audio/pcm", "rate": 16000}}, TURN, "invalid_value"),  # started
        ({"turn_detection": {"silence_duration_ms": 900}}, TURN, "invalid_value"),
        ({"noise_reduction": {"type": "near_field"}}, None, "unsupported_parameter"),
        ({"format": {"type": "audio/pcmu", "rate": 16000}}, None, "invalid_value"),
        ({"colour": "red"}, None, "unknown_parameter"),
        ({"turn_detection": {"threshold": "high"}}, None, "invalid_type"),
    ]
    for inp, stream_turn, code in refused:
        with pytest.raises(RealtimeError) as err:
            update(inp, stream_turn)
        assert err.value.code == code, (inp, err.value.message)


def test_transcript_is_append_only_and_g711_decodes() -> None:
    text = Transcript()
    assert text.add(ev("partial", 0, 0, 1, "ab ", committed="ab ")) == "ab"
    assert text.add(ev("final", 0, 0, 1, "ab cd")) == " cd"
    assert text.add(ev("final", 1, 2, 3, "")) == ""
    assert text.add(ev("final", 2, 4, 5, "ef")) == " ef" and text.final_text == "ab cd ef"
    # G.711: silence codes and the loudest codes, by the ITU tables
    assert decode_g711(b"\xff\x7f", "pcmu").tolist() == [0.0, 0.0]
    assert decode_g711(b"\x80\x00", "pcmu").tolist() == [32124 / 32768, -32124 / 32768]
    assert decode_g711(b"\xaa\x2a", "pcma").tolist() == [32256 / 32768, -32256 / 32768]
