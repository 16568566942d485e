"""``/v1/stream``: real daemon (App) on a free port, real WebSocket clients, real audio.

The tiny random Whisper makes these fast; the round trip on the real Whisper
base is in ``test_ingest_whisper_base``. Each malformed-input case checks the
JSON error, the close code, and that the daemon keeps serving everybody else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import trustme
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from streamer.config import (
    Config,
    WebSocketConfig,
)
from streamer.errors import ConfigError
from streamer.service.app import App
from streamer.testing.daemon import client_config, running_app
from streamer.types import Hypothesis

from ..conftest import check_wire_event

CLIP = Path(__file__).resolve().parents[1] / "data" / "audio" / "fleurs-en-004.ogg"
TIMEOUT = 30.0


def make_config(model: Path, vad: bool = True, **ws: Any) -> Config:
    return client_config(model, vad=vad, **ws)


def running(cfg: Config) -> contextlib.AbstractAsyncContextManager[App]:
    return running_app(cfg, TIMEOUT)


@pytest.fixture
async def app(tiny_whisper: Path) -> AsyncIterator[App]:
    async with running(make_config(tiny_whisper)) as running_app:
        yield running_app


def ws_url(app: App, path: str, scheme: str = "ws") -> str:
    assert app.server is not None
    return f"{scheme}://127.0.0.1:{app.server.port}{path}"


def clip_pcm(encoding: str = "pcm_s16le", channels: int = 1) -> tuple[bytes, int, float]:
    audio, rate = sf.read(CLIP, dtype="float32")
    audio = np.repeat(audio[:, None], channels, axis=1) if channels > 1 else audio
    if encoding == "pcm_s16le":
        data = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    else:
        data = audio.astype("<f4").tobytes()
    return data, rate, len(audio) / rate


def start_msg(rate: int = 16000, **fields: Any) -> str:
    return json.dumps({"type": "start", "sample_rate": rate, "encoding": "pcm_s16le", **fields})


async def send_pcm(ws: ClientConnection, data: bytes, frame: int = 6400) -> None:
    for i in range(0, len(data), frame):
        await ws.send(data[i : i + frame])


async def read_all(ws: ClientConnection) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    async with asyncio.timeout(TIMEOUT):
        with contextlib.suppress(ConnectionClosed):
            async for message in ws:
                assert isinstance(message, str)
                out.append(json.loads(message))
    return out


async def stream_clip(app: App, stream: str, **start: Any) -> list[dict[str, Any]]:
    data, rate, _ = clip_pcm()
    async with connect(ws_url(app, "/v1/stream")) as ws:
        await ws.send(start_msg(rate, stream=stream, **start))
        assert json.loads(await ws.recv())["type"] == "ready"
        await send_pcm(ws, data)
        await ws.send('{"type": "stop"}')
        events = await read_all(ws)
    assert ws.close_code == 1000, (ws.close_code, ws.close_reason)
    return events


async def subscribed(app: App, count: int) -> None:
    """Wait until ``count`` subscriptions exist (the server subscribes after the upgrade)."""
    async with asyncio.timeout(TIMEOUT):
        while app.fanout.subscribers < count:
            await asyncio.sleep(0.01)


def marker(seq: int) -> Hypothesis:
    return Hypothesis("final", "marker", 0, seq, f"marker {seq}", 0.0, 1.0)


async def still_serving(app: App, sub: ClientConnection, seq: int) -> None:
    """The daemon answers probes and a caption subscriber still receives events."""
    await subscribed(app, 1)
    app.fanout.publish(marker(seq))
    event = json.loads(await asyncio.wait_for(sub.recv(), TIMEOUT))
    assert (event["stream"], event["seq"]) == ("marker", seq)
    assert await asyncio.to_thread(http_status, app, "/healthz") == 200


def http_status(app: App, path: str, headers: dict[str, str] | None = None) -> int:
    assert app.server is not None
    req = urllib.request.Request(f"http://127.0.0.1:{app.server.port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


# -- round trips ---------------------------------------------------------------------


async def test_round_trip_events_on_the_socket_and_for_subscribers(app: App) -> None:
    async with connect(ws_url(app, "/v1/captions?streams=alice")) as sub:
        await subscribed(app, 1)
        data, rate, duration = clip_pcm("pcm_f32le", channels=2)
        async with connect(ws_url(app, "/v1/stream")) as ws:
            await ws.send(
                json.dumps(
                    {
                        "type": "start",
                        "stream": "alice",
                        "sample_rate": rate,
                        "encoding": "pcm_f32le",
                        "channels": 2,
                    }
                )
            )
            ready = json.loads(await ws.recv())
            assert ready == {
                "type": "ready", "v": 1, "stream": "alice", "sample_rate": rate,
                "encoding": "pcm_f32le", "channels": 2, "model_sample_rate": 16000,
            }  # fmt: skip
            await send_pcm(ws, data, frame=8 * 1600)
            await ws.send('{"type":"stop"}')
            own = await read_all(ws)
        assert (ws.close_code, ws.close_reason) == (1000, "end of stream")
        for event in own:
            check_wire_event(event)
        assert own[-1]["type"] == "final"
        assert own[-1]["end"] == pytest.approx(duration, abs=0.05)
        assert [e["seq"] for e in own] == sorted({e["seq"] for e in own})
        finals = [e for e in own if e["type"] == "final"]
        seen: list[dict[str, Any]] = []
        async with asyncio.timeout(TIMEOUT):
            while len([e for e in seen if e["type"] == "final"]) < len(finals):
                seen.append(json.loads(await sub.recv()))
        assert [e for e in seen if e["type"] == "final"] == finals


async def test_reconnecting_stream_id_continues_numbering(app: App) -> None:
    first = await stream_clip(app, "bob")
    second = await stream_clip(app, "bob")
    assert min(e["seq"] for e in second) > max(e["seq"] for e in first)
    assert min(e["segment"] for e in second) > max(e["segment"] for e in first)


async def test_finals_only_when_partials_false(app: App) -> None:
    events = await stream_clip(app, "quiet", partials=False)
    assert events and {e["type"] for e in events} == {"final"}


async def test_server_assigns_stream_ids(app: App) -> None:
    ids = []
    for _ in range(2):
        async with connect(ws_url(app, "/v1/stream")) as ws:
            await ws.send(start_msg())
            ids.append(json.loads(await ws.recv())["stream"])
    assert len(set(ids)) == 2 and all(i.startswith("client-") for i in ids)


async def test_disconnect_without_stop_still_finalises_for_other_sinks(app: App) -> None:
    async with connect(ws_url(app, "/v1/captions?streams=gone&kinds=final")) as sub:
        await subscribed(app, 1)
        data, rate, duration = clip_pcm()
        async with connect(ws_url(app, "/v1/stream")) as ws:
            await ws.send(start_msg(rate, stream="gone"))
            await ws.recv()
            await send_pcm(ws, data)
        final = json.loads(await asyncio.wait_for(sub.recv(), TIMEOUT))
        while final["end"] < duration - 0.05:
            final = json.loads(await asyncio.wait_for(sub.recv(), TIMEOUT))
        assert final["type"] == "final"


async def test_client_chooses_language_and_task_when_allowed(tiny_whisper: Path) -> None:
    cfg = make_config(tiny_whisper, client_languages="auto,fr", client_tasks="translate")
    async with running(cfg) as app:
        assert app.engine is not None
        submitted = []
        real_submit = app.engine.submit

        def spy(req: Any, callback: Any) -> None:
            submitted.append(req)
            real_submit(req, callback)

        app.engine.submit = spy  # type: ignore[method-assign]
        events = await stream_clip(app, "fr-client", language="fr", task="translate")
        assert {e["lang"] for e in events} == {"fr"}
        assert {(r.lang, r.task) for r in submitted} == {("fr", "translate")}
        submitted.clear()
        await stream_clip(app, "plain")  # options are per stream
        assert {(r.lang, r.task) for r in submitted} == {("en", None)}


async def test_client_options_the_model_lacks_are_a_config_error(tiny_whisper: Path) -> None:
    app = App(make_config(tiny_whisper, client_languages="xx"), keep_serving=True)
    with pytest.raises(ConfigError, match="'xx' is not a language of this model") as err:
        await asyncio.wait_for(app.run(), TIMEOUT)
    assert err.value.key == "websocket.client_languages"


async def test_whisper_base_round_trip(whisper_base_dir: Path, audio_dir: Path) -> None:
    """The real model through /v1/stream: 48 kHz s16 in, the clip's words out."""
    import soxr

    from tools.metrics import word_error_rate

    reference = {
        json.loads(line)["path"]: json.loads(line)["text"]
        for line in (audio_dir / "manifest.jsonl").read_text().splitlines()
    }["fleurs-en-004.ogg"]
    # The server's throttle paces the client at 2x real time: partials have time to show.
    cfg = make_config(whisper_base_dir, max_audio_rate=2.0, audio_burst_s=0.5)
    async with running(cfg) as app:
        audio, rate = sf.read(CLIP, dtype="float32")
        pcm = (soxr.resample(audio, rate, 48000) * 32767).astype("<i2").tobytes()
        async with connect(ws_url(app, "/v1/stream")) as ws:
            await ws.send(start_msg(48000, stream="base"))
            assert json.loads(await ws.recv())["model_sample_rate"] == 16000
            await send_pcm(ws, pcm, frame=9600)  # 100 ms frames
            await ws.send('{"type":"stop"}')
            events = await read_all(ws)
        assert ws.close_code == 1000
    finals = [e["text"] for e in events if e["type"] == "final"]
    assert any(e["type"] == "partial" for e in events)
    scores = word_error_rate([reference], [" ".join(finals)], "en")
    assert scores is not None and scores["wer"] < 0.2, (scores, finals)


