"""systemd integration: the unit file, the sd_notify client, and the daemon under it.

systemd itself cannot run here (no systemd as PID 1), so:

- the unit file is checked with ``systemd-analyze verify`` and
  ``systemd-analyze security --offline=true`` (Debian package ``systemd``);
  without the tool the tests skip, except in CI (``CI`` set), where they fail;
- the notifications are read from a real AF_UNIX datagram socket bound in
  tmp_path and passed as ``$NOTIFY_SOCKET``, with ``SO_PASSCRED`` so each
  message carries its sender's pid, as systemd sees it (``NotifyAccess=main``
  accepts only the main pid's messages);
- the daemon runs in-process (App, tiny random Whisper) with a real engine
  thread made to hang inside a decode, and as a ``python -m streamer serve``
  subprocess stopped by SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import select
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from websockets.asyncio.client import ClientConnection, connect

from streamer.cli import build_parser
from streamer.config import (
    Config,
    ConsoleConfig,
    ModelConfig,
    MqttConfig,
    StreamingConfig,
    VadConfig,
    WebSocketConfig,
)
from streamer.service import app as app_module
from streamer.service import systemd
from streamer.service.app import App
from streamer.service.systemd import EngineHealth, Notifier, StatusLine, feed_watchdog

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "streamer.service"
ENV_FILE = REPO / "systemd" / "streamer.env"
CLIP = REPO / "tests" / "data" / "audio" / "fleurs-en-004.ogg"
MAX_EXPOSURE = 4.5
TIMEOUT = 30.0
SUBPROCESS_TIMEOUT = 90.0  # torch + transformers imports on 2 busy cores


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


# -- the unit file ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def systemd_analyze() -> str:
    """The ``systemd-analyze`` binary (Debian: apt-get install systemd)."""
    path = shutil.which("systemd-analyze")
    if path is None:
        reason = "systemd-analyze is not installed (apt-get install systemd)"
        if in_ci():
            pytest.fail(f"{reason}; CI must check the unit file")
        pytest.skip(reason)
    return path


def unit_entries(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) of every assignment, in order (keys may repeat)."""
    entries: list[tuple[str, str, str]] = []
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def unit_values(key: str, section: str = "Service") -> list[str]:
    return [v for s, k, v in unit_entries(UNIT.read_text()) if (s, k) == (section, key)]


def unit_copy(tmp_path: Path, extra: str = "") -> Path:
    """The unit with ExecStart= pointing at this venv's Python.

    ``verify`` checks that the ExecStart binary exists and is executable, and
    /opt/streamer is not installed here. Unknown ``User=``/``Group=`` are not
    checked offline (systemd 252), so the ``streamer`` user need not exist.
    """
    (exec_start,) = unit_values("ExecStart")
    args = shlex.split(exec_start)[1:]
    text = UNIT.read_text().replace(
        f"ExecStart={exec_start}", f"ExecStart={sys.executable} -m streamer {shlex.join(args)}"
    )
    assert text != UNIT.read_text()
    copy = tmp_path / "streamer.service"
    copy.write_text(text + extra, encoding="utf-8")
    return copy


