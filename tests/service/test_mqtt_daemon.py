"""The daemon with MQTT on: a real Mosquitto, real subscribers, real audio, outages.

The sink's own behaviour (QoS, outbox, TLS, bad passwords) is in
tests/sinks/test_mqtt.py; here the whole daemon is checked: what a WebSocket
client sees is what MQTT devices get, the broker may be down at start or go
away mid-stream, and a daemon killed with SIGKILL leaves ``offline``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import sys
import urllib.request
from pathlib import Path
from typing import Any

from streamer.config import MqttConfig
from streamer.service.app import App
from streamer.testing.mosquitto import Mosquitto, TcpGate
from streamer.testing.net import free_port

from ..sinks.test_mqtt import Recorder
from .test_ingest import make_config, running, stream_clip

TIMEOUT = 60.0


def with_mqtt(cfg: Any, port: int, **mqtt: Any) -> Any:
    settings = MqttConfig(enabled=True, host="127.0.0.1", port=port, reconnect_min_s=0.1,
                          reconnect_max_s=0.5, client_id="streamer-test", **mqtt)  # fmt: skip
    return dataclasses.replace(cfg, mqtt=settings)


def finals(rec: Recorder, stream: str) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in rec.on(f"streamer/{stream}/final")]


def readyz(app: App) -> tuple[int, str]:
    assert app.server is not None
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{app.server.port}/readyz", timeout=10
        ) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


async def test_mqtt_gets_what_the_websocket_client_gets(
    tiny_whisper: Path, mosquitto: Mosquitto
) -> None:
    async with Recorder(mosquitto.port) as rec:
        cfg = with_mqtt(make_config(tiny_whisper, max_audio_rate=3.0), mosquitto.port)
        async with running(cfg) as app:
            await rec.wait_for(lambda: rec.statuses() == [b"online"], "status online")
            own = await stream_clip(app, "kitchen")
            want = [e for e in own if e["type"] == "final"]
            await rec.wait_for(lambda: len(finals(rec, "kitchen")) >= len(want), "finals")
            assert finals(rec, "kitchen") == want  # same JSON, same order
            status, body = await asyncio.to_thread(readyz, app)
            assert status == 200 and ": connected (MQTT 5)" in body
            order = [
                (m.topic.value.rsplit("/", 1)[1], json.loads(m.payload))
                for m in rec.messages
                if m.topic.value.startswith("streamer/kitchen/")
            ]
            for i, (kind, event) in enumerate(order):  # every partial before its final
                if kind == "partial":
                    later = [e for k, e in order[i:] if k == "final"]
                    assert any(f["segment"] == event["segment"] for f in later), event
    async with Recorder(mosquitto.port, topics=["streamer/status"]) as late:
        await late.wait_for(lambda: late.statuses() == [b"offline"], "retained offline")


async def test_broker_down_at_start_then_up(tiny_whisper: Path, mosquitto: Mosquitto) -> None:
    gate = TcpGate(mosquitto.host, mosquitto.port)  # closed: connections are refused
    await gate.open()
    await gate.close()
    async with Recorder(mosquitto.port) as rec:
        async with running(with_mqtt(make_config(tiny_whisper), gate.port)) as app:
            status, body = await asyncio.to_thread(readyz, app)
            assert status == 200 and "finals queued" in body  # ready without a broker
            early = await stream_clip(app, "early")  # WebSocket captions work meanwhile
            assert early[-1]["type"] == "final"
            await gate.open()
            await rec.wait_for(lambda: rec.statuses()[-1:] == [b"online"], "online", TIMEOUT)
            want = [e for e in early if e["type"] == "final"]
            await rec.wait_for(lambda: finals(rec, "early") == want, "the queued finals")
        await gate.close()


async def test_broker_restart_mid_stream_loses_no_final(
    tiny_whisper: Path, mosquitto: Mosquitto
) -> None:
    gate = TcpGate(mosquitto.host, mosquitto.port)
    await gate.open()
    rec = Recorder(mosquitto.port)
    await rec.connect()
    try:
        async with running(with_mqtt(make_config(tiny_whisper), gate.port)) as app:
            assert app.mqtt is not None
            await rec.wait_for(lambda: rec.statuses()[-1:] == [b"online"], "online")
            sent = await stream_clip(app, "s1")
            mosquitto.kill()
            await gate.close()
            await wait_until(lambda: not app.mqtt.connected)  # type: ignore[union-attr]
            during = await stream_clip(app, "s2")  # finals emitted during the outage
            during += await stream_clip(app, "s3")
            assert app.mqtt.outbox_len > 0
            mosquitto.start()
            await rec.reconnect()
            await gate.open()
            for stream, events in (("s2", during), ("s3", during)):
                want = [e for e in events if e["type"] == "final" and e["stream"] == stream]
                await rec.wait_for(
                    lambda s=stream, w=want: _dedup(finals(rec, s)) == w, f"{stream} finals"
                )
            assert app.mqtt.dropped_finals == 0
    finally:
        await rec.close()
        await gate.close()
    assert sent[-1]["type"] == "final"


def _dedup(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """QoS 1 may repeat a final: keep the first of each seq, checking repeats are identical."""
    seen: dict[int, dict[str, Any]] = {}
    for event in events:
        assert seen.setdefault(event["seq"], event) == event
    return list(seen.values())


async def wait_until(pred: Any, timeout: float = TIMEOUT) -> None:
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.02)


async def test_wrong_password_keeps_the_daemon_serving(
    tiny_whisper: Path, mosquitto: Mosquitto
) -> None:
    assert mosquitto.password_port is not None
    ((user, _),) = mosquitto.users.items()
    cfg = with_mqtt(make_config(tiny_whisper), mosquitto.password_port, username=user,
                    password="wrong")  # fmt: skip
    async with running(cfg) as app:
        assert app.mqtt is not None
        await wait_until(lambda: app.mqtt.failed_attempts >= 2)  # type: ignore[union-attr]
        status, body = await asyncio.to_thread(readyz, app)
        assert status == 200 and "not authorized" in body
        events = await stream_clip(app, "still")
        assert events[-1]["type"] == "final"


# -- the daemon as a process ------------------------------------------------------------


def write_config(tmp_path: Path, model: Path, port: int, broker: int, pace: str) -> Path:
    audio = Path(__file__).resolve().parents[1] / "data" / "audio" / "fleurs-en-004.ogg"
    config = tmp_path / "streamer.toml"
    config.write_text(
        f"""