# -- malformed input -------------------------------------------------------------------

BAD_FIRST: list[tuple[str, str | bytes, int, str]] = [
    ("audio before start", b"\x00\x01" * 100, 1003, "before audio"),
    ("bad json", "{not json", 1007, "not valid JSON"),
    ("not an object", "[1, 2]", 1008, "JSON object"),
    ("wrong type", '{"type": "stop"}', 1008, "'start' message first"),
    ("unknown field", start_msg(model="/etc/passwd"), 1008, "unknown field 'model'"),
    ("rate too low", start_msg(rate=100), 1008, "sample_rate 100"),
    ("rate not int", start_msg(rate="16k"), 1008, "must be an integer"),
    ("encoding", start_msg(encoding="mp3"), 1008, "encoding 'mp3'"),
    ("channels", start_msg(channels=0), 1008, "channels 0"),
    ("bad stream id", start_msg(stream="../x"), 1008, "'stream' must match"),
    ("language not allowed", start_msg(language="de"), 1008, "choose 'language'"),
]


@pytest.mark.parametrize(
    ("message", "code", "reason"),
    [pytest.param(m, c, r, id=name) for name, m, c, r in BAD_FIRST],
)
async def test_bad_start_closes_only_that_client(
    app: App, message: str | bytes, code: int, reason: str
) -> None:
    async with connect(ws_url(app, "/v1/captions")) as sub:
        async with connect(ws_url(app, "/v1/stream")) as ws:
            await ws.send(message)
            events = await read_all(ws)
        assert ws.close_code == code
        assert len(events) == 1 and events[0]["type"] == "error"
        assert events[0]["code"] == code and reason in events[0]["message"]
        await still_serving(app, sub, 1)


