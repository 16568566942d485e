"""The caption page's microphone resumes its stream when its daemon dies.

A real headless Chromium (its fake capture device plays a clip in real time)
streams through the page to a real daemon on the tiny Whisper (VAD off, one
final per second of audio). The daemon is SIGKILLed mid-stream and a new one
(another run, no shared state) starts on the same port, as a restarted box
or a balancer's other daemon would: the page reconnects by itself with
``resume`` and the stream goes on. Caption subscribers on each daemon see
one stream: finals that tile the audio, ``seq`` rising across the daemons.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect

from streamer.testing.daemon import DaemonProcess, tiny_model_config
from streamer.testing.net import free_port

from .test_caption_page import (  # noqa: F401 - browser is a fixture
    BrowserFactory,
    browser,
    fake_capture_wav,
    http_request,
    save_screenshot,
    screenshot_on_failure,
    wait_page,
)

CLIP = "fleurs-fr-003.ogg"  # 10 s: finals before the kill and after the resume
TIMEOUT = 60.0


def start_daemon(
    tmp_path: Path, name: str, model: Path, env: dict[str, str], port: int
) -> DaemonProcess:
    extra = f'[service]\nstate_dir = "{tmp_path / name / "state"}"\n'
    config = tiny_model_config(model, "", extra, streaming="max_segment_s = 1.0")
    return DaemonProcess.start(tmp_path / name, config, env, port)


async def subscribe(port: int, stream: str, into: list[dict[str, Any]]) -> None:
    """Finals of ``stream`` on the daemon at ``port`` until it goes away."""
    url = f"ws://127.0.0.1:{port}/v1/captions?streams={stream}&kinds=final"
    async with asyncio.timeout(TIMEOUT):
        while True:  # the daemon listens before its model loads
            try:
                status, _, _ = await asyncio.to_thread(http_request, port, "/healthz")
            except OSError:
                await asyncio.sleep(0.05)
                continue
            if status == 200:
                break
    with contextlib.suppress(Exception):
        async with connect(url, open_timeout=10) as ws:
            async for message in ws:
                into.append(json.loads(message))


async def test_microphone_resumes_on_a_new_daemon(
    browser: BrowserFactory,  # noqa: F811
    tmp_path: Path,
    audio_dir: Path,
    cli_env: dict[str, str],
    tiny_whisper: Path,
) -> None:
    wav = fake_capture_wav(audio_dir, CLIP, tmp_path / "mic.wav")
    driver = await browser(
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}%noloop",
    )
    port = free_port()
    old = start_daemon(tmp_path, "old", tiny_whisper, cli_env, port)
    new: DaemonProcess | None = None
    before: list[dict[str, Any]] = []
    after: list[dict[str, Any]] = []
    readers: list[asyncio.Task[None]] = []
    try:
        await old.wait_ready(TIMEOUT)
        await asyncio.to_thread(driver.get, f"http://127.0.0.1:{port}/")
        await wait_page(driver, lambda s: s["status"] == "live", "status live")
        stream = await asyncio.to_thread(
            driver.execute_script, "return document.getElementById('mic-stream').value;"
        )
        readers.append(asyncio.create_task(subscribe(port, stream, before)))
        with screenshot_on_failure(driver, tmp_path / "failure.png"):

            def click_mic() -> None:
                from selenium.webdriver.common.by import By

                driver.find_element(By.TAG_NAME, "summary").click()
                driver.find_element(By.ID, "mic").click()

            await asyncio.to_thread(click_mic)

            def shown(state: dict[str, Any], count: int) -> bool:
                return len(state["streams"].get(stream, {}).get("finals", [])) >= count

            # Two finals, on the page too; the next one is a second of audio away.
            await wait_page(driver, lambda s: len(before) >= 2 and shown(s, len(before)),
                            "two finals", TIMEOUT)  # fmt: skip
            old.signal(signal.SIGKILL)
            assert await old.wait_exit() == -signal.SIGKILL
            new = start_daemon(tmp_path, "new", tiny_whisper, cli_env, port)
            readers.append(asyncio.create_task(subscribe(port, stream, after)))
            await new.wait_ready(TIMEOUT)  # (fails with its log if it dies)
            state = await wait_page(
                driver, lambda s: s["mic"] == "on" and "resumed" in s["mic_text"],
                "the stream resumed", TIMEOUT,
            )  # fmt: skip
            await wait_page(driver, lambda s: len(after) >= 2, "finals after the resume", TIMEOUT)
            await save_screenshot(driver, tmp_path / "caption_page_resumed.png")
            await asyncio.to_thread(
                driver.execute_script, "document.getElementById('mic').click();"
            )
            state = await wait_page(
                driver, lambda s: s["mic"] in ("idle", "error") and bool(s["mic_text"]),
                "stopped", TIMEOUT,
            )  # fmt: skip
            assert state["mic"] == "idle" and "finished" in state["mic_text"], state
    finally:
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        for daemon in (old, new):
            if daemon is not None:
                daemon.kill()
    finals = before + after
    assert len({e["run"] for e in before}) == len({e["run"] for e in after}) == 1
    assert before[0]["run"] != after[0]["run"]
    assert finals[0]["start"] == 0.0, finals
    for a, b in itertools.pairwise(finals):
        assert b["start"] == a["end"], (a, b)  # contiguous: no gap, no overlap
        assert b["seq"] > a["seq"], (a, b)
    texts = [e["text"].strip() for e in finals if e["text"].strip()]
    page = await wait_page(driver, lambda s: len(s["streams"][stream]["finals"]) >= len(texts),
                           "every final on the page")  # fmt: skip
    assert page["streams"][stream]["finals"] == texts
    for daemon in (old, new):
        assert daemon is not None and "Traceback" not in daemon.log, daemon.log