[model]
id = "{model}"
device = "cpu"
source_language = "en"
target_language = "en"

[streaming]
chunk_ms = 500
max_tokens_per_second = 3.0
min_tokens = 2

[[sources]]
type = "file"
stream = "clip"
path = "{audio}"
pace = "{pace}"

[websocket]
port = {port}

[mqtt]
enabled = true
host = "127.0.0.1"
port = {broker}
client_id = "streamer-proc"

[console]
enabled = false
"""
    )
    return config


async def start_daemon(config: Path, env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streamer", "serve", "--config", str(config), "--keep-serving",
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def test_sigkill_leaves_offline_and_sigterm_delivers_every_final(
    tiny_whisper: Path, mosquitto: Mosquitto, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    from websockets.asyncio.client import connect

    async with Recorder(mosquitto.port) as rec:
        # SIGKILL: no clean disconnect, so the broker publishes the will.
        config = write_config(tmp_path, tiny_whisper, free_port(), mosquitto.port, "realtime")
        proc = await start_daemon(config, cli_env)
        await rec.wait_for(lambda: rec.statuses()[-1:] == [b"online"], "online", TIMEOUT)
        os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()
        await rec.wait_for(lambda: rec.statuses()[-1:] == [b"offline"], "the will", TIMEOUT)

        # SIGTERM mid-stream: the tail is finalised and reaches WebSocket and MQTT alike.
        rec.messages.clear()
        port = free_port()
        config = write_config(tmp_path, tiny_whisper, port, mosquitto.port, "realtime")
        proc = await start_daemon(config, cli_env)
        await rec.wait_for(lambda: rec.statuses()[-1:] == [b"online"], "online", TIMEOUT)
        ws_events: list[dict[str, Any]] = []
        async with asyncio.timeout(TIMEOUT):
            while True:
                try:
                    ws = await connect(f"ws://127.0.0.1:{port}/v1/captions")
                    break
                except OSError:
                    await asyncio.sleep(0.1)

        async def read() -> None:
            async for message in ws:
                ws_events.append(json.loads(message))

        reader = asyncio.create_task(read())
        await rec.wait_for(lambda: rec.on("streamer/clip/partial"), "a partial", TIMEOUT)
        proc.send_signal(signal.SIGTERM)  # the clip is still playing
        assert await asyncio.wait_for(proc.wait(), TIMEOUT) == 0
        await asyncio.wait_for(reader, TIMEOUT)  # the server closed with 1001 after flushing
        ws_finals = [e for e in ws_events if e["type"] == "final"]
        assert ws_finals, "the stream's tail was finalised"
        await rec.wait_for(lambda: _dedup(finals(rec, "clip")) == ws_finals, "MQTT finals")
        assert rec.statuses()[-1:] == [b"offline"]