BAD_AFTER_START: list[tuple[str, str | bytes, int, str]] = [
    ("odd length pcm", b"\x00\x01\x02", 1007, "not a whole number"),
    ("text where audio expected", "hello", 1003, "expected binary audio"),
    ("unknown control", '{"type": "pause"}', 1008, "unknown control message"),
    ("control with junk", '{"type": "stop", "x": 1}', 1008, "unknown field 'x'"),
    ("bad json control", '{"type": ', 1007, "not valid JSON"),
]


@pytest.mark.parametrize(
    ("message", "code", "reason"),
    [pytest.param(m, c, r, id=name) for name, m, c, r in BAD_AFTER_START],
)
async def test_bad_frame_after_start_closes_only_that_client(
    app: App, message: str | bytes, code: int, reason: str
) -> None:
    async with connect(ws_url(app, "/v1/captions?streams=marker")) as sub:
        async with connect(ws_url(app, "/v1/stream")) as ws:
            await ws.send(start_msg(stream="bad"))
            assert json.loads(await ws.recv())["type"] == "ready"
            await ws.send(b"\x00\x00" * 1600)
            await ws.send(message)
            events = [e for e in await read_all(ws) if e["type"] == "error"]
        assert ws.close_code == code
        assert events[0]["code"] == code and reason in events[0]["message"]
        await still_serving(app, sub, 2)
    # the id is free again once its audio was finalised
    async with asyncio.timeout(TIMEOUT):
        while "bad" in app.ingest.factory.runners:  # type: ignore[union-attr]
            await asyncio.sleep(0.02)


