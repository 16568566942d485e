"""Faults a daemon on an edge GPU box meets, injected on CPU with the tiny Whisper.

Where the daemon must carry on (a step out of memory, a microphone that is
optional), it runs in this process (``App``) and the test checks the streams
and the probes. Where the exit code and stderr are the point (a device that
stays broken, a corrupt checkpoint, a missing device), it runs as
``python -c WRAPPER serve ...``: the wrapper patches torch/transformers the
way the fault would show up, then calls ``streamer.cli.main``, so nothing in
the product knows about tests. Every failing start is also checked against a
``$NOTIFY_SOCKET`` of our own: systemd must never hear ``READY=1`` from a
daemon that is going down.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import shutil
import socket
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers.models.whisper.modeling_whisper import WhisperDecoderLayer

from streamer.config import (
    Config,
    ConsoleConfig,
    JsonlConfig,
    ModelConfig,
    SourceConfig,
    StreamingConfig,
    VadConfig,
    WebSocketConfig,
)
from streamer.errors import EX_CONFIG
from streamer.service.app import App
from streamer.testing.net import free_port

AUDIO = Path(__file__).resolve().parents[1] / "data" / "audio"
TIMEOUT = 120.0  # only a hang reaches it: starts take seconds, 30 s on 2 very busy cores

#: What a CUDA fault looks like from Python: c10's message plus its advice lines.
CUDA_FAULT = (
    "CUDA error: an illegal memory access was encountered\n"
    "CUDA kernel errors might be asynchronously reported at some other API call, "
    "so the stacktrace below might be incorrect.\n"
    "For debugging consider passing CUDA_LAUNCH_BLOCKING=1\n"
    "Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.\n"
)
OOM = "CUDA out of memory. Tried to allocate 20.00 MiB (simulated)"
NO_SUCH_MIC = "no-such-mic-7f3a"
#: Whatever this machine has: no PortAudio, no input device at all, or a list of others.
MIC_PROBLEM = r"no audio input device|audio input device .*input devices: |PortAudio"

#: Runs the CLI after making every Whisper decoder pass raise ``{raise_}``. The fault
#: is in the decoder layers, which every engine path (batched, masked, alone) runs.
FAULTY_FORWARD = """
import sys
import torch
from transformers.models.whisper import modeling_whisper

def forward(self, *args, **kwargs):
    raise {raise_}

modeling_whisper.WhisperDecoderLayer.forward = forward
from streamer.cli import main
sys.exit(main(sys.argv[1:]))
"""
#: The CLI as it is.
PLAIN = "import sys\nfrom streamer.cli import main\nsys.exit(main(sys.argv[1:]))\n"


def probe(port: int, path: str) -> int | None:
    """HTTP status of ``GET path``, or None when nothing listens."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


# ----------------------------------------------------------------- in process


def two_file_sources(model: Path, jsonl: Path) -> Config:
    return Config(
        model=ModelConfig(id=str(model), device="cpu", source_language="en", target_language="en"),
        streaming=dataclasses.replace(
            StreamingConfig(), chunk_ms=500, max_tokens_per_second=3.0, min_tokens=2
        ),
        vad=VadConfig(backend="silero"),
        sources=(
            SourceConfig(type="file", stream="a", path=str(AUDIO / "jfk.flac"), pace="fast"),
            SourceConfig(
                type="file", stream="b", path=str(AUDIO / "fleurs-en-004.ogg"), pace="fast"
            ),
        ),
        websocket=WebSocketConfig(port=0),
        console=ConsoleConfig(enabled=False),
        jsonl=JsonlConfig(path=str(jsonl)),
    )


@contextlib.asynccontextmanager
async def serving(cfg: Config) -> AsyncIterator[tuple[App, asyncio.Task[int]]]:
    """The daemon in this process, ready; stopped (if still running) on the way out."""
    app = App(cfg, keep_serving=True)
    task = asyncio.create_task(app.run(), name="app")
    async with asyncio.timeout(TIMEOUT):
        while not app.ready or app.factory is None:
            assert not task.done(), task.exception()
            await asyncio.sleep(0.02)
    try:
        yield app, task
    finally:
        app.request_stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, TIMEOUT)


