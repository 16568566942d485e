"""``seq`` across daemon restarts, and the run id, with real processes and a real broker.

The daemon runs as ``python -m streamer serve`` on the tiny Whisper (VAD off,
so any audio makes events); a WebSocket client streams audio to
``/v1/stream`` under a stream id of its choosing, the daemon is SIGKILLed
mid-stream (no shutdown code runs), restarted on the same state folder, and
the same stream id streams again: every new ``seq`` must be above every old
one (subscribers drop repeats by ``seq``), and the ``run`` must differ.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import soundfile as sf
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from streamer.errors import EX_CONFIG
from streamer.service.seq_store import STATE_FILE
from streamer.sinks.fanout import Fanout
from streamer.sinks.mqtt import MqttSettings, MqttSink
from streamer.testing.daemon import tiny_model_config
from streamer.testing.mosquitto import Mosquitto
from streamer.testing.net import free_port
from streamer.types import Hypothesis

from ..conftest import check_wire_event
from ..sinks.test_mqtt import Recorder
from .test_ingest import make_config, running, stream_clip
from .test_mqtt_daemon import with_mqtt

CLIP = Path(__file__).resolve().parents[1] / "data" / "audio" / "fleurs-en-004.ogg"
STREAM = "restart-me"
TIMEOUT = 90.0  # a model load on 2 busy cores, then a few decodes
RUN_ID = re.compile(r"[0-9a-f]{16}")


def write_config(path: Path, model: Path, port: int, state_dir: Path) -> Path:
    path.write_text(
        tiny_model_config(
            model,
            "max_audio_rate = 50.0",
            f'[service]\nstate_dir = "{state_dir}"\n',
            streaming="max_segment_s = 2.0",
            port=port,
        ),
        encoding="utf-8",
    )
    return path


def pcm_frames() -> list[bytes]:
    """The clip as 16 kHz s16 frames of 0.1 s."""
    audio, rate = sf.read(CLIP, dtype="float32")
    assert rate == 16000
    data = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    return [data[i : i + 3200] for i in range(0, len(data), 3200)]


@contextlib.asynccontextmanager
async def daemon(config: Path, log: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "streamer", "serve", "-c", str(config), "--keep-serving",
            stdout=out, stderr=out,
        )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def open_stream(proc: asyncio.subprocess.Process, port: int, log: Path) -> ClientConnection:
    """``/v1/stream`` once the daemon is ready (it answers 503 while the model loads)."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            assert proc.returncode is None, log.read_text("utf-8", "replace")
            try:
                ws = await connect(f"ws://127.0.0.1:{port}/v1/stream", open_timeout=10)
            except (OSError, InvalidStatus):
                await asyncio.sleep(0.1)
                continue
            start = {"type": "start", "stream": STREAM, "sample_rate": 16000}
            await ws.send(json.dumps(start))
            assert json.loads(await ws.recv())["type"] == "ready"
            return ws


async def stream_until(ws: ClientConnection, count: int) -> list[dict[str, Any]]:
    """Send audio (looping the clip) until ``count`` caption events came back."""

    async def send() -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                for frame in pcm_frames():
                    await ws.send(frame)
                    await asyncio.sleep(0.02)  # 5x real time

    sender = asyncio.create_task(send())
    events: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(TIMEOUT):
            while len(events) < count:
                event = json.loads(await ws.recv())
                if event.get("type") in ("partial", "final"):
                    events.append(check_wire_event(event))
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
    return events


async def test_seq_rises_across_a_sigkill_and_the_run_changes(
    tiny_whisper: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    runs: list[list[dict[str, Any]]] = []
    for attempt in range(2):
        port = free_port()
        config = write_config(tmp_path / f"serve-{attempt}.toml", tiny_whisper, port, state)
        log = tmp_path / f"daemon-{attempt}.log"
        async with daemon(config, log) as proc:
            ws = await open_stream(proc, port, log)
            try:
                runs.append(await stream_until(ws, 4))
                proc.send_signal(signal.SIGKILL)  # mid-stream: no shutdown code runs
                assert await asyncio.wait_for(proc.wait(), TIMEOUT) == -signal.SIGKILL
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.close(), 5)
    old, new = runs
    for events in runs:
        seqs = [e["seq"] for e in events]
        assert seqs == sorted(set(seqs)), seqs
        assert {e["stream"] for e in events} == {STREAM}
        assert len({e["run"] for e in events}) == 1 and RUN_ID.fullmatch(events[0]["run"])
    assert min(e["seq"] for e in new) > max(e["seq"] for e in old), (old, new)
    assert old[0]["run"] != new[0]["run"]
    marks = json.loads((state / STATE_FILE).read_text(encoding="ascii"))["streams"]
    assert marks[STREAM] >= max(e["seq"] for e in new)