async def test_nan_f32_is_1007(app: App) -> None:
    async with connect(ws_url(app, "/v1/stream")) as ws:
        await ws.send(start_msg(encoding="pcm_f32le"))
        await ws.recv()
        await ws.send(np.array([0.0, np.nan], dtype="<f4").tobytes())
        events = await read_all(ws)
    assert ws.close_code == 1007 and "NaN" in events[-1]["message"]


async def test_stream_id_in_use_is_refused(app: App) -> None:
    async with connect(ws_url(app, "/v1/stream")) as first:
        await first.send(start_msg(stream="dup"))
        await first.recv()
        async with connect(ws_url(app, "/v1/stream")) as second:
            await second.send(start_msg(stream="dup"))
            events = await read_all(second)
        assert second.close_code == 1008 and "in use" in events[0]["message"]
        await first.send(b"\x00\x00" * 1600)  # the first client is unaffected
        await first.send('{"type":"stop"}')
        await read_all(first)
        assert first.close_code == 1000


async def test_frame_over_the_limit_is_1009(tiny_whisper: Path) -> None:
    async with (
        running(make_config(tiny_whisper, max_frame_bytes=4096)) as app,
        connect(ws_url(app, "/v1/captions?streams=marker")) as sub,
    ):
        async with connect(ws_url(app, "/v1/stream"), max_size=None) as ws:
            await ws.send(start_msg())
            await ws.recv()
            await ws.send(b"\x00" * 8192)
            events = await read_all(ws)
        assert ws.close_code == 1009
        assert events[-1]["code"] == 1009 and "8192 bytes" in events[-1]["message"]
        async with connect(ws_url(app, "/v1/stream"), max_size=None) as ws:
            await ws.send(start_msg())
            await ws.recv()
            await ws.send(b"\x00" * 8194)  # over twice the limit: the protocol layer's close
            events = await read_all(ws)
        assert ws.close_code == 1009 and not [e for e in events if e.get("type") == "error"]
        await still_serving(app, sub, 1)


async def test_idle_client_is_closed(tiny_whisper: Path) -> None:
    async with (
        running(make_config(tiny_whisper, idle_timeout_s=0.3)) as app,
        connect(ws_url(app, "/v1/captions?streams=marker")) as sub,
    ):
        async with connect(ws_url(app, "/v1/stream")) as ws:
            await ws.send(start_msg())
            await ws.recv()
            events = await read_all(ws)
        assert ws.close_code == 1008 and "idle timeout" in events[-1]["message"]
        await still_serving(app, sub, 1)


# -- limits --------------------------------------------------------------------------


async def test_max_streams_is_503_until_a_slot_frees(tiny_whisper: Path) -> None:
    async with running(make_config(tiny_whisper, max_streams=1)) as app:
        async with connect(ws_url(app, "/v1/stream")) as ws:
            await ws.send(start_msg())
            await ws.recv()
            with pytest.raises(InvalidStatus) as refused:
                await connect(ws_url(app, "/v1/stream"))
            assert refused.value.response.status_code == 503
            await ws.send(b"\x00\x00" * 1600)  # the admitted client is unaffected
            await ws.send('{"type":"stop"}')
            await read_all(ws)
            assert ws.close_code == 1000
        async with asyncio.timeout(TIMEOUT):
            while app.ingest is not None and app.ingest.active:
                await asyncio.sleep(0.02)
        async with connect(ws_url(app, "/v1/stream")) as again:
            await again.send(start_msg())
            assert json.loads(await again.recv())["type"] == "ready"


