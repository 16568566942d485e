"""Several daemons behind HAProxy on one MQTT bus (README "Running several daemons").

Real parts on loopback: two ``streamer serve`` processes on the tiny Whisper,
Debian's HAProxy in front (streamer/testing/haproxy.py: deploy/haproxy.cfg
with test ports and fast health checks), one Mosquitto, and
tools/stream_client.py's :class:`StreamClient` as the clients, streaming real
audio. VAD is off and ``max_segment_s`` is 1, so every second of a stream's
audio is one final and the finals of a stream must tile its audio exactly;
admission is off, so only ``max_streams`` makes a daemon refuse.

The kill: every client sends the first ``PAUSE_S`` of its clip and waits;
once each has the finals of all the whole seconds it sent, and MQTT has the
same, daemon "a" is SIGKILLed and the clients go on. So the kill falls
between finals and every check can be exact (a final in flight at the
moment of a crash is the limit README "Running several daemons" describes).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import os
import signal
import ssl
import subprocess
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest
import soundfile as sf
import soxr
import trustme
from websockets.asyncio.client import connect

from streamer.testing.daemon import DaemonProcess, tiny_model_config
from streamer.testing.haproxy import HAProxy, find_haproxy
from streamer.testing.mosquitto import Mosquitto, find_mosquitto, hash_password
from streamer.testing.net import free_port
from tools.stream_client import RATE, StreamClient, StreamOptions

from ..conftest import check_wire_event
from ..sinks.test_mqtt import Recorder

REPO = Path(__file__).resolve().parents[2]
AUDIO = REPO / "tests" / "data" / "audio"
CLIPS = ("fleurs-en-004.ogg", "common_voice_fr_17301936.mp3", "jfk.flac")
CLIENTS = 10
PAUSE_S = 2.5  # audio each client sends before the kill
TIMEOUT = 90.0  # two model loads and ten streams on two busy cores


@pytest.fixture
def haproxy_ok() -> None:
    """Skip without HAProxy; under CI (``CI`` set) fail instead."""
    if find_haproxy() is None:
        reason = "haproxy is not installed (apt-get install haproxy)"
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail(f"{reason}; CI must run the cluster tests")
        pytest.skip(reason)


def daemon_config(model: Path, name: str, state: Path, max_streams: int, broker: int | None) -> str:
    mqtt = ""
    if broker is not None:
        mqtt = f"""
