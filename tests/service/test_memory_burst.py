"""Memory after a burst of client streams returns to its level before the burst.

A real ``streamer serve`` process on the tiny Whisper with Silero VAD; RSS is
its ``VmRSS``, read before, during and after a burst of 16 client streams.
Before the fix RSS stayed 20-40 % above its pre-burst level for good: glibc
kept the freed tensors of the burst's batches in its heaps (the engine now
gives them back when it goes idle after work: ``malloc_trim``), and every
stream loaded a Silero model of its own (they now share one). The bound is
the issue's: within 10 % of the pre-burst level, no absolute slack; measured
on 2 busy cores it comes back to within about 4 %.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from streamer.audio.vad import SileroVad
from streamer.testing.daemon import DaemonProcess, tiny_model_config

CLIP = Path(__file__).resolve().parents[1] / "data" / "audio" / "fleurs-en-004.ogg"
TIMEOUT = 120.0  # only a hang reaches it
BURST = 16  # client streams at once (the default max_streams)
REPEAT = 3  # each client sends the 4.3 s clip this many times (13 s of audio)
#: RSS after the burst may exceed RSS before it by this fraction (the issue's bound).
TOLERANCE = 0.10
#: How long after the burst memory may take to come back (the engine waits 1 s idle).
SETTLE_S = 20.0
RELEASES = "streamer_engine_memory_releases_total"


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def releases(port: int) -> float:
    """The daemon's count of idle memory releases, from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(RELEASES + " "):
                return float(line.split()[1])
    raise AssertionError(f"no {RELEASES} in /metrics")


def clip_pcm() -> bytes:
    audio, rate = sf.read(CLIP, dtype="float32")
    assert rate == 16000
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


async def stream(daemon: DaemonProcess, name: str, pcm: bytes) -> int:
    """One client: the clip in 0.2 s frames (throttled to 4x real time), stop, all finals."""
    url = daemon.url("/v1/stream")
    async with connect(url, max_size=None, open_timeout=TIMEOUT, ping_interval=None) as ws:
        await ws.send(json.dumps({"type": "start", "stream": name, "sample_rate": 16000}))
        assert json.loads(await ws.recv())["type"] == "ready"
        for i in range(0, len(pcm), 6400):
            await ws.send(pcm[i : i + 6400])
        await ws.send('{"type": "stop"}')
        with contextlib.suppress(ConnectionClosed):
            async for _ in ws:
                pass
    return ws.close_code or 0


async def released_since(daemon: DaemonProcess, count: float) -> float:
    """Wait until the idle engine gave memory back more than ``count`` times."""
    async with asyncio.timeout(TIMEOUT):
        while (now := await asyncio.to_thread(releases, daemon.port)) <= count:
            await asyncio.sleep(0.1)
    return now


async def test_rss_returns_to_its_pre_burst_level(
    tiny_whisper: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    config = tiny_model_config(
        tiny_whisper,
        "max_audio_rate = 4.0\nmax_streams = 16",
        "[admission]\nenabled = false",  # every client of the burst gets in
        vad=True,
    )
    daemon = DaemonProcess.start(tmp_path, config, cli_env)
    try:
        await daemon.wait_ready()
        pid, pcm = daemon.proc.pid, clip_pcm() * REPEAT
        assert await stream(daemon, "warm-up", pcm) == 1000  # first-use allocations
        count = await released_since(daemon, 0)  # the warm-up's memory went back
        before = rss_mib(pid)
        peak, done = before, asyncio.Event()

        async def watch() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, rss_mib(pid))
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch())
        codes = await asyncio.gather(*(stream(daemon, f"s{i}", pcm) for i in range(BURST)))
        done.set()
        await watcher
        assert codes == [1000] * BURST
        await released_since(daemon, count)
        after, deadline = rss_mib(pid), time.monotonic() + SETTLE_S
        while after > before * (1 + TOLERANCE) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            after = rss_mib(pid)
        print(f"daemon RSS MiB: before {before:.0f}, peak {peak:.0f}, after {after:.0f}")
        assert peak > before * (1 + TOLERANCE), "the burst did not allocate enough to tell"
        assert after <= before * (1 + TOLERANCE), (before, peak, after)
    finally:
        daemon.proc.terminate()
        await daemon.wait_exit()
    assert "Traceback" not in daemon.log, daemon.log


def test_streams_share_one_silero_model_with_the_same_probabilities() -> None:
    torch = pytest.importorskip("torch")
    from silero_vad import load_silero_vad

    audio, _ = sf.read(CLIP, dtype="float32")
    own = load_silero_vad()  # the wrapper, state kept inside (one model per stream)
    with torch.inference_mode():
        want = np.array(
            [
                float(own(torch.from_numpy(audio[i : i + 512].copy()), 16000).item())
                for i in range(0, len(audio) - 511, 512)
            ],
            dtype=np.float32,
        )
    vads = [SileroVad() for _ in range(3)]
    assert all(v._net is vads[0]._net for v in vads)  # one model's weights
    got: dict[int, np.ndarray] = {}

    def run(k: int) -> None:  # concurrently, as the VAD pool does, odd block sizes
        parts = [vads[k].process(audio[i : i + 3000 + k]) for i in range(0, len(audio), 3000 + k)]
        got[k] = np.concatenate(parts)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(vads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(len(vads)):
        np.testing.assert_array_equal(got[k], want)


#: glibc keeping freed memory: after a 16 MiB block is freed the mmap threshold
#: rises, so 8 MiB blocks come from a heap; freed below a live block at its top,
#: they stay resident until ``malloc_trim``. Printed: RSS MiB at start, after
#: the free, after ``release_freed_memory()``.
KEPT_HEAP = """
import threading
import numpy as np
from streamer.engine.core import release_freed_memory

def rss():
    with open("/proc/self/status") as status:
        return next(int(l.split()[1]) / 1024 for l in status if l.startswith("VmRSS:"))

kept = []
def work():
    big = np.ones(16 << 20, dtype=np.uint8)
    del big
    blocks = [np.ones(8 << 20, dtype=np.uint8) for _ in range(32)]
    kept.append(np.ones(1 << 20, dtype=np.uint8))
    del blocks

start = rss()
thread = threading.Thread(target=work)
thread.start()
thread.join()
freed = rss()
ok = release_freed_memory()
print(start, freed, rss(), ok)
"""


def test_release_freed_memory_returns_what_glibc_keeps() -> None:
    out = subprocess.run(
        [sys.executable, "-c", KEPT_HEAP], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert out.returncode == 0, out.stderr
    start, freed, released, ok = out.stdout.split()
    assert ok == "True"
    assert float(freed) - float(start) > 200, out.stdout  # 256 MiB freed, still resident
    assert float(released) - float(start) < 32, out.stdout  # given back