async def test_faster_than_allowed_client_is_throttled(tiny_whisper: Path) -> None:
    # 8 s of audio, 1 s burst, at most 4x real time: reading takes >= (8 - 1) / 4 s.
    cfg = make_config(tiny_whisper, vad=False, max_audio_rate=4.0, audio_burst_s=1.0)
    async with running(cfg) as app:
        silence = b"\x00\x00" * 16000 * 8
        async with connect(ws_url(app, "/v1/stream")) as ws:
            await ws.send(start_msg(stream="fast", partials=False))
            await ws.recv()
            t0 = time.monotonic()
            await send_pcm(ws, silence, frame=3200)
            await ws.send('{"type":"stop"}')
            await read_all(ws)
            elapsed = time.monotonic() - t0
        assert ws.close_code == 1000
        assert elapsed >= 7 / 4 * 0.95


# -- access ------------------------------------------------------------------------------


async def test_bearer_token_header_or_first_message(tiny_whisper: Path, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    async with running(make_config(tiny_whisper, auth_token_file=str(token))) as app:
        good = {"Authorization": "Bearer s3cret"}
        with pytest.raises(InvalidStatus) as bad_header:
            await connect(
                ws_url(app, "/v1/stream"), additional_headers={"Authorization": "Bearer x"}
            )
        assert bad_header.value.response.status_code == 401
        async with connect(ws_url(app, "/v1/stream"), additional_headers=good) as ws:
            await ws.send(start_msg())
            assert json.loads(await ws.recv())["type"] == "ready"
        async with connect(ws_url(app, "/v1/stream")) as ws:  # browsers: token in start
            await ws.send(start_msg(token="s3cret"))
            assert json.loads(await ws.recv())["type"] == "ready"
        async with connect(ws_url(app, "/v1/stream")) as ws:
            await ws.send(start_msg(token="wrong"))
            events = await read_all(ws)
        assert ws.close_code == 1008 and events[0]["message"] == "authentication failed"
        async with connect(ws_url(app, "/v1/captions")) as sub:
            await sub.send('{"type":"auth","token":"s3cret"}')
            await subscribed(app, 1)
            await still_serving(app, sub, 3)
        async with connect(ws_url(app, "/v1/captions")) as sub:
            await sub.send('{"type":"auth","token":"nope"}')
            await read_all(sub)
        assert sub.close_code == 1008


async def test_origin_allow_list(tiny_whisper: Path) -> None:
    cfg = make_config(tiny_whisper, allowed_origins="http://good.example")
    async with running(cfg) as app:
        with pytest.raises(InvalidStatus) as refused:
            await connect(ws_url(app, "/v1/captions"), origin="http://evil.example")  # type: ignore[arg-type]
        assert refused.value.response.status_code == 403
        async with connect(ws_url(app, "/v1/captions"), origin="http://good.example") as sub:  # type: ignore[arg-type]
            await still_serving(app, sub, 4)
        async with connect(ws_url(app, "/v1/captions")) as sub:  # no Origin: not a browser
            await still_serving(app, sub, 5)
        assert app.server is not None
        own = f"http://127.0.0.1:{app.server.port}"  # the daemon's own caption page
        async with connect(ws_url(app, "/v1/captions"), origin=own) as sub:  # type: ignore[arg-type]
            await still_serving(app, sub, 6)


async def test_tls(tiny_whisper: Path, tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(cert_path)
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(cert_path, append=True)
    cert.private_key_pem.write_to_path(key_path)
    cfg = make_config(tiny_whisper, tls_cert=str(cert_path), tls_key=str(key_path))
    async with running(cfg) as app:
        client_ctx = ssl.create_default_context()
        ca.configure_trust(client_ctx)
        async with connect(ws_url(app, "/v1/captions", "wss"), ssl=client_ctx) as sub:
            await still_serving_tls(app, sub)
        with pytest.raises(ssl.SSLCertVerificationError):
            await connect(ws_url(app, "/v1/captions", "wss"), ssl=ssl.create_default_context())


async def still_serving_tls(app: App, sub: ClientConnection) -> None:
    await subscribed(app, 1)
    app.fanout.publish(marker(6))
    assert json.loads(await asyncio.wait_for(sub.recv(), TIMEOUT))["seq"] == 6


async def test_unanswered_pings_close_the_connection(tiny_whisper: Path) -> None:
    cfg = make_config(tiny_whisper, ping_interval_s=0.2, ping_timeout_s=0.2)
    async with running(cfg) as app:
        assert app.server is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", app.server.port)
        writer.write(
            b"GET /v1/captions HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        await writer.drain()
        assert b"101" in await asyncio.wait_for(reader.readline(), TIMEOUT)
        async with asyncio.timeout(TIMEOUT):  # never answer the pings: the server hangs up
            while await reader.read(4096):
                pass
        writer.close()
        async with asyncio.timeout(TIMEOUT):
            while app.server.subscribers:
                await asyncio.sleep(0.02)


def test_free_port_helper_is_not_needed() -> None:
    # Servers bind port 0; this guards against a regression to fixed ports.
    assert WebSocketConfig(port=0).port == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))


def scrape(app: App, headers: dict[str, str] | None = None) -> dict[str, float]:
    """``/metrics`` parsed into {'name{label="v",…}': value}."""
    from prometheus_client.parser import text_string_to_metric_families

    assert app.server is not None
    req = urllib.request.Request(
        f"http://127.0.0.1:{app.server.port}/metrics", headers=headers or {}
    )
    with urllib.request.urlopen(req, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}"] = sample.value
    return out


async def test_metrics_count_streams_events_and_refusals(app: App) -> None:
    async with connect(ws_url(app, "/v1/stream")) as ws:
        await ws.send(start_msg(stream="live"))
        await ws.recv()
        values = await asyncio.to_thread(scrape, app)
        assert values['streamer_streams{origin="client"}'] == 1
        assert values['streamer_stream_backlog_seconds{stream="live"}'] == 0
        await ws.send('{"type":"stop"}')
        await read_all(ws)
    await stream_clip(app, "counted")
    async with connect(ws_url(app, "/v1/stream")) as ws:
        await ws.send("{oops")
        await read_all(ws)
    values = await asyncio.to_thread(scrape, app)
    assert values['streamer_events_total{type="final"}'] >= 1
    assert values['streamer_event_latency_seconds_count{type="final"}'] >= 1
    assert values["streamer_audio_received_seconds_total{}"] == pytest.approx(
        clip_pcm()[2], abs=0.01
    )
    key = 'streamer_rejected_connections_total{endpoint="stream",reason="bad_request"}'
    assert values[key] == 1
    assert values['streamer_client_streams_closed_total{code="1000"}'] == 2
    assert values['streamer_client_streams_closed_total{code="1007"}'] == 1
    assert values["streamer_engine_alive{}"] == 1
    assert values["streamer_engine_requests_total{}"] >= 1
    assert values["streamer_engine_batch_mean{}"] >= 1
    # every stream is done: a closed client's stream may still be ending in the
    # background when the socket closes, so wait for its gauges to go
    deadline = asyncio.get_running_loop().time() + 10
    while [k for k in values if k.startswith(("streamer_stream_lag", "streamer_stream_backlog"))]:
        assert asyncio.get_running_loop().time() < deadline, values
        await asyncio.sleep(0.05)
        values = await asyncio.to_thread(scrape, app)
    assert values["streamer_input_held_seconds_total{}"] == 0  # the engine kept up
    assert values["streamer_segments_merged_total{}"] == 0


async def test_metrics_need_the_token_when_auth_is_on(tiny_whisper: Path, tmp_path: Path) -> None:
    (tmp_path / "t").write_text("tok")
    async with running(make_config(tiny_whisper, auth_token_file=str(tmp_path / "t"))) as app:
        assert await asyncio.to_thread(http_status, app, "/metrics") == 401
        assert await asyncio.to_thread(http_status, app, "/healthz") == 200
        values = await asyncio.to_thread(scrape, app, {"Authorization": "Bearer tok"})
        assert values['streamer_rejected_connections_total{endpoint="metrics",reason="auth"}'] == 1