async def test_an_unwritable_state_dir_exits_78_in_one_line(
    tiny_whisper: Path, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("", encoding="utf-8")
    config = write_config(tmp_path / "serve.toml", tiny_whisper, free_port(), blocker / "state")
    log = tmp_path / "daemon.log"
    async with daemon(config, log) as proc:
        assert await asyncio.wait_for(proc.wait(), TIMEOUT) == EX_CONFIG
    lines = log.read_text("utf-8").splitlines()
    assert len(lines) == 1 and "service.state_dir" in lines[0], lines
    assert "cannot use the state directory" in lines[0] and "Traceback" not in lines[0]


def user_properties(message: aiomqtt.Message) -> list[tuple[str, str]]:
    return list(getattr(message.properties, "UserProperty", None) or [])


async def test_retained_status_carries_the_run_id(tiny_whisper: Path, mosquitto: Mosquitto) -> None:
    """MQTT 5: the status payload stays "online"/"offline" with a ("run", id) user
    property; {prefix}/status/run holds the id; the events carry the same id."""
    cfg = with_mqtt(make_config(tiny_whisper), mosquitto.port)
    async with Recorder(mosquitto.port) as rec, running(cfg) as app:
        run = app.run_id
        assert RUN_ID.fullmatch(run)
        await rec.wait_for(lambda: rec.statuses() == [b"online"], "status online")
        assert rec.statuses("streamer/status/run") == [run.encode()]
        assert user_properties(rec.on("streamer/status")[0]) == [("run", run)]
        events = await stream_clip(app, "kitchen")
        assert events and {e["run"] for e in events} == {run}
        await rec.wait_for(lambda: bool(rec.on("streamer/kitchen/final")), "a final")
        assert {json.loads(m.payload)["run"] for m in rec.on("streamer/kitchen/final")} == {run}
    async with Recorder(mosquitto.port, ["streamer/status", "streamer/status/run"]) as late:
        await late.wait_for(lambda: len(late.messages) == 2, "both retained messages")
        assert all(m.retain for m in late.messages)
        assert late.statuses() == [b"offline"]
        assert user_properties(late.on("streamer/status")[0]) == [("run", run)]
        assert late.statuses("streamer/status/run") == [run.encode()]


async def test_mqtt_311_gets_the_run_id_on_its_own_topic(mosquitto: Mosquitto) -> None:
    """No user properties in MQTT 3.1.1: the run id is the retained {prefix}/status/run."""
    run = "00112233445566ff"
    settings = MqttSettings(host="127.0.0.1", port=mosquitto.port, protocol="3.1.1",
                            client_id="streamer-311", prefix="p311")  # fmt: skip
    sink = MqttSink(settings, run_id=run)
    fanout = Fanout()
    task = asyncio.create_task(sink.run(fanout.subscribe(kinds=sink.kinds, name="mqtt")))
    try:
        async with Recorder(mosquitto.port, ["p311/#"]) as rec:
            await rec.wait_for(lambda: rec.statuses("p311/status") == [b"online"], "online")
            assert rec.statuses("p311/status/run") == [run.encode()]
            assert user_properties(rec.on("p311/status")[0]) == []
            fanout.publish(Hypothesis("final", "s", 0, 7, "hi", 0.0, 1.0, run=run))
            await rec.wait_for(lambda: bool(rec.on("p311/s/final")), "the final")
            assert json.loads(rec.on("p311/s/final")[0].payload)["run"] == run
    finally:
        fanout.close_all("shutdown")
        await asyncio.wait_for(task, TIMEOUT)
    async with Recorder(mosquitto.port, ["p311/status", "p311/status/run"]) as late:
        await late.wait_for(lambda: len(late.messages) == 2, "both retained messages")
        assert late.statuses("p311/status") == [b"offline"]
        assert late.statuses("p311/status/run") == [run.encode()]