[mqtt]
enabled = true
host = "127.0.0.1"
port = {broker}
client_id = "streamer-{name}"
reconnect_min_s = 0.1
reconnect_max_s = 0.5
"""
    extra = f'[admission]\nenabled = false\n\n[service]\nstate_dir = "{state}"\n{mqtt}'
    return tiny_model_config(
        model,
        f"max_audio_rate = 50.0\nmax_streams = {max_streams}",
        extra,
        streaming="max_segment_s = 1.0",
    )


@contextlib.asynccontextmanager
async def cluster(
    tmp_path: Path, model: Path, env: dict[str, str], max_streams: dict[str, int],
    broker: int | None = None,
) -> AsyncIterator[tuple[dict[str, DaemonProcess], HAProxy]]:  # fmt: skip
    """Daemons (name → max_streams), ready, behind a started HAProxy with every server UP."""
    daemons: dict[str, DaemonProcess] = {}
    proxy: HAProxy | None = None
    try:
        for name, limit in max_streams.items():
            config = daemon_config(model, name, tmp_path / name / "state", limit, broker)
            daemons[name] = DaemonProcess.start(tmp_path / name, config, env)
        await asyncio.gather(*(d.wait_ready(TIMEOUT) for d in daemons.values()))
        proxy = HAProxy(tmp_path / "haproxy", {n: d.port for n, d in daemons.items()})
        proxy.start()
        for name in daemons:
            await until(lambda n=name: proxy.server_status(n) == "UP", f"{name} UP", proxy)
        yield daemons, proxy
        for d in daemons.values():
            assert "Traceback" not in d.log, d.log
    finally:
        if proxy is not None:
            proxy.stop()
        for d in daemons.values():
            d.kill()


async def until(pred: Callable[[], bool], what: str, proxy: HAProxy | None = None,
                timeout: float = TIMEOUT) -> None:  # fmt: skip
    try:
        async with asyncio.timeout(timeout):
            while not pred():
                await asyncio.sleep(0.02)
    except TimeoutError:
        tail = proxy.log_tail() if proxy is not None else ""
        pytest.fail(f"timed out after {timeout} s waiting for {what}\n{tail}")


def clip(name: str) -> bytes:
    """A test clip as 16 kHz mono s16le (what the client sends)."""
    audio, rate = sf.read(AUDIO / name, dtype="float32", always_2d=True)
    mono = audio.mean(axis=1)
    if rate != RATE:
        mono = soxr.resample(mono, rate, RATE)
    return (np.clip(mono, -1, 1) * 32767).astype("<i2").tobytes()


@dataclass
class Client:
    """One StreamClient through HAProxy, its audio paused at ``PAUSE_S`` until ``go``."""

    name: str
    audio: bytes
    go: asyncio.Event
    events: list[dict[str, Any]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    client: StreamClient | None = None
    task: asyncio.Task[int] | None = None

    def start(self, url: str) -> None:
        opts = StreamOptions(url=url, stream=self.name, reconnect_for=TIMEOUT)
        self.client = StreamClient(opts, lambda e, _: self.events.append(e), self.lines.append)
        self.task = asyncio.create_task(self.client.run(self.source(), asyncio.Event()))

    async def source(self) -> AsyncIterator[bytes]:
        pause = round(PAUSE_S * RATE) * 2
        for i in range(0, len(self.audio), 3200):
            if i >= pause:
                await self.go.wait()
            yield self.audio[i : i + 3200]

    @property
    def duration(self) -> float:
        return len(self.audio) / 2 / RATE

    def finals(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == "final"]

    def paused(self) -> bool:
        """It sent its first ``PAUSE_S`` and has the final of every whole second of it."""
        got = self.finals()
        return bool(got) and got[-1]["end"] == math.floor(PAUSE_S)


def assert_one_stream(finals: list[dict[str, Any]], duration: float) -> None:
    """Finals that cover ``[0, duration]`` exactly once, seq strictly rising."""
    assert finals and finals[0]["start"] == 0.0, finals
    for a, b in itertools.pairwise(finals):
        assert b["start"] == a["end"], (a, b)  # contiguous: no gap, no overlap
        assert b["seq"] > a["seq"], (a, b)
    assert finals[-1]["end"] == pytest.approx(duration, abs=0.01), finals[-1]


def mqtt_events(rec: Recorder, stream: str) -> list[dict[str, Any]]:
    """A consumer's view of one stream: QoS 1 repeats (same seq, same payload) dropped."""
    seen: dict[int, dict[str, Any]] = {}
    for message in rec.messages:
        if message.topic.value.startswith(f"streamer/{stream}/"):
            event = json.loads(message.payload)
            assert seen.setdefault(event["seq"], event) == event, event
    return list(seen.values())


def followed(subs: dict[str, list[dict[str, Any]]], stream: str) -> dict[int, dict[str, Any]]:
    """One stream's finals from the subscribers of every daemon, by seq."""
    return {e["seq"]: e for got in subs.values() for e in got if e["stream"] == stream}


async def caught_up(c: Client, rec: Recorder, subs: dict[str, list[dict[str, Any]]]) -> None:
    """Until MQTT and the caption subscribers have every final the client has."""
    want = [e["seq"] for e in c.finals()]

    def on_mqtt() -> list[int]:
        return [e["seq"] for e in mqtt_events(rec, c.name) if e["type"] == "final"]

    await until(lambda: on_mqtt() == want, f"{c.name}'s finals on MQTT")
    await until(lambda: sorted(followed(subs, c.name)) == want, f"{c.name}'s finals subscribed")