async def test_out_of_memory_fails_that_step_and_every_stream_goes_on(
    tiny_whisper: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    real_forward = WhisperDecoderLayer.forward
    calls = 0

    def forward(self: WhisperDecoderLayer, *args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 3:  # the second decoder pass: the first decode step after a prefill
            raise torch.OutOfMemoryError(OOM)
        return real_forward(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(WhisperDecoderLayer, "forward", forward)
    jsonl = tmp_path / "events.jsonl"
    async with serving(two_file_sources(tiny_whisper, jsonl)) as (app, task):
        assert app.factory is not None and app.engine is not None and app.server is not None
        runners = dict(app.factory.runners)
        assert sorted(runners) == ["a", "b"]
        for runner in runners.values():
            assert await runner.wait_done(TIMEOUT), runner.stream
        # The windows of the failed step (one per stream at most) get an error result,
        # nothing else does; a stream may already have dropped that window for a final.
        oom = [r for r in caplog.records if r.getMessage().startswith("out of memory")]
        hit = [str(r.args[0]) for r in oom if isinstance(r.args, tuple)]  # the stream
        assert hit and set(hit) <= {"a", "b"} and len(hit) == len(set(hit)), caplog.messages
        assert app.engine.stats.failed == len(hit)
        failed = {name: r.session.failed_windows for name, r in runners.items()}
        assert all(failed[name] <= (name in hit) for name in failed), (failed, hit)
        assert app.engine.fatal is None and app.ready and not task.done()
        port = app.server.port
        assert await asyncio.to_thread(probe, port, "/readyz") == 200
        assert await asyncio.to_thread(probe, port, "/healthz") == 200
        app.request_stop()
        assert await asyncio.wait_for(task, TIMEOUT) == 0
    events = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    finals = {e["stream"] for e in events if e["type"] == "final"}
    assert finals == {"a", "b"}, events  # streams that lost a window kept captioning
    assert calls > 3  # decoding went on after the fault


async def test_optional_microphone_missing_the_daemon_serves_without_it(
    tiny_whisper: Path, tmp_path: Path
) -> None:
    jsonl = tmp_path / "events.jsonl"
    cfg = Config(
        model=ModelConfig(
            id=str(tiny_whisper), device="cpu", source_language="en", target_language="en"
        ),
        sources=(
            SourceConfig(type="microphone", stream="mic", device=NO_SUCH_MIC, required=False),
        ),
        websocket=WebSocketConfig(port=0),
        console=ConsoleConfig(enabled=False),
        jsonl=JsonlConfig(path=str(jsonl)),
    )
    async with serving(cfg) as (app, task):
        assert app.server is not None
        assert await asyncio.to_thread(probe, app.server.port, "/readyz") == 200
        app.request_stop()
        assert await asyncio.wait_for(task, TIMEOUT) == 0
    events = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    lost = [e for e in events if e["type"] == "source_lost"]
    assert len(lost) == 1 and lost[0]["stream"] == "mic", events
    assert re.search(MIC_PROBLEM, lost[0]["text"]), lost


# ----------------------------------------------------------------- subprocess


@dataclass
class Exited:
    code: int
    stderr: str
    readyz: set[int | None]  # every status the probe saw while the process ran
    notified: list[str]  # sd_notify datagrams

    @property
    def lines(self) -> list[str]:
        return self.stderr.splitlines()

    def check_one_line_error(self, pattern: str) -> str:
        """Exactly one stderr line matches; no traceback anywhere; returns that line."""
        assert "Traceback" not in self.stderr, self.stderr
        hits = [line for line in self.lines if re.search(pattern, line)]
        assert len(hits) == 1, (pattern, self.stderr)
        return hits[0]


@contextlib.contextmanager
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """An AF_UNIX datagram socket standing in for systemd's (short path: 108-byte limit)."""
    folder = tempfile.mkdtemp(prefix="sdn")
    path = f"{folder}/notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(path)
        sock.setblocking(False)
        yield sock, path
    finally:
        sock.close()
        shutil.rmtree(folder, ignore_errors=True)


def drain(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(65536).decode("utf-8", "replace"))
        except BlockingIOError:
            return out


async def run_serve(
    script: str, config: Path, port: int, env: dict[str, str], *args: str
) -> Exited:
    """Run ``python -c script serve -c config`` to its exit, probing /readyz meanwhile."""
    with notify_socket() as (sock, path):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, "serve", "-c", str(config), *args,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            env={**env, "NOTIFY_SOCKET": path},
        )  # fmt: skip
        seen: set[int | None] = set()

        async def poll() -> None:
            while True:
                seen.add(await asyncio.to_thread(probe, port, "/readyz"))
                await asyncio.sleep(0.02)

        poller = asyncio.create_task(poll())
        try:
            async with asyncio.timeout(TIMEOUT):
                assert proc.stderr is not None
                stderr = (await proc.stderr.read()).decode("utf-8", "replace")
                code = await proc.wait()
        finally:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        return Exited(code, stderr, seen, drain(sock))


FILE_SOURCE = f'''
[[sources]]
type = "file"
stream = "jfk"
path = "{AUDIO / "jfk.flac"}"
pace = "fast"
'''
MIC_SOURCE = f'''
[[sources]]
type = "microphone"
stream = "mic"
device = "{NO_SUCH_MIC}"
'''


def write_config(
    tmp_path: Path, model: Path, port: int, device: str = "cpu", source: str = FILE_SOURCE
) -> Path:
    config = tmp_path / "serve.toml"
    config.write_text(
        f"""
[model]
id = "{model}"
device = "{device}"
source_language = "en"
target_language = "en"

[streaming]
chunk_ms = 500
max_tokens_per_second = 3.0
min_tokens = 2
max_segment_s = 2.0

[vad]
enabled = false

{source}
[websocket]
host = "127.0.0.1"
port = {port}

[console]
enabled = false
""",
        encoding="utf-8",
    )
    return config


def never_ready(run: Exited) -> None:
    """systemd never heard READY=1, and /readyz never answered 200."""
    assert not any("READY=1" in m.splitlines() for m in run.notified), run.notified
    assert 200 not in run.readyz, run.readyz


async def test_out_of_memory_on_every_window_exits_non_zero(
    tiny_whisper: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    # --keep-serving: the daemon would serve forever; only the fault can end it.
    port = free_port()
    config = write_config(tmp_path, tiny_whisper, port)
    script = FAULTY_FORWARD.format(raise_=f"torch.OutOfMemoryError({OOM!r})")
    run = await run_serve(script, config, port, cli_env, "--keep-serving")
    assert run.code == 1, run.stderr
    line = run.check_one_line_error(r"engine failure, stopping:")
    assert "5 consecutive out-of-memory errors" in line and "CUDA out of memory" in line, line
    skipped = [line for line in run.lines if "out of memory decoding stream jfk" in line]
    assert len(skipped) == 5, run.stderr


@pytest.mark.parametrize(
    "raise_",
    [f"torch.AcceleratorError({CUDA_FAULT!r})", f"RuntimeError({CUDA_FAULT!r})"],
    ids=["AcceleratorError", "RuntimeError"],  # torch < 2.8 raised a plain RuntimeError
)
async def test_cuda_fault_exits_non_zero_saying_why_in_one_line(
    raise_: str, tiny_whisper: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    port = free_port()
    config = write_config(tmp_path, tiny_whisper, port)
    run = await run_serve(FAULTY_FORWARD.format(raise_=raise_), config, port, cli_env,
                          "--keep-serving")  # fmt: skip
    assert run.code == 1, run.stderr
    line = run.check_one_line_error(r"engine failure, stopping:")
    assert line.endswith("CUDA error: an illegal memory access was encountered"), line
    assert "asynchronously reported" not in run.stderr, run.stderr  # the advice lines stay out
    assert sum("decoding failed" in line for line in run.lines) == 0, run.stderr


def corrupt_checkpoint(good: Path, folder: Path, fault: str) -> Path:
    shutil.copytree(good, folder)
    if fault == "config-garbage":
        (folder / "config.json").write_text("{model_type: whisper,", encoding="utf-8")
    elif fault == "no-weights":
        (folder / "model.safetensors").unlink()
    elif fault == "truncated-weights":
        weights = folder / "model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    else:
        raise AssertionError(fault)
    return folder


@pytest.mark.parametrize(
    ("fault", "problem"),
    [
        ("config-garbage", r"config\.json.* not a valid JSON"),
        ("no-weights", r"no file named model\.safetensors"),
        ("truncated-weights", r"deserializing header|incomplete|truncat"),
    ],
)
async def test_corrupt_checkpoint_exits_non_zero_and_is_never_ready(
    fault: str, problem: str, tiny_whisper: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    folder = corrupt_checkpoint(tiny_whisper, tmp_path / f"broken-{fault}", fault)
    port = free_port()
    run = await run_serve(PLAIN, write_config(tmp_path, folder, port), port, cli_env)
    assert run.code == 1, run.stderr
    line = run.check_one_line_error(r"^streamer: error:")
    assert line.startswith(f"streamer: error: cannot load '{folder}': "), line
    assert re.search(problem, line), line
    assert run.lines[-1] == line  # the last word
    never_ready(run)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
async def test_missing_cuda_device_exits_non_zero_in_one_line(
    tiny_whisper: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    # Exit 1, not 78: under systemd, Restart=on-failure retries, which helps when the
    # driver comes up after the service (78 is for configs that restarts cannot fix).
    port = free_port()
    config = write_config(tmp_path, tiny_whisper, port, device="cuda:0")
    run = await run_serve(PLAIN, config, port, cli_env)
    assert run.code == 1, run.stderr
    line = run.check_one_line_error(r"^streamer: error:")
    assert line == "streamer: error: model.device = 'cuda:0' but no CUDA device is available"
    never_ready(run)


async def test_required_microphone_missing_exits_78_before_ready(
    tiny_whisper: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    port = free_port()
    config = write_config(tmp_path, tiny_whisper, port, source=MIC_SOURCE)
    run = await run_serve(PLAIN, config, port, cli_env)
    assert run.code == EX_CONFIG, run.stderr
    line = run.check_one_line_error(MIC_PROBLEM)
    assert line.startswith("streamer: error: "), line
    # neither systemd (READY=1) nor /readyz: ready means the engine runs and every
    # source is open, and the microphone never opened
    never_ready(run)