def run_analyze(binary: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, SYSTEMD_LOG_COLOR="0", SYSTEMD_PAGER="", LC_ALL="C.UTF-8")
    return subprocess.run(
        [binary, *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


def test_unit_verifies_without_warnings(systemd_analyze: str, tmp_path: Path) -> None:
    result = run_analyze(systemd_analyze, "verify", str(unit_copy(tmp_path)))
    assert result.returncode == 0, result.stderr
    # verify exits 0 on settings it ignores ("Invalid syntax, ignoring"): no output at all.
    assert result.stdout + result.stderr == ""

    # ... and this check does see a broken setting.
    broken = run_analyze(
        systemd_analyze, "verify", str(unit_copy(tmp_path, "[Service]\nSetCredential=x:\n"))
    )
    assert "Invalid syntax" in broken.stderr, broken


def test_unit_security_exposure(systemd_analyze: str, tmp_path: Path) -> None:
    result = run_analyze(
        systemd_analyze, "security", "--offline=true", "--no-pager", str(unit_copy(tmp_path))
    )
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, result.stdout
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, result.stdout
    assert "Invalid syntax" not in result.stderr, result.stderr


def test_unit_settings_match_the_daemon() -> None:
    """The decisions the daemon relies on, and an ExecStart the CLI accepts."""
    service = dict((k, v) for s, k, v in unit_entries(UNIT.read_text()) if s == "Service")
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert float(service["WatchdogSec"]) >= 2 * systemd.HEARTBEAT_FLOOR_S
    assert systemd.EXTEND_BY_S > systemd.EXTEND_EVERY_S  # extensions overlap
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == "78"  # ConfigError's exit code
    assert "PrivateDevices" not in service  # would hide /dev/snd and /dev/nvidia*
    assert service.get("MemoryDenyWriteExecute", "no") == "no"  # oneDNN JIT
    assert set(service["SupplementaryGroups"].split()) == {"audio", "video", "render"}
    assert service["CacheDirectory"] == "streamer"  # -> $CACHE_DIRECTORY, the model cache

    (exec_start,) = unit_values("ExecStart")
    binary, *args = shlex.split(exec_start)
    assert binary == "/opt/streamer/.venv/bin/streamer"
    parsed = build_parser().parse_args(args)
    assert parsed.command == "serve" and parsed.config == ["/etc/streamer/streamer.toml"]
    assert parsed.keep_serving  # the default config has a file source that ends

    loads = [v.split(":", 1)[0] for v in unit_values("LoadCredential")]
    defaults = [v.split(":", 1)[0] for v in unit_values("SetCredential")]
    assert sorted(loads) == sorted(defaults) == ["mqtt-password", "ws-token"]  # optional ones
    assert all(v.split(":", 1)[1] == r"\n" for v in unit_values("SetCredential"))


def test_unit_raises_the_file_descriptor_limit() -> None:
    """Each client is a descriptor: systemd's default soft limit (1024) is too few."""
    from streamer.sinks.access import connection_limit

    (value,) = unit_values("LimitNOFILE")
    soft = int(value.partition(":")[0])
    assert soft >= 65536
    assert connection_limit(soft) >= 50_000  # what the server then admits at once


def test_unit_credential_default_reads_as_no_token(tmp_path: Path) -> None:
    """The fallback credential (a lone newline) makes a config that asks for it fail closed."""
    from streamer.errors import ConfigError
    from streamer.service.app import load_ws_token

    (tmp_path / "ws-token").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        load_ws_token(str(tmp_path / "ws-token"))


def test_env_file_names_variables_that_are_read() -> None:
    """Each variable the example environment file documents is read by someone."""
    names = re.findall(r"^#?([A-Z][A-Z0-9_]*)=", ENV_FILE.read_text(), flags=re.MULTILINE)
    assert names
    source = "\n".join(p.read_text() for p in (REPO / "streamer").rglob("*.py"))
    third_party = {"HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "CUDA_VISIBLE_DEVICES"}
    third_party |= {"OMP_NUM_THREADS"}
    for name in names:
        assert name in third_party or f'"{name}"' in source, name


# -- a notify socket, as systemd has it -----------------------------------------------


@dataclass(frozen=True)
class Message:
    fields: dict[str, str]
    pid: int
    at: float


@dataclass
class NotifyListener:
    """Receives sd_notify datagrams with their sender's pid (SO_PASSCRED)."""

    sock: socket.socket
    address: str
    messages: list[Message] = field(default_factory=list)

    def _read(self) -> None:
        while True:
            try:
                data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except BlockingIOError:
                return
            pid = -1
            for level, kind, payload in ancdata:
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS):
                    pid = struct.unpack("3i", payload[:12])[0]
            lines = data.decode("utf-8").split("\n")
            fields = dict(line.split("=", 1) for line in lines)
            assert len(fields) == len(lines), data  # no repeated or malformed lines
            self.messages.append(Message(fields, pid, time.monotonic()))

    def _find(self, pred: Callable[[Message], bool], start: int) -> int | None:
        for i in range(start, len(self.messages)):
            if pred(self.messages[i]):
                return i
        return None

    def wait(
        self, pred: Callable[[Message], bool], timeout: float = TIMEOUT, start: int = 0
    ) -> int:
        """Index of the first message from ``start`` on that matches (blocking)."""
        deadline = time.monotonic() + timeout
        while (found := self._find(pred, start)) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no matching notification in {timeout} s: {self.fields()}")
            select.select([self.sock], [], [], remaining)
            self._read()
        return found

    async def await_(
        self, pred: Callable[[Message], bool], timeout: float = TIMEOUT, start: int = 0
    ) -> int:
        """Like :meth:`wait`, without blocking the event loop."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._read()
        while (found := self._find(pred, start)) is None:
            readable: asyncio.Future[None] = loop.create_future()
            loop.add_reader(self.sock, _resolve, readable)
            try:
                await asyncio.wait_for(readable, max(0.0, deadline - loop.time()))
            except TimeoutError:
                pytest.fail(f"no matching notification in {timeout} s: {self.fields()}")
            finally:
                loop.remove_reader(self.sock)
            self._read()
        return found

    def fields(self) -> list[dict[str, str]]:
        self._read()
        return [m.fields for m in self.messages]


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def has(key: str, value: str | None = None) -> Callable[[Message], bool]:
    return lambda m: key in m.fields and (value is None or m.fields[key] == value)


def status_has(text: str) -> Callable[[Message], bool]:
    return lambda m: text in m.fields.get("STATUS", "")


@contextlib.contextmanager
def bound_socket(address: str | bytes) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.bind(address)
        sock.setblocking(False)
        yield sock
    finally:
        sock.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    """A notify socket at an absolute path in tmp_path (or a shorter temp dir: 108 bytes max)."""
    folder = tmp_path
    short: str | None = None
    if len(os.fsencode(tmp_path / "notify")) >= 100:
        folder = Path(short := tempfile.mkdtemp(prefix="sd"))
    path = str(folder / "notify")
    try:
        with bound_socket(path) as sock:
            yield NotifyListener(sock, path)
    finally:
        if short:
            shutil.rmtree(short, ignore_errors=True)


# -- Notifier ------------------------------------------------------------------------


def test_notifier_sends_fields_from_this_process(listener: NotifyListener) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": listener.address})
    assert notifier.enabled
    assert notifier.ready(status="up")
    assert notifier.status("a\nREADY=1")  # a newline must not smuggle in a field
    assert notifier.watchdog()
    assert notifier.extend_timeout(30)
    assert notifier.stopping()
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    assert notifier.send(STATUS="x" * 5000)
    listener.wait(has("STATUS", "x" * (systemd.MAX_STATUS_CHARS - 1) + "…"))
    assert listener.fields()[:5] == [
        {"READY": "1", "STATUS": "up"},
        {"STATUS": "a READY=1"},
        {"WATCHDOG": "1"},
        {"EXTEND_TIMEOUT_USEC": "30000000"},
        {"STOPPING": "1"},
    ]
    reloading = listener.fields()[5]
    assert reloading["RELOADING"] == "1"
    assert before <= int(reloading["MONOTONIC_USEC"]) <= time.monotonic_ns() // 1000
    assert {m.pid for m in listener.messages} == {os.getpid()}
    notifier.close()


def test_notifier_abstract_socket() -> None:
    name = f"streamer-test-{uuid.uuid4().hex}"
    with bound_socket(b"\0" + name.encode()) as sock:
        listener = NotifyListener(sock, "@" + name)
        notifier = Notifier(f"@{name}")
        assert notifier.enabled and notifier.ready()
        listener.wait(has("READY", "1"))


def test_notifier_without_socket_is_a_no_op(caplog: pytest.LogCaptureFixture) -> None:
    for notifier in (Notifier.from_env({}), Notifier(""), Notifier(None)):
        assert not notifier.enabled
        assert not notifier.ready() and not notifier.watchdog()
        assert notifier.watchdog_interval() is None
    with caplog.at_level(logging.WARNING):
        for unsupported in ("vsock:2:1234", "relative/notify", "@"):
            assert not Notifier(unsupported).enabled
    assert caplog.text.count("unsupported NOTIFY_SOCKET") == 3


def test_unreachable_socket_never_raises_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "gone"
    notifier = Notifier(str(path))
    with caplog.at_level(logging.INFO, logger="streamer.service.systemd"):
        assert not notifier.ready()
        assert not notifier.watchdog()
        assert not notifier.status("still nobody")
        assert caplog.text.count("cannot notify systemd") == 1
        with bound_socket(str(path)) as sock:  # systemd comes back
            assert notifier.watchdog()
            NotifyListener(sock, str(path)).wait(has("WATCHDOG"))
        assert "works again" in caplog.text
        assert not notifier.watchdog()  # gone again: logged again, once
        assert caplog.text.count("cannot notify systemd") == 2


def test_full_queue_drops_instead_of_blocking(listener: NotifyListener) -> None:
    notifier = Notifier(listener.address)
    started = time.monotonic()
    results = [notifier.status(f"message {i}") for i in range(5000)]  # nobody reads
    assert not all(results) and results[0]
    assert time.monotonic() - started < 10


def test_watchdog_interval_only_for_this_pid(listener: NotifyListener) -> None:
    def interval(**env: str) -> float | None:
        return Notifier.from_env({"NOTIFY_SOCKET": listener.address, **env}).watchdog_interval()

    assert interval() is None
    assert interval(WATCHDOG_USEC="400000") == pytest.approx(0.4)
    assert interval(WATCHDOG_USEC="400000", WATCHDOG_PID=str(os.getpid())) == pytest.approx(0.4)
    assert interval(WATCHDOG_USEC="400000", WATCHDOG_PID=str(os.getpid() + 1)) is None
    assert interval(WATCHDOG_USEC="soon") is None
    assert interval(WATCHDOG_USEC="0") is None


# -- health check and status line (fake engine, fake clock) ---------------------------


@dataclass
class FakeStats:
    busy_seconds: float = 0.0
    audio_seconds: float = 0.0
    max_step_seconds: float = 0.0


@dataclass
class FakeEngine:
    heartbeat: float = 0.0
    alive: bool = True
    fatal: BaseException | None = None
    stats: FakeStats = field(default_factory=FakeStats)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_health_flags_an_old_heartbeat_and_allows_for_slow_steps() -> None:
    engine, clock = FakeEngine(), Clock()
    health = EngineHealth(engine, floor=5.0, clock=clock)
    clock.now = 4.9
    assert health() is None
    clock.now = 6.2
    assert health() == "engine heartbeat 6 s old (limit 5 s): decode hung?"
    # That step ends after 6.2 s: such steps are normal for this model.
    engine.heartbeat = clock.now = 6.3
    engine.stats.max_step_seconds = 6.2
    assert health() is None
    clock.now = 6.3 + 18.0  # < 3 x 6.2
    assert health() is None
    clock.now = 6.3 + 19.0
    assert health() == "engine heartbeat 19 s old (limit 19 s): decode hung?"


def test_health_reports_a_dead_engine() -> None:
    engine = FakeEngine(alive=False, fatal=RuntimeError("CUDA error: device lost"))
    assert EngineHealth(engine)() == "engine stopped: CUDA error: device lost"
    assert EngineHealth(FakeEngine(alive=False))() == "engine thread ended"


def test_status_line_figures_cover_a_recent_window() -> None:
    engine, clock = FakeEngine(), Clock()
    line = StatusLine(
        engine,
        streams=lambda: {"source": 1, "client": 2},
        subscribers=lambda: 4,
        extras=[lambda: "MQTT connected"],
        clock=clock,
    )
    clock.now = 5.0
    assert (
        line() == "streams 3 (2 from clients), subscribers 4, RTF -, engine 0% busy, MQTT connected"
    )
    engine.stats.busy_seconds, engine.stats.audio_seconds = 2.0, 8.0
    clock.now = 10.0
    assert "RTF 0.25, engine 20% busy" in line()  # window 0..10 s, then renewed
    engine.stats.busy_seconds, engine.stats.audio_seconds = 7.0, 18.0
    clock.now = 20.0
    assert "RTF 0.50, engine 50% busy" in line()  # window 10..20 s only


async def test_watchdog_survives_a_failing_status(listener: NotifyListener) -> None:
    def broken() -> str:
        raise ValueError("no figures")

    notifier = Notifier(listener.address)
    task = asyncio.create_task(feed_watchdog(notifier, lambda: None, 0.1, broken))
    try:
        first = await listener.await_(has("WATCHDOG"))
        assert listener.messages[first].fields["STATUS"] == "status failed: ValueError: no figures"
        await listener.await_(has("WATCHDOG"), start=first + 1)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# -- the daemon in-process -------------------------------------------------------------


def make_config(model: Path) -> Config:
    return Config(
        model=ModelConfig(id=str(model), device="cpu", source_language="en", target_language="en"),
        streaming=dataclasses.replace(
            StreamingConfig(), chunk_ms=500, max_tokens_per_second=3.0, min_tokens=2
        ),
        vad=VadConfig(enabled=False),
        sources=(),
        websocket=WebSocketConfig(port=0, max_audio_rate=50.0),
        console=ConsoleConfig(enabled=False),
    )


def clip_s16() -> tuple[bytes, int]:
    audio, rate = sf.read(CLIP, dtype="float32")
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes(), int(rate)


@contextlib.asynccontextmanager
async def client_stream(app: App) -> AsyncIterator[tuple[ClientConnection, bytes, int]]:
    """A started ``/v1/stream`` client, with the clip's PCM (s16le) and rate to send."""
    data, rate = clip_s16()
    assert app.server is not None
    async with connect(f"ws://127.0.0.1:{app.server.port}/v1/stream") as ws:
        start = {"type": "start", "stream": "s", "sample_rate": rate, "encoding": "pcm_s16le"}
        await ws.send(json.dumps(start))
        assert json.loads(await ws.recv())["type"] == "ready"
        yield ws, data, rate


def first_layer(app: App) -> Any:
    """The Whisper encoder's first convolution: every encoder pass (padded or trimmed) runs it."""
    assert app.engine is not None
    return app.engine.decoder.model.get_encoder().conv1


WATCHDOG_S = 0.4


async def test_app_notifies_loading_ready_watchdog_hang_and_stopping(
    listener: NotifyListener, tiny_whisper: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
    monkeypatch.setenv("WATCHDOG_USEC", str(int(WATCHDOG_S * 1e6)))
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.setattr(systemd, "EXTEND_EVERY_S", 0.05)
    # Above the engine's idle beat (1 s) with room for a busy machine, yet quick to trip.
    monkeypatch.setattr(systemd, "HEARTBEAT_FLOOR_S", 2.5)

    load = threading.Event()  # the model load waits for this: a slow first conversion
    real_start = app_module.start_engine

    def slow_start_engine(cfg: Config) -> Any:
        assert load.wait(TIMEOUT)
        return real_start(cfg)

    monkeypatch.setattr(app_module, "start_engine", slow_start_engine)
    app = App(make_config(tiny_whisper), keep_serving=True)
    run = asyncio.create_task(app.run(), name="app")
    hang = threading.Event()
    try:
        # Loading: a STATUS, then start-timeout extensions, and no READY yet.
        await listener.await_(status_has("starting: loading the model"))
        second = await listener.await_(has("EXTEND_TIMEOUT_USEC"), start=1)
        await listener.await_(has("EXTEND_TIMEOUT_USEC"), start=second + 1)
        assert listener.messages[second].fields["EXTEND_TIMEOUT_USEC"] == str(
            int(systemd.EXTEND_BY_S * 1e6)
        )
        assert not any("READY" in f for f in listener.fields())
        load.set()

        ready = await listener.await_(has("READY", "1"))
        assert app.ready  # the engine thread runs
        assert app.engine is not None and app.engine.alive
        status = listener.messages[ready].fields["STATUS"]
        assert status.startswith("streams 0 (0 from clients), subscribers 0, RTF -"), status
        extends = [i for i, m in enumerate(listener.messages) if "EXTEND_TIMEOUT_USEC" in m.fields]
        assert max(extends) < ready  # extending stops once loaded
        ping = await listener.await_(has("WATCHDOG", "1"), start=ready)
        for _ in range(3):  # every WATCHDOG_S / 2 while healthy
            ping = await listener.await_(has("WATCHDOG", "1"), start=ping + 1)

        # Hang the engine thread inside the encoder's forward pass of a client's window.
        hung = threading.Event()

        def hang_once(module: Any, args: Any) -> None:
            if not hung.is_set():
                hung.set()
                hang.wait(TIMEOUT)

        first_layer(app).register_forward_pre_hook(hang_once)
        healthy_until = len(listener.fields())
        assert not any(status_has("decode hung?")(m) for m in listener.messages)
        async with client_stream(app) as (ws, data, rate):
            await ws.send(data[: rate * 2 * 2])  # 2 s: enough for a decode request
            assert await asyncio.to_thread(hung.wait, TIMEOUT)

            sick = await listener.await_(status_has("decode hung?"), start=healthy_until)
            reason = re.fullmatch(
                r"engine heartbeat (\d+) s old \(limit \d+ s\): decode hung\?",
                listener.messages[sick].fields["STATUS"],
            )
            assert reason, listener.messages[sick]
            # The reason is refreshed as the heartbeat ages; no ping meanwhile.
            older = f"heartbeat {int(reason.group(1)) + 2} s old"
            later = await listener.await_(status_has(older), start=sick)
            assert listener.messages[later].at - listener.messages[sick].at > 2 * WATCHDOG_S
            assert not any("WATCHDOG" in m.fields for m in listener.messages[sick : later + 1])

            hang.set()  # the decode returns: healthy again, pings resume
            back = await listener.await_(has("WATCHDOG", "1"), start=later)
            await listener.await_(status_has("streams 1 (1 from clients)"), start=back)
            await ws.send(data[rate * 2 * 2 :])
            await ws.send('{"type": "stop"}')
            async with asyncio.timeout(TIMEOUT):
                async for _ in ws:
                    pass

        app.request_stop()
        assert await asyncio.wait_for(run, TIMEOUT) == 0
    finally:
        load.set()
        hang.set()
        if not run.done():
            app.request_stop()
            await asyncio.wait_for(run, TIMEOUT)
    stopping = listener.wait(has("STOPPING", "1"), timeout=1)
    assert listener.messages[stopping].fields["STATUS"] == "stopping"
    assert not any("WATCHDOG" in m.fields for m in listener.messages[stopping:])
    assert {m.pid for m in listener.messages} == {os.getpid()}


async def test_app_fatal_engine_error_is_the_status(
    listener: NotifyListener, tiny_whisper: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    app = App(make_config(tiny_whisper), keep_serving=True)
    run = asyncio.create_task(app.run(), name="app")
    try:
        await listener.await_(has("READY", "1"))
        assert app.engine is not None

        def device_lost(module: Any, args: Any) -> None:  # in the encoder's forward pass
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        first_layer(app).register_forward_pre_hook(device_lost)
        async with client_stream(app) as (ws, data, rate):
            await ws.send(data[: rate * 2 * 2])
            assert await asyncio.wait_for(run, TIMEOUT) == 1
    finally:
        if not run.done():
            app.request_stop()
            await asyncio.wait_for(run, TIMEOUT)
    reason = "CUDA error: an illegal memory access was encountered"
    failed = listener.wait(status_has(reason), timeout=1)
    assert listener.messages[failed].fields["STATUS"].startswith("engine failure: ")
    stopping = listener.wait(has("STOPPING", "1"), start=failed, timeout=1)
    stopped = listener.messages[stopping].fields["STATUS"]
    assert stopped.startswith("stopping after engine failure: ") and reason in stopped
    assert not any("READY" in m.fields for m in listener.messages[failed:])


async def test_app_status_shows_the_mqtt_connection(
    listener: NotifyListener,
    tiny_whisper: Path,
    mosquitto_factory: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker = mosquitto_factory()
    monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
    monkeypatch.setenv("WATCHDOG_USEC", str(int(WATCHDOG_S * 1e6)))
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    mqtt = MqttConfig(enabled=True, host="127.0.0.1", port=broker.port)
    app = App(dataclasses.replace(make_config(tiny_whisper), mqtt=mqtt), keep_serving=True)
    run = asyncio.create_task(app.run(), name="app")
    try:
        ready = await listener.await_(has("READY", "1"))
        endpoint = f"mqtt mqtt://127.0.0.1:{broker.port}: "
        up = await listener.await_(status_has(endpoint + "connected"), start=ready)
        broker.stop()  # the broker goes away: STATUS says so, the daemon stays healthy
        gone = await listener.await_(
            lambda m: (
                endpoint in m.fields.get("STATUS", "")
                and endpoint + "connected" not in m.fields["STATUS"]
            ),
            start=up,
        )
        await listener.await_(has("WATCHDOG", "1"), start=gone)
        app.request_stop()
        assert await asyncio.wait_for(run, TIMEOUT) == 0
    finally:
        if not run.done():
            app.request_stop()
            await asyncio.wait_for(run, TIMEOUT)


async def test_app_model_that_cannot_load_never_says_ready(
    listener: NotifyListener, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
    app = App(make_config(tmp_path / "no-such-model"), keep_serving=True)
    with pytest.raises(Exception, match="no such model folder"):
        await asyncio.wait_for(app.run(), TIMEOUT)
    listener.wait(status_has("failed to start: no such model folder"), timeout=1)
    assert not any("READY" in f for f in listener.fields())


# -- the daemon as a subprocess --------------------------------------------------------


def test_serve_subprocess_ready_then_stopping_on_sigterm(
    listener: NotifyListener, tiny_whisper: Path, tmp_path: Path
) -> None:
    config = tmp_path / "serve.toml"
    config.write_text(
        f"""
sources = []

[model]
id = "{tiny_whisper}"
device = "cpu"
source_language = "en"
target_language = "en"

[vad]
enabled = false

[websocket]
host = "127.0.0.1"
port = 0

[console]
enabled = false
""",
        encoding="utf-8",
    )
    env = dict(os.environ, NOTIFY_SOCKET=listener.address, WATCHDOG_USEC="2000000")
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamer", "serve", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        ready = listener.wait(has("READY", "1"), timeout=SUBPROCESS_TIMEOUT)
        assert proc.poll() is None
        before = listener.fields()[:ready]
        assert before and before[0] == {"STATUS": "starting: loading the model"}
        assert any("EXTEND_TIMEOUT_USEC" in f for f in before)
        ping = listener.wait(has("WATCHDOG", "1"), start=ready)
        proc.send_signal(signal.SIGTERM)
        stopping = listener.wait(has("STOPPING", "1"), start=ping)
        _, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    assert "SIGTERM received" in stderr and "Traceback" not in stderr, stderr
    # NotifyAccess=main: every message must come from the process systemd started.
    assert {m.pid for m in listener.messages} == {proc.pid}
    assert listener.messages[stopping].fields["STATUS"] == "stopping"