async def subscribe(url: str, into: list[dict[str, Any]]) -> None:
    """A /v1/captions subscriber that keeps what it gets until its daemon goes away."""
    with contextlib.suppress(Exception):
        async with connect(url, open_timeout=10) as ws:
            async for message in ws:
                into.append(json.loads(message))


@pytest.mark.usefixtures("haproxy_ok")
async def test_ten_clients_two_daemons_one_killed_all_resume(
    tiny_whisper: Path, tmp_path: Path, cli_env: dict[str, str], mosquitto: Mosquitto
) -> None:
    go = asyncio.Event()
    clients = [
        Client(f"c{i}", clip(CLIPS[i % len(CLIPS)]), go) for i in range(CLIENTS)
    ]  # fmt: skip
    limits = {"a": CLIENTS, "b": CLIENTS}
    async with (
        Recorder(mosquitto.port, ["streamer/+/final", "streamer/+/partial"]) as rec,
        cluster(tmp_path, tiny_whisper, cli_env, limits, mosquitto.port) as (daemons, proxy),
    ):
        # Caption subscribers that follow every daemon through the balancer.
        subs: dict[str, list[dict[str, Any]]] = {"a": [], "b": []}
        readers = [
            asyncio.create_task(subscribe(proxy.url(f"/d/{n}/v1/captions?kinds=final"), got))
            for n, got in subs.items()
        ]
        for c in clients:
            c.start(proxy.url("/v1/stream"))
        await until(lambda: all(c.paused() for c in clients), "every client's first finals", proxy)
        for c in clients:  # nothing in flight: MQTT and the subscribers have them too
            await caught_up(c, rec, subs)
        # They landed on both daemons, as leastconn spreads them.
        served = {n: proxy.connections(n) for n in daemons}
        assert served["a"] + served["b"] == CLIENTS and min(served.values()) >= 3, served
        run_of = {c.name: {e["run"] for e in c.events} for c in clients}
        assert all(len(runs) == 1 for runs in run_of.values()), run_of
        runs = {run for rs in run_of.values() for run in rs}
        assert len(runs) == 2, run_of
        run_a = {e["run"] for e in subs["a"]}
        assert len(run_a) == 1, subs["a"]
        on_a = {c.name for c in clients if run_of[c.name] == run_a}
        assert len(on_a) == served["a"], (on_a, served)

        daemons["a"].signal(signal.SIGKILL)  # mid-stream: no shutdown code runs
        assert await daemons["a"].wait_exit() == -signal.SIGKILL
        go.set()
        codes = await asyncio.wait_for(
            asyncio.gather(*(c.task for c in clients if c.task)), TIMEOUT
        )
        assert codes == [0] * CLIENTS, [c.lines for c in clients]
        await until(lambda: proxy.server_status("a") == "DOWN", "a DOWN", proxy)
        for c in clients:
            await caught_up(c, rec, subs)
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    (run_b,) = runs - run_a
    for c in clients:
        assert c.client is not None
        for event in c.events:
            check_wire_event(event)
        assert_one_stream(c.finals(), c.duration)
        seqs = [e["seq"] for e in c.events]
        assert seqs == sorted(set(seqs)), (c.name, seqs)
        moved = c.name in on_a
        assert c.client.resumes == (1 if moved else 0), (c.name, c.lines)
        assert c.finals()[-1]["run"] == run_b  # every stream ended on b
        # MQTT: one stream per client, the very finals the client got, seq rising.
        bus = mqtt_events(rec, c.name)
        assert [e for e in bus if e["type"] == "final"] == c.finals(), c.name
        assert [e["seq"] for e in bus] == sorted(e["seq"] for e in bus), c.name
        # Subscribed to every daemon: the same stream again.
        got = followed(subs, c.name)
        assert [got[s] for s in sorted(got)] == c.finals(), c.name


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


