"""MQTT sink against a real Mosquitto and a real aiomqtt subscriber.

Events go through a real Fanout/Subscription into MqttSink. Outages are real:
the broker process is killed and restarted on the same port. Where a test
needs its subscriber back before the sink reconnects (a restarted broker has
no sessions), the sink reaches the broker through a TcpGate that the test
opens once the subscriber is subscribed; a closed gate refuses connections
exactly like a stopped broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from streamer.errors import ConfigError
from streamer.sinks.fanout import Fanout
from streamer.sinks.mqtt import (
    HERMES_FINAL_TOPIC,
    HERMES_PARTIAL_TOPIC,
    MqttSettings,
    MqttSink,
    hermes_payload,
    resolve_password,
)
from streamer.testing.mosquitto import Mosquitto, TcpGate, free_port
from streamer.types import Hypothesis

LOGGER = "streamer.sinks.mqtt"
WAIT = 10.0  # generous bound for events that normally take milliseconds


# -- helpers -----------------------------------------------------------------------------


def final(seq: int, stream: str = "mic0", text: str | None = None) -> Hypothesis:
    return Hypothesis(
        kind="final",
        stream=stream,
        segment=seq,
        seq=seq,
        text=f"Satz {seq}: Grüße aus Köln" if text is None else text,
        start=float(seq),
        end=seq + 0.75,
        lang="de",
        latency_ms=412.5,
    )


def partial(seq: int, segment: int, stream: str = "mic0") -> Hypothesis:
    return Hypothesis(
        kind="partial",
        stream=stream,
        segment=segment,
        seq=seq,
        text="Guten Morgen, wie",
        committed="Guten Morgen,",
        tentative=" wie",
        start=float(segment),
        end=segment + 0.5,
        lang="de",
        latency_ms=180.0,
    )


def wire_bytes(event: Hypothesis) -> bytes:
    """The payload the WebSocket sends for ``event``."""
    return json.dumps(event.to_wire(), ensure_ascii=False).encode()


def settings(port: int, **kw: Any) -> MqttSettings:
    """Fast-retrying settings with a unique client id (no takeover between tests)."""
    base: dict[str, Any] = dict(
        host="127.0.0.1",
        port=port,
        client_id=f"test-{uuid.uuid4().hex[:10]}",
        reconnect_min_s=0.05,
        reconnect_max_s=0.2,
        timeout_s=3.0,
        flush_timeout_s=3.0,
    )
    base.update(kw)
    return MqttSettings(**base)


async def wait_until(pred: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Poll ``pred`` until true; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


class Recorder:
    """A real MQTT 5 subscriber that keeps every message; can reconnect after a restart."""

    def __init__(self, port: int, topics: Iterable[str] = ("streamer/#", "hermes/#")) -> None:
        self.port = port
        self.topics = tuple(topics)
        self.messages: list[aiomqtt.Message] = []
        self._changed = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self._reader: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        client = aiomqtt.Client(
            "127.0.0.1",
            self.port,
            identifier=f"rec-{uuid.uuid4().hex[:10]}",
            protocol=aiomqtt.ProtocolVersion.V5,
        )
        await client.__aenter__()
        for topic in self.topics:
            await client.subscribe(topic, qos=2)
        self._client = client
        self._reader = asyncio.create_task(self._read(client))

    async def _read(self, client: aiomqtt.Client) -> None:
        with contextlib.suppress(aiomqtt.MqttError):
            async for message in client.messages:
                self.messages.append(message)
                self._changed.set()

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await self._client.__aexit__(None, None, None)
        self._client = self._reader = None

    async def reconnect(self) -> None:
        await self.close()
        await self.connect()

    async def __aenter__(self) -> Recorder:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def on(self, topic: str) -> list[aiomqtt.Message]:
        return [m for m in self.messages if m.topic.value == topic]

    def seqs(self, topic: str = "streamer/mic0/final") -> list[int]:
        return [json.loads(m.payload)["seq"] for m in self.on(topic)]

    def statuses(self, topic: str = "streamer/status") -> list[bytes]:
        return [m.payload for m in self.on(topic)]

    async def wait_for(self, pred: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not pred():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            got = [(m.topic.value, m.payload) for m in self.messages][-10:]
            pytest.fail(f"timed out after {timeout} s waiting for {what}; last messages: {got}")


class Running:
    """MqttSink.run() on a real Fanout subscription, as the daemon wires it."""

    def __init__(self, cfg: MqttSettings) -> None:
        self.fanout = Fanout()
        self.sink = MqttSink(cfg)
        sub = self.fanout.subscribe(kinds=self.sink.kinds, name="mqtt")
        self.task = asyncio.create_task(self.sink.run(sub))

    def publish(self, *events: Hypothesis) -> None:
        for event in events:
            self.fanout.publish(event)

    async def stop(self, timeout: float = WAIT) -> float:
        """Close the subscription (daemon shutdown); returns how long run() took to end."""
        t0 = time.monotonic()
        self.fanout.close_all("shutdown")
        await asyncio.wait_for(asyncio.shield(self.task), timeout)
        return time.monotonic() - t0


@contextlib.asynccontextmanager
async def running(cfg: MqttSettings) -> AsyncIterator[Running]:
    run = Running(cfg)
    try:
        yield run
    finally:
        if not run.task.done():
            await run.stop()
        assert run.task.exception() is None


async def retained_status(port: int, prefix: str = "streamer") -> bytes:
    """What a new subscriber gets as the retained status (must be retained)."""
    async with Recorder(port, [f"{prefix}/status"]) as rec:
        await rec.wait_for(lambda: bool(rec.messages), "the retained status")
        message = rec.messages[0]
        assert message.retain, "status must be retained"
        assert isinstance(message.payload, bytes)
        return message.payload


def sink_lines(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= level]


# -- settings, password, payload helpers -------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "key"),
    [
        ({"port": 0}, "mqtt.port"),
        ({"protocol": "4"}, "mqtt.protocol"),
        ({"final_qos": 3}, "mqtt.final_qos"),
        ({"prefix": "a/#"}, "mqtt.prefix"),
        ({"prefix": "/x"}, "mqtt.prefix"),
        ({"outbox_size": 0}, "mqtt.outbox_size"),
        ({"tls_ca": "/ca.pem"}, "mqtt.tls"),
        ({"password": "pw"}, "mqtt.password"),
        ({"reconnect_min_s": 2.0, "reconnect_max_s": 1.0}, "mqtt.reconnect_max_s"),
    ],
)
def test_settings_reject_bad_values_naming_the_key(kw: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        MqttSettings(**kw)
    assert info.value.key == key


def test_settings_defaults_and_password_kept_out_of_repr() -> None:
    cfg = MqttSettings(username="u", password="hunter2-secret")
    assert cfg.port == 1883 and cfg.client_id.startswith("streamer-")
    assert (cfg.partial_qos, cfg.final_qos, cfg.prefix) == (0, 1, "streamer")
    assert "hunter2-secret" not in repr(cfg)
    assert cfg.topic("a/b+c#", "final") == "streamer/a_b_c_/final"


def test_tls_files_unreadable_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot load TLS files"):
        MqttSink(MqttSettings(tls=True, tls_ca=str(tmp_path / "missing.pem")))


def test_resolve_password_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n\n", encoding="utf-8")
    assert resolve_password("explicit", str(secret)) == "explicit"
    assert resolve_password("", str(secret)) == "s3cret\n"  # one newline stripped
    assert resolve_password("", "") is None
    creds = tmp_path / "creds"
    creds.mkdir()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert resolve_password("", "") is None  # no such credential
    (creds / "mqtt-password").write_text("from-systemd\r\n", encoding="utf-8")
    assert resolve_password("", "") == "from-systemd"
    assert resolve_password("", "", credential="other") is None
    with pytest.raises(ConfigError) as info:
        resolve_password("", str(tmp_path / "missing"))
    assert info.value.key == "mqtt.password_file" and "No such file" in str(info.value)


def test_hermes_payload_fields() -> None:
    event = final(7, text=" Guten  Morgen! ")
    payload = hermes_payload(event)
    assert payload == {
        "text": "Guten  Morgen!",
        "likelihood": 1.0,
        "seconds": 0.412,
        "siteId": "mic0",
        "sessionId": None,
        "wakewordId": None,
        "asrTokens": [
            [
                {"value": "Guten", "confidence": 1.0, "rangeStart": 0, "rangeEnd": 5, "time": None},
                {
                    "value": "Morgen!",
                    "confidence": 1.0,
                    "rangeStart": 7,
                    "rangeEnd": 14,
                    "time": None,
                },
            ]
        ],
        "lang": "de",
    }
    assert hermes_payload(event, "kitchen")["siteId"] == "kitchen"


def test_backoff_is_capped_full_jitter() -> None:
    sink = MqttSink(MqttSettings(reconnect_min_s=0.5, reconnect_max_s=4.0))
    for failures, cap in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (40, 4.0)]:
        delays = [sink._backoff(failures) for _ in range(200)]
        assert all(0.5 <= d <= cap for d in delays), (failures, max(delays))
    assert max(sink._backoff(40) for _ in range(200)) > 3.0  # jitter spans the range


# -- real broker ----------------------------------------------------------------------------


async def test_topics_qos_retain_payload_and_status(
    mosquitto: Mosquitto, wire_event: Callable[..., dict[str, Any]]
) -> None:
    async with Recorder(mosquitto.port) as rec, running(settings(mosquitto.port)) as run:
        await rec.wait_for(lambda: rec.statuses() == [b"online"], "status online")
        assert run.sink.connected and run.sink.protocol_version == "5"
        p = partial(seq=0, segment=0)
        run.publish(p)
        await rec.wait_for(lambda: bool(rec.on("streamer/mic0/partial")), "the partial")
        f = final(1)
        run.publish(f)
        await rec.wait_for(lambda: bool(rec.on("streamer/mic0/final")), "the final")
        assert await retained_status(mosquitto.port) == b"online"

        (pm,) = rec.on("streamer/mic0/partial")
        assert (pm.qos, pm.retain, pm.payload) == (0, False, wire_bytes(p))
        wire_event(json.loads(pm.payload))
        expiry = getattr(pm.properties, "MessageExpiryInterval", None)
        assert isinstance(expiry, int), pm.properties
        assert 1 <= expiry <= 5  # MQTT 5 message expiry (the broker sends what is left)

        (fm,) = rec.on("streamer/mic0/final")
        assert (fm.qos, fm.retain, fm.payload) == (1, False, wire_bytes(f))
        assert json.loads(fm.payload) == f.to_wire()
        wire_event(json.loads(fm.payload))
        assert not hasattr(fm.properties, "MessageExpiryInterval")
        assert rec.messages.index(pm) < rec.messages.index(fm)  # partial before its final

        elapsed = await run.stop()
        assert elapsed < 2.0
        await rec.wait_for(lambda: rec.statuses()[-1] == b"offline", "offline at shutdown")
    assert await retained_status(mosquitto.port) == b"offline"
    stats = run.sink.stats()
    assert stats["published_partials"] == 1 and stats["published_finals"] == 1
    assert stats["dropped_partials"] == stats["dropped_finals"] == 0
    assert stats["state"] == "stopped" and not stats["connected"]


async def test_killed_sink_process_leaves_offline_by_last_will(
    mosquitto: Mosquitto, repo_root: Path
) -> None:
    child = (
        "import asyncio, sys\n"
        "from streamer.sinks.fanout import Fanout\n"
        "from streamer.sinks.mqtt import MqttSettings, MqttSink\n"
        "async def main():\n"
        "    cfg = MqttSettings(host='127.0.0.1', port=int(sys.argv[1]), prefix=sys.argv[2],\n"
        "                       client_id=sys.argv[2])\n"
        "    sink = MqttSink(cfg)\n"
        "    task = asyncio.create_task(sink.run(Fanout().subscribe(name='mqtt')))\n"
        "    while not sink.connected:\n"
        "        await asyncio.sleep(0.01)\n"
        "    print('connected', flush=True)\n"
        "    await task\n"
        "asyncio.run(main())\n"
    )
    prefix = f"will-{uuid.uuid4().hex[:8]}"
    async with Recorder(mosquitto.port, [f"{prefix}/status"]) as rec:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            child,
            str(mosquitto.port),
            prefix,
            cwd=repo_root,
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line.strip() == b"connected", line
            topic = f"{prefix}/status"
            await rec.wait_for(lambda: rec.statuses(topic) == [b"online"], "online")
            os.kill(proc.pid, signal.SIGKILL)  # no DISCONNECT: the broker sends the will
            await rec.wait_for(lambda: rec.statuses(topic)[-1:] == [b"offline"], "the will")
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            await proc.wait()
    assert await retained_status(mosquitto.port, prefix) == b"offline"


async def test_broker_down_at_start_queues_finals_and_drops_partials(
    mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    mosquitto.stop()
    gate = TcpGate(mosquitto.host, mosquitto.port)  # closed: refuses like a stopped broker
    async with running(settings(gate.port)) as run:
        run.publish(*[final(seq) for seq in range(1, 6)])
        run.publish(partial(6, segment=6), partial(7, segment=0, stream="mic1"))
        await wait_until(lambda: run.sink.failed_attempts >= 3, "three failed attempts")
        sink = run.sink
        assert not sink.connected and not run.task.done()
        assert sink.state == "disconnected" and "connection refused" in (sink.last_error or "")
        assert sink.dropped_partials == 2 and sink.outbox_len == 5
        lines = sink_lines(caplog)
        assert len(lines) >= 3 and all("connection refused" in line for line in lines)

        mosquitto.start()
        async with Recorder(mosquitto.port) as rec:
            await gate.open()
            await rec.wait_for(lambda: len(rec.seqs()) >= 5, "the queued finals")
            assert rec.seqs() == [1, 2, 3, 4, 5]
            assert rec.statuses()[0] == b"online"
            await wait_until(lambda: sink.outbox_len == 0, "the last PUBACK")
            assert sink.published_finals == 5 and sink.dropped_finals == 0
            assert sink.last_error is None and sink.state == "connected"
        await gate.close()
        await run.stop()


async def test_broker_killed_mid_stream_loses_no_final(mosquitto: Mosquitto) -> None:
    gate = TcpGate(mosquitto.host, mosquitto.port)
    await gate.open()
    rec = Recorder(mosquitto.port)
    await rec.connect()
    try:
        async with running(settings(gate.port)) as run:
            await rec.wait_for(lambda: rec.statuses() == [b"online"], "status online")
            run.publish(*[final(seq) for seq in range(200)])
            await rec.wait_for(lambda: len(rec.seqs()) >= 20, "the first finals")
            mosquitto.kill()
            assert run.sink.outbox_len > 0, "the kill must land mid-stream"
            await gate.close()
            await wait_until(lambda: not run.sink.connected, "the sink to notice the outage")
            run.publish(*[final(seq) for seq in range(200, 250)])  # emitted during the outage
            await wait_until(lambda: run.sink.failed_attempts >= 1, "a refused reconnect")

            mosquitto.start()
            await rec.reconnect()
            await gate.open()
            await rec.wait_for(lambda: set(rec.seqs()) >= set(range(250)), "every final")
            assert run.sink.reconnects == 1 and run.sink.dropped_finals == 0
            await run.stop()
    finally:
        await rec.close()
        await gate.close()
    seqs = rec.seqs()
    assert seqs == sorted(seqs), "finals arrive in order (a re-sent one repeats in place)"
    payloads: dict[int, bytes] = {}
    for m in rec.on("streamer/mic0/final"):
        seq = json.loads(m.payload)["seq"]
        assert payloads.setdefault(seq, m.payload) == m.payload
    assert len(seqs) - len(payloads) <= 1  # at most the one in flight at the kill


async def test_outbox_overflow_drops_oldest_and_warns_once(
    mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    gate = TcpGate(mosquitto.host, mosquitto.port)
    async with running(settings(gate.port, outbox_size=3)) as run:
        run.publish(*[final(seq) for seq in range(6)])
        await wait_until(lambda: run.sink.dropped_finals == 3, "three dropped finals")
        run.publish(final(6))
        await wait_until(lambda: run.sink.dropped_finals == 4, "a fourth dropped final")
        assert run.sink.outbox_len == 3
        warnings = [line for line in sink_lines(caplog) if "outbox full" in line]
        assert len(warnings) == 1, warnings
        async with Recorder(mosquitto.port) as rec:
            await gate.open()
            await rec.wait_for(lambda: len(rec.seqs()) >= 3, "the kept finals")
            assert rec.seqs() == [4, 5, 6]
        await gate.close()


async def test_wrong_password_logs_one_clear_line_per_attempt(
    mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # the password must not appear even in debug output
    assert mosquitto.password_port is not None
    ((user, password),) = mosquitto.users.items()
    wrong = "wrong-password-XYZ"
    async with running(settings(mosquitto.password_port, username=user, password=wrong)) as run:
        await wait_until(lambda: run.sink.failed_attempts >= 3, "three failed attempts")
        lines = sink_lines(caplog)
        assert len(lines) == run.sink.failed_attempts  # one line per failure cycle
        for line in lines:
            assert "not authorized" in line and "retrying in" in line, line
        errors = [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]
        assert all(r.levelno == logging.ERROR and r.exc_info is None for r in errors)
        assert not run.task.done() and not run.sink.connected
    assert all(wrong not in r.getMessage() for r in caplog.records)

    cfg = settings(mosquitto.password_port, username=user, password=password)
    async with Recorder(mosquitto.port) as rec, running(cfg) as run:
        await rec.wait_for(lambda: rec.statuses() == [b"online"], "online with the right password")
    assert all(password not in r.getMessage() for r in caplog.records)


async def test_tls_with_the_broker_ca_and_a_wrong_ca(
    mosquitto: Mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import trustme

    assert mosquitto.tls_port is not None and mosquitto.ca_path is not None
    cfg = settings(mosquitto.tls_port, tls=True, tls_ca=str(mosquitto.ca_path))
    async with Recorder(mosquitto.port) as rec, running(cfg) as run:
        run.publish(final(0))
        await rec.wait_for(lambda: rec.seqs() == [0], "a final over TLS")
        assert cfg.endpoint.startswith("mqtts://")

    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    async with running(settings(mosquitto.tls_port, tls=True, tls_ca=str(other_ca))) as run:
        await wait_until(lambda: run.sink.failed_attempts >= 2, "two failed TLS attempts")
        lines = sink_lines(caplog)
        assert len(lines) == run.sink.failed_attempts
        assert all("TLS certificate verification failed" in line for line in lines), lines
        assert not run.sink.connected and not run.task.done()


async def test_tls_client_certificate(mosquitto_factory: Callable[..., Mosquitto]) -> None:
    broker = mosquitto_factory(tls=True, require_client_cert=True)
    cert, key = broker.client_cert()
    assert broker.tls_port is not None and broker.ca_path is not None
    cfg = settings(
        broker.tls_port, tls=True, tls_ca=str(broker.ca_path), tls_cert=str(cert), tls_key=str(key)
    )
    async with Recorder(broker.port) as rec, running(cfg):
        await rec.wait_for(lambda: rec.statuses() == [b"online"], "online with a client cert")


async def test_hermes_mode_publishes_rhasspy_payloads(mosquitto: Mosquitto) -> None:
    cfg = settings(mosquitto.port, hermes=True, hermes_site_id="kitchen")
    async with Recorder(mosquitto.port) as rec, running(cfg) as run:
        await rec.wait_for(lambda: rec.statuses() == [b"online"], "status online")
        p, f = partial(0, segment=1), final(1)
        run.publish(p)
        await rec.wait_for(lambda: bool(rec.on(HERMES_PARTIAL_TOPIC)), "partialTextCaptured")
        run.publish(f)
        await rec.wait_for(lambda: bool(rec.on(HERMES_FINAL_TOPIC)), "textCaptured")
        (hp,) = rec.on(HERMES_PARTIAL_TOPIC)
        (hf,) = rec.on(HERMES_FINAL_TOPIC)
        assert json.loads(hp.payload) == hermes_payload(p, "kitchen")
        assert json.loads(hf.payload) == hermes_payload(f, "kitchen")
        assert (hp.qos, hf.qos) == (0, 1)
        assert rec.on("streamer/mic0/final")[0].payload == wire_bytes(f)  # the usual topics too
        # an empty final retracts partials: the usual topic carries it, Hermes does not
        empty = dataclasses.replace(final(2), text="")
        run.publish(empty, final(3))
        await rec.wait_for(lambda: len(rec.on(HERMES_FINAL_TOPIC)) == 2, "second textCaptured")
        await rec.wait_for(lambda: len(rec.on("streamer/mic0/final")) == 3, "three finals")
        assert rec.on("streamer/mic0/final")[1].payload == wire_bytes(empty)
        assert json.loads(rec.on(HERMES_FINAL_TOPIC)[1].payload) == hermes_payload(
            final(3), "kitchen"
        )


async def test_shutdown_flushes_the_outbox_when_the_broker_returns(mosquitto: Mosquitto) -> None:
    gate = TcpGate(mosquitto.host, mosquitto.port)
    async with Recorder(mosquitto.port) as rec:
        run = Running(settings(gate.port, flush_timeout_s=5.0))
        run.publish(*[final(seq) for seq in range(10)])
        await wait_until(lambda: run.sink.failed_attempts >= 1, "a failed attempt")
        run.fanout.close_all("shutdown")  # shutdown starts while the broker is away
        await gate.open()
        await asyncio.wait_for(run.task, 5.0)
        await rec.wait_for(lambda: rec.statuses()[-1:] == [b"offline"], "status offline")
        assert rec.seqs() == list(range(10))  # the broker forwards in order: all came first
        assert rec.statuses() == [b"online", b"offline"]
        assert run.sink.outbox_len == 0
        await gate.close()


async def test_shutdown_gives_up_after_the_flush_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    run = Running(settings(free_port(), flush_timeout_s=0.5))  # nothing listens there
    run.publish(final(0), final(1))
    await wait_until(lambda: run.sink.failed_attempts >= 1, "a failed attempt")
    elapsed = await run.stop()
    assert 0.4 < elapsed < 2.5
    assert run.task.exception() is None
    assert any("2 finals not delivered at shutdown" in line for line in sink_lines(caplog))


async def test_dns_failure_is_one_clear_line(caplog: pytest.LogCaptureFixture) -> None:
    cfg = MqttSettings(host="broker.invalid", reconnect_min_s=0.05, reconnect_max_s=0.1)
    async with running(cfg) as run:
        # One attempt is enough (a resolver without network may take seconds to fail).
        await wait_until(lambda: run.sink.failed_attempts >= 1, "a failed attempt", timeout=30)
        lines = sink_lines(caplog)
        assert lines and all("DNS lookup of 'broker.invalid' failed" in x for x in lines), lines


class V311OnlyBroker:
    """Answers MQTT 5 CONNECTs like a 3.1.1-only broker; forwards 3.1.1 to Mosquitto."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.levels: list[int] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> V311OnlyBroker:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readexactly(1)
            length, shift, raw = 0, 0, b""
            while True:  # remaining length: MQTT variable byte integer
                byte = await reader.readexactly(1)
                raw += byte
                length |= (byte[0] & 0x7F) << shift
                shift += 7
                if not byte[0] & 0x80:
                    break
            body = await reader.readexactly(length)
            level = body[6]  # after the protocol name b"\x00\x04MQTT"
            self.levels.append(level)
            if level == 5:  # CONNACK, return code 1: unacceptable protocol version
                writer.write(b"\x20\x02\x00\x01")
                await writer.drain()
                return
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            up_writer.write(head + raw + body)

            async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()

            with contextlib.suppress(OSError):
                await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
            up_writer.close()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def test_auto_protocol_falls_back_to_311(
    mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with V311OnlyBroker(mosquitto.port) as broker, Recorder(mosquitto.port) as rec:
        async with running(settings(broker.port)) as run:
            await rec.wait_for(lambda: rec.statuses() == [b"online"], "online over 3.1.1")
            assert broker.levels == [5, 4] and run.sink.protocol_version == "3.1.1"
            run.publish(partial(0, segment=0))
            await rec.wait_for(lambda: bool(rec.on("streamer/mic0/partial")), "the partial")
            (pm,) = rec.on("streamer/mic0/partial")
            assert not hasattr(pm.properties, "MessageExpiryInterval")  # MQTT 5 only
        assert sum("does not speak MQTT 5" in r.getMessage() for r in caplog.records) == 1
        assert sink_lines(caplog) == []  # the fallback is not a failure