@pytest.mark.usefixtures("haproxy_ok")
async def test_a_full_daemon_is_skipped_for_new_clients(
    tiny_whisper: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    start = json.dumps({"type": "start", "sample_rate": RATE})
    async with cluster(tmp_path, tiny_whisper, cli_env, {"a": 1, "b": 4}) as (daemons, proxy):
        a = daemons["a"]
        async with connect(a.url("/v1/stream")) as direct:  # not through HAProxy
            await direct.send(start)
            assert json.loads(await direct.recv())["type"] == "ready"
            status, body = await asyncio.to_thread(get, a.url("/readyz", "http"))
            assert status == 503 and "streams: full: refusing new streams (1 of 1)" in body, body
            await until(lambda: proxy.server_status("a") == "DOWN", "full a DOWN", proxy)
            # leastconn alone would pick a (HAProxy sends it nothing): it is skipped.
            async with contextlib.AsyncExitStack() as stack:
                for _ in range(3):
                    ws = await stack.enter_async_context(connect(proxy.url("/v1/stream")))
                    await ws.send(start)
                    assert json.loads(await ws.recv())["type"] == "ready"
                assert (proxy.connections("a"), proxy.connections("b")) == (0, 3)
                status, body = await asyncio.to_thread(get, proxy.url("/d/b/readyz", "http"))
                assert status == 200 and "streams: open (3 of 4)" in body, body
                await direct.send('{"type": "stop"}')
                await direct.wait_closed()
                await until(lambda: proxy.server_status("a") == "UP", "a UP again", proxy)
                ws = await stack.enter_async_context(connect(proxy.url("/v1/stream")))
                await ws.send(start)
                assert json.loads(await ws.recv())["type"] == "ready"
                assert (proxy.connections("a"), proxy.connections("b")) == (1, 3)


# -- the deployment files (deploy/) ------------------------------------------------------


@pytest.mark.usefixtures("haproxy_ok")
def test_deploy_haproxy_cfg_is_valid_and_is_what_the_tests_run(tmp_path: Path) -> None:
    cert = trustme.CA().issue_cert("captions.example.org")
    pem = tmp_path / "captions.pem"
    for blob in (*cert.cert_chain_pems, cert.private_key_pem):
        blob.write_to_path(str(pem), append=True)
    deployed = (REPO / "deploy" / "haproxy.cfg").read_text(encoding="utf-8")
    assert "/etc/haproxy/certs/captions.pem" in deployed
    config = tmp_path / "haproxy.cfg"
    config.write_text(deployed.replace("/etc/haproxy/certs/captions.pem", str(pem)), "utf-8")
    proxy = HAProxy(tmp_path / "fixture", {"a": 1, "b": 2})
    proxy.check()  # the fixture's own config
    proxy.conf_path = config
    proxy.check()

    # The fixture runs the same routing, balancing, checks, retries and timeouts.
    def directives(text: str) -> set[str]:
        lines = (line.split("#")[0].strip() for line in text.splitlines())
        return {line for line in lines if line and "127.0.0.1" not in line and "10.0." not in line}

    fixture = directives(proxy.conf_path.with_name("haproxy.cfg").read_text("utf-8"))
    shared = {
        "balance leastconn",
        "balance source",
        "hash-type consistent",
        "http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host localhost",
        "http-check send meth GET uri /healthz ver HTTP/1.1 hdr Host localhost",
        "http-check expect status 200",
        "timeout tunnel 1h",
        "timeout http-request 10s",
        "retries 2",
        "option redispatch 1",
        "retry-on conn-failure empty-response 503",
        "use_backend streams if { path /v1/stream }",
        "http-request replace-path /d/a(/.*) \\1",
        "http-request redirect location %[path]/ code 301 if { path -m reg ^/d/[a-z0-9]+$ }",
    }
    assert shared <= directives(deployed) and shared <= fixture, (
        shared - directives(deployed),
        shared - fixture,
    )
    assert "on-marked-down shutdown-sessions" not in directives(deployed)


async def test_deploy_mosquitto_conf_tls_passwords_and_read_only_devices(tmp_path: Path) -> None:
    """deploy/mosquitto.conf and mosquitto.acl, paths and port rewritten, in a real broker."""
    binary = find_mosquitto()
    if binary is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    ca = trustme.CA()
    certs = tmp_path / "certs"
    certs.mkdir()
    server = ca.issue_cert("127.0.0.1", "localhost")
    for blob in server.cert_chain_pems:
        blob.write_to_path(str(certs / "server.pem"), append=True)
    server.private_key_pem.write_to_path(str(certs / "server.key"))
    users = {"streamer": "daemon secret", "display": "device secret"}
    (tmp_path / "passwd").write_text(
        "".join(f"{u}:{hash_password(p)}\n" for u, p in users.items()), "utf-8"
    )
    (tmp_path / "acl").write_text((REPO / "deploy" / "mosquitto.acl").read_text("utf-8"), "utf-8")
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "data").mkdir()
    port = free_port()
    text = (REPO / "deploy" / "mosquitto.conf").read_text("utf-8")
    for old, new in {
        "/etc/mosquitto/certs/": f"{certs}/",
        "/etc/mosquitto/passwd": f"{tmp_path}/passwd",
        "/etc/mosquitto/acl": f"{tmp_path}/acl",
        "/etc/mosquitto/conf.d": f"{tmp_path}/conf.d",
        "/var/lib/mosquitto/": f"{tmp_path}/data/",
        "log_dest syslog": f"log_dest file {tmp_path}/mosquitto.log",
        "listener 8883": f"listener {port} 127.0.0.1",
    }.items():
        assert old in text, old
        text = text.replace(old, new)
    if os.geteuid() == 0:
        text = "user root\n" + text  # else it switches to "mosquitto" and cannot read tmp_path
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(text, "utf-8")
    with (tmp_path / "out.log").open("wb") as out:
        proc = subprocess.Popen([binary, "-c", str(conf)], stdout=out, stderr=out,
                                start_new_session=True)  # fmt: skip
    tls = ssl.create_default_context(
        cafile=ca.cert_pem.write_to_path(str(tmp_path / "ca.pem")) or str(tmp_path / "ca.pem")
    )

    def client(user: str | None, timeout: float = 5.0, **kw: Any) -> aiomqtt.Client:
        return aiomqtt.Client("127.0.0.1", port, username=user,
                              password=users.get(user or ""), timeout=timeout, **kw)  # fmt: skip

    try:
        async with asyncio.timeout(10):
            while True:  # listening?
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.close()
                    break
                except OSError:
                    assert proc.poll() is None, (tmp_path / "out.log").read_text()
                    await asyncio.sleep(0.02)
        async with client("display", tls_context=tls) as device:
            await device.subscribe("streamer/#", qos=1)
            async with client("streamer", tls_context=tls) as daemon:
                await device.publish("streamer/kitchen/final", b"forged", qos=1)  # acked, dropped
                await daemon.publish("streamer/kitchen/final", b"captions", qos=1)
                async with asyncio.timeout(10):
                    message = await anext(aiter(device.messages))
                assert message.payload == b"captions"  # the forged one never arrived
        with pytest.raises(aiomqtt.MqttError):  # anonymous: not authorised
            async with client(None, tls_context=tls):
                pass
        with pytest.raises(aiomqtt.MqttError):  # no TLS: no session
            async with client("display", timeout=1.0):  # (the broker waits for a TLS hello)
                pass
    finally:
        proc.terminate()
        proc.wait(10)
