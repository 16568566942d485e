"""The caption page (``GET /``) in a real headless Chromium against real servers.

Static files and their headers over plain HTTP; the page's display logic
against a :class:`CaptionServer` in the test's event loop (the test publishes
events, kills and restarts the server); the real daemon with a clip paced in
real time; the "Use my microphone" path with Chromium's fake capture device
playing a WAV into the page's AudioWorklet and on to ``/v1/stream``; and
the worklet's resampler alone, rendering a sine offline at 22.05/44.1/48 kHz.

WebDriver calls block, so they run in threads (``asyncio.to_thread``) while
the servers run in the test's loop. Without Chromium and chromedriver the
browser tests skip, except under CI (``CI`` set), where they fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import sys
import time
import unicodedata
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from websockets.asyncio.client import ClientConnection, connect

from streamer.sinks.caption_page import PAGE_FILES, add_page_routes
from streamer.sinks.fanout import Fanout
from streamer.sinks.websocket import AccessPolicy, CaptionServer
from streamer.testing.net import free_port
from streamer.types import Hypothesis

REPO = Path(__file__).resolve().parents[2]
WEB_DIR = REPO / "streamer" / "data" / "web"
TIMEOUT = 10.0  # page reactions: a WebSocket message, a reconnect
DAEMON_TIMEOUT = 60.0  # model load + a 4 s clip in real time on 2 busy cores

# -- the browser -------------------------------------------------------------------


def _find(env: str, *names: str) -> str | None:
    """``$env`` when set (None if not executable), else the first of ``names`` on PATH."""
    if os.environ.get(env):
        return shutil.which(os.environ[env])
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


def browser_paths() -> tuple[str, str]:
    """(chromium, chromedriver); skips (fails under CI) when either is missing."""
    chromium = _find("STREAMER_CHROMIUM", "chromium", "chromium-browser", "google-chrome")
    driver = _find("STREAMER_CHROMEDRIVER", "chromedriver")
    missing = [
        name for name, path in (("chromium", chromium), ("chromedriver", driver)) if not path
    ]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if missing:
        reason = (
            f"browser test needs {' and '.join(missing)} "
            "(Debian: apt-get install chromium chromium-driver; pip install selenium)"
        )
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    assert chromium and driver
    return chromium, driver


def _new_driver(extra_args: tuple[str, ...]) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1100,760",
        "--autoplay-policy=no-user-gesture-required",
        *extra_args,
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(TIMEOUT)
    return driver


BrowserFactory = Callable[..., Awaitable[Any]]


@pytest.fixture
async def browser() -> AsyncIterator[BrowserFactory]:
    """``await browser(*chromium_args)`` -> a WebDriver, quit after the test."""
    browser_paths()
    drivers: list[Any] = []

    async def make(*extra_args: str) -> Any:
        driver = await asyncio.to_thread(_new_driver, extra_args)
        drivers.append(driver)
        return driver

    yield make
    for driver in drivers:
        await asyncio.to_thread(driver.quit)


#: The page as the tests see it: status, and per stream its final lines and partial.
PAGE_STATE_JS = """
const status = document.getElementById("status");
const mic = document.getElementById("mic-status");
const out = {status: status.dataset.state, status_text: status.textContent,
             mic: mic.dataset.state, mic_text: mic.textContent, streams: {}};
for (const sec of document.querySelectorAll("section.stream")) {
  const p = sec.querySelector(".partial");
  out.streams[sec.dataset.stream] = {
    finals: Array.from(sec.querySelectorAll(".lines .final"), (e) => e.textContent),
    partial: p.hidden ? null : {
      committed: p.querySelector(".committed").textContent,
      tentative: p.querySelector(".tentative").textContent,
      seq: Number(p.dataset.seq), segment: Number(p.dataset.segment)},
  };
}
return out;
"""

#: Records every tentative text the page ever shows (partials can be short-lived).
RECORD_TENTATIVE_JS = """
window.__tentative = [];
new MutationObserver(() => {
  for (const t of document.querySelectorAll("section.stream .partial:not([hidden]) .tentative")) {
    const text = t.textContent;
    if (text && window.__tentative[window.__tentative.length - 1] !== text) {
      window.__tentative.push(text);
    }
  }
}).observe(document.getElementById("captions"),
           {subtree: true, childList: true, characterData: true, attributes: true});
"""


async def page_state(driver: Any) -> dict[str, Any]:
    state: dict[str, Any] = await asyncio.to_thread(driver.execute_script, PAGE_STATE_JS)
    return state


async def wait_page(
    driver: Any, predicate: Callable[[dict[str, Any]], bool], what: str, timeout: float = TIMEOUT
) -> dict[str, Any]:
    """Poll the page until ``predicate(state)``; fail with the last state seen."""
    deadline = time.monotonic() + timeout
    while True:
        state = await page_state(driver)
        if predicate(state):
            return state
        if time.monotonic() > deadline:
            pytest.fail(f"page never showed {what} within {timeout:.0f} s; last state: {state}")
        await asyncio.sleep(0.05)


async def save_screenshot(driver: Any, path: Path) -> None:
    """Save into ``path``; also into $STREAMER_SCREENSHOT_DIR when set (to look at)."""
    await asyncio.to_thread(driver.save_screenshot, str(path))
    print(f"screenshot: {path}")
    keep = os.environ.get("STREAMER_SCREENSHOT_DIR")
    if keep:
        shutil.copyfile(path, Path(keep) / path.name)


def severe_console_messages(driver: Any) -> list[str]:
    """Console errors (CSP violations, script errors) logged since the last call."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


# -- servers in the test's loop ----------------------------------------------------------


def ev(
    kind: str,
    stream: str,
    segment: int,
    seq: int,
    text: str,
    committed: str = "",
    run: str | None = None,
) -> Hypothesis:
    return Hypothesis(
        kind=kind,  # type: ignore[arg-type]
        stream=stream,
        segment=segment,
        seq=seq,
        text=text,
        committed=committed if kind == "partial" else "",
        tentative=text[len(committed) :] if kind == "partial" else "",
        start=float(segment),
        end=float(segment) + 0.5,
        lang="en",
        run=run,
    )


async def page_server(port: int = 0, **kwargs: Any) -> tuple[Fanout, CaptionServer]:
    fan = Fanout()
    server = CaptionServer(fan, "127.0.0.1", port, drain_timeout=2.0, **kwargs)
    add_page_routes(server)
    await server.start()
    return fan, server


@pytest.fixture
async def servers() -> AsyncIterator[list[CaptionServer]]:
    """Servers to close after the test, whatever happened."""
    started: list[CaptionServer] = []
    yield started
    for server in started:
        await server.close()


async def until(predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.01)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


def http_request(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


# -- a: static files ------------------------------------------------------------------------


async def test_page_files_served_with_security_headers(servers: list[CaptionServer]) -> None:
    _, server = await page_server()
    servers.append(server)
    port = server.port
    expected_types = {
        "/": "text/html; charset=utf-8",
        "/captions.js": "text/javascript; charset=utf-8",
        "/captions.css": "text/css; charset=utf-8",
        "/mic-worklet.js": "text/javascript; charset=utf-8",
    }
    assert set(PAGE_FILES) == set(expected_types)
    for path, content_type in expected_types.items():
        status, headers, body = await asyncio.to_thread(http_request, port, path)
        assert status == 200, path
        assert headers["content-type"] == content_type, path
        assert body == (WEB_DIR / PAGE_FILES[path][0]).read_bytes(), path
        assert int(headers["content-length"]) == len(body)
        assert headers["cache-control"] == "no-cache"
        assert headers["x-content-type-options"] == "nosniff"
        csp = [d.strip() for d in headers["content-security-policy"].split(";")]
        assert "default-src 'self'" in csp and "connect-src 'self' ws: wss:" in csp, csp
        assert "script-src 'self'" in csp and "object-src 'none'" in csp, csp
        assert "unsafe" not in headers["content-security-policy"]

    html = (WEB_DIR / "index.html").read_text(encoding="utf-8")
    # The CSP forbids inline script, so the page must not depend on any.
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), "inline <script>"
    assert not re.search(r"\son[a-z]+\s*=", html), "inline event handler attribute"
    assert not re.search(r"\sstyle\s*=", html), "inline style attribute"
    for name in ("index.html", "captions.js", "captions.css", "mic-worklet.js"):
        text = (WEB_DIR / name).read_text(encoding="utf-8")
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text), (
            f"external URL in {name}"
        )

    # The query string is ignored; anything not a page file is 404; GET only.
    status, _, _ = await asyncio.to_thread(http_request, port, "/captions.js?v=2")
    assert status == 200
    for path in ("/index.html", "/nope.js", "/web/captions.js", "/captions.js/"):
        status, _, _ = await asyncio.to_thread(http_request, port, path)
        assert status == 404, path
    status, headers, _ = await asyncio.to_thread(http_request, port, "/", "POST")
    assert status == 405 and headers["allow"] == "GET"
    # The probes still answer next to the page.
    status, _, body = await asyncio.to_thread(http_request, port, "/healthz")
    assert (status, body) == (200, b"ok\n")


# -- b: display logic, duplicates, reconnect ---------------------------------------------------


async def test_page_shows_partials_finals_and_reconnects(
    browser: BrowserFactory, servers: list[CaptionServer], tmp_path: Path
) -> None:
    fan, server = await page_server()
    servers.append(server)
    port = server.port
    driver = await browser()
    # ?streams= goes through to the subscription: "other" is filtered by the server.
    await asyncio.to_thread(driver.get, f"http://127.0.0.1:{port}/?streams=demo,x")
    await wait_page(driver, lambda s: s["status"] == "live", "status live")
    await until(lambda: fan.subscribers == 1, "the page's subscription")
    assert severe_console_messages(driver) == []  # no CSP violation, no script error

    fan.publish(ev("partial", "other", 0, 1, "not for this page"))
    fan.publish(ev("partial", "demo", 0, 1, "Hello there gen", committed="Hello there"))
    state = await wait_page(driver, lambda s: "demo" in s["streams"], "the demo panel")
    assert set(state["streams"]) == {"demo"}
    assert state["streams"]["demo"]["partial"] == {
        "committed": "Hello there",
        "tentative": " gen",
        "seq": 1,
        "segment": 0,
    }
    assert state["streams"]["demo"]["finals"] == []
    styles = await asyncio.to_thread(
        driver.execute_script,
        """
        const sec = document.querySelector('section.stream[data-stream="demo"]');
        const style = (sel) => getComputedStyle(sec.querySelector(sel));
        const c = style(".partial .committed"), t = style(".partial .tentative");
        return {c: [c.fontStyle, c.color], t: [t.fontStyle, t.color],
                live: document.getElementById("captions").getAttribute("aria-live")};
        """,
    )
    assert styles["c"][0] == "normal" and styles["t"][0] == "italic", styles
    assert styles["c"][1] != styles["t"][1], styles  # the tentative tail is greyed
    assert styles["live"] == "polite"
    await save_screenshot(driver, tmp_path / "caption_page_partial.png")

    # A later partial of the segment replaces the shown one.
    fan.publish(ev("partial", "demo", 0, 2, "Hello there, general Ke", committed="Hello there,"))
    await wait_page(
        driver,
        lambda s: (s["streams"]["demo"]["partial"] or {}).get("tentative") == " general Ke",
        "the second partial",
    )
    # The final replaces the partials of its segment.
    final = ev("final", "demo", 0, 3, "Hello there, general Kenobi.")
    fan.publish(final)
    state = await wait_page(
        driver, lambda s: s["streams"]["demo"]["finals"] != [], "the final line"
    )
    assert state["streams"]["demo"] == {"finals": ["Hello there, general Kenobi."], "partial": None}

    # Duplicates (seq already seen) change nothing; the marker after them
    # proves they were processed (one socket: in order).
    fan.publish(ev("partial", "demo", 0, 2, "Hello there, general Ke", committed="Hello there,"))
    fan.publish(final)
    fan.publish(ev("partial", "demo", 1, 4, "Marker", committed=""))
    state = await wait_page(
        driver, lambda s: s["streams"]["demo"]["partial"] is not None, "the marker partial"
    )
    assert state["streams"]["demo"]["finals"] == ["Hello there, general Kenobi."]
    assert state["streams"]["demo"]["partial"]["tentative"] == "Marker"
    assert state["streams"]["demo"]["partial"]["seq"] == 4

    # The server goes away (1001); the page says so and retries by itself.
    await server.close()
    await wait_page(driver, lambda s: s["status"] == "reconnecting", "status reconnecting")
    state = await page_state(driver)
    assert re.fullmatch(r"reconnecting in \d+ s — .+ \(1001\)", state["status_text"]), state
    fan2, server2 = await page_server(port)  # a restarted daemon on the same port
    servers.append(server2)
    await wait_page(driver, lambda s: s["status"] == "live", "status live again", timeout=15)
    await until(lambda: fan2.subscribers == 1, "the page's new subscription")
    # The restarted daemon numbers the stream from 1 again: the page notices
    # the numbering started over (different events under seen seqs) and shows them.
    fan2.publish(ev("partial", "demo", 0, 1, "After the restart", committed="After"))
    fan2.publish(ev("final", "demo", 0, 2, "After the restart."))
    state = await wait_page(
        driver, lambda s: len(s["streams"]["demo"]["finals"]) == 2, "the new final"
    )
    assert state["streams"]["demo"]["finals"] == [
        "Hello there, general Kenobi.",
        "After the restart.",
    ]
    assert state["streams"]["demo"]["partial"] is None


async def test_page_starts_segments_over_when_the_run_changes(
    browser: BrowserFactory, servers: list[CaptionServer]
) -> None:
    """A restarted daemon (a new ``run``) keeps ``seq`` rising but numbers segments
    from 0 again: the new run's partial of segment 0 is shown, not taken as stale."""
    fan, server = await page_server()
    servers.append(server)
    driver = await browser()
    await asyncio.to_thread(driver.get, f"http://127.0.0.1:{server.port}/")
    await wait_page(driver, lambda s: s["status"] == "live", "status live")
    await until(lambda: fan.subscribers == 1, "the page's subscription")
    fan.publish(ev("final", "demo", 0, 1, "Before the restart.", run="a" * 16))
    fan.publish(ev("partial", "demo", 0, 1001, "After it", committed="After", run="b" * 16))
    state = await wait_page(
        driver,
        lambda s: (s["streams"].get("demo") or {}).get("partial") is not None,
        "the new run's partial",
    )
    assert state["streams"]["demo"]["finals"] == ["Before the restart."]
    assert state["streams"]["demo"]["partial"]["seq"] == 1001


async def test_page_opened_late_shows_recent_finals_and_fills_a_gap_on_reconnect(
    browser: BrowserFactory, servers: list[CaptionServer], tmp_path: Path
) -> None:
    """The page asks for each stream's recent finals: opened late it shows what
    was said (not "Waiting for captions…"); back after an outage it adds the
    finals it missed, and none it already shows."""
    fan, server = await page_server()
    servers.append(server)
    port = server.port
    run = "c" * 16
    for i in range(25):  # more than the server keeps (20) and the page asks for
        fan.publish(ev("partial", "talk", i, 2 * i + 1, f"Sentence {i}", run=run))
        fan.publish(ev("final", "talk", i, 2 * i + 2, f"Sentence {i}.", run=run))
    fan.publish(ev("partial", "talk", 25, 51, "not speech", run=run))
    fan.publish(ev("final", "talk", 25, 52, "", run=run))  # retracts that partial
    fan.publish(ev("final", "other", 0, 7, "Another stream.", run=run))
    said = [f"Sentence {i}." for i in range(5, 25)]  # the last 20

    driver = await browser()
    await asyncio.to_thread(driver.get, f"http://127.0.0.1:{port}/")
    state = await wait_page(
        driver, lambda s: len((s["streams"].get("talk") or {}).get("finals", [])) == 20,
        "the recent finals",
    )  # fmt: skip
    assert state["streams"]["talk"] == {"finals": said, "partial": None}
    assert state["streams"]["other"]["finals"] == ["Another stream."]
    placeholder = await asyncio.to_thread(
        driver.execute_script, 'return document.getElementById("placeholder").hidden;'
    )
    assert placeholder is True
    await save_screenshot(driver, tmp_path / "caption_page_history.png")
    # Live events follow the replay.
    fan.publish(ev("final", "talk", 26, 53, "Live now.", run=run))
    state = await wait_page(
        driver, lambda s: s["streams"]["talk"]["finals"][-1:] == ["Live now."], "the live final"
    )
    assert state["streams"]["talk"]["finals"] == [*said, "Live now."]

    # The connection drops (the daemon keeps running: same fanout); a final is
    # published meanwhile; the page reconnects and gets the history again.
    await server.close()
    await wait_page(driver, lambda s: s["status"] == "reconnecting", "status reconnecting")
    fan.publish(ev("final", "talk", 27, 54, "Missed while away.", run=run))
    server2 = CaptionServer(fan, "127.0.0.1", port, drain_timeout=2.0)
    add_page_routes(server2)
    await server2.start()
    servers.append(server2)
    await until(lambda: fan.subscribers == 1, "the page's new subscription", timeout=15)
    fan.publish(ev("final", "talk", 28, 55, "Marker.", run=run))
    state = await wait_page(
        driver, lambda s: s["streams"]["talk"]["finals"][-1:] == ["Marker."], "the marker"
    )
    finals = state["streams"]["talk"]["finals"]
    assert finals == [*said, "Live now.", "Missed while away.", "Marker."], finals
    assert state["streams"]["other"]["finals"] == ["Another stream."]
    assert severe_console_messages(driver) == []


async def test_page_authenticates_with_its_token(
    browser: BrowserFactory, servers: list[CaptionServer]
) -> None:
    """The token from ``#token=`` or the form goes first; a refusal shows its reason."""
    fan, server = await page_server(access=AccessPolicy(token="s3cret"))
    servers.append(server)
    driver = await browser()
    url = f"http://127.0.0.1:{server.port}/?streams=demo#token=wrong"
    await asyncio.to_thread(driver.get, url)
    state = await wait_page(driver, lambda s: s["status"] == "error", "the auth error")
    assert "authentication failed (1008)" in state["status_text"], state
    assert fan.subscribers == 0

    # The form reconnects with the new token; no automatic retries in between.
    def enter_token() -> None:
        from selenium.webdriver.common.by import By

        field_ = driver.find_element(By.ID, "token")
        assert field_.get_attribute("value") == "wrong"  # taken from the fragment
        field_.clear()
        field_.send_keys("s3cret")
        driver.find_element(By.ID, "token-apply").click()

    await asyncio.to_thread(enter_token)
    await wait_page(driver, lambda s: s["status"] == "live", "status live")
    await until(lambda: fan.subscribers == 1, "the authenticated subscription")
    fan.publish(ev("final", "demo", 0, 1, "Authorised."))
    state = await wait_page(driver, lambda s: "demo" in s["streams"], "the final")
    assert state["streams"]["demo"]["finals"] == ["Authorised."]


#: Renders a 0.5-amplitude sine through the worklet offline at ``rate``; returns its chunks.
RENDER_WORKLET_JS = """
const [rate, seconds, freq, done] = arguments;
(async () => {
  const ctx = new OfflineAudioContext(1, Math.round(rate * seconds), rate);
  await ctx.audioWorklet.addModule("mic-worklet.js");
  const node = new AudioWorkletNode(ctx, "pcm16k-capture", {
    numberOfInputs: 1, numberOfOutputs: 1, outputChannelCount: [1], channelCount: 1,
    channelCountMode: "explicit", processorOptions: {targetRate: 16000, chunkMs: 100}});
  const chunks = [];
  const flushed = new Promise((resolve) => {
    node.port.onmessage = (e) => {
      if (e.data instanceof ArrayBuffer) chunks.push(e.data);
      else if (e.data.type === "flushed") resolve();
    };
  });
  const osc = new OscillatorNode(ctx, {frequency: freq});
  osc.connect(new GainNode(ctx, {gain: 0.5})).connect(node).connect(ctx.destination);
  osc.start(0);
  await ctx.startRendering();
  node.port.postMessage({type: "flush"});
  await flushed;
  const samples = [];
  for (const b of chunks) {
    const v = new DataView(b);
    for (let i = 0; i < b.byteLength; i += 2) samples.push(v.getInt16(i, true));
  }
  done({sizes: chunks.map((b) => b.byteLength), samples});
})().catch((e) => done({error: String(e)}));
"""


@pytest.mark.parametrize("rate", [44100, 48000, 22050])
async def test_worklet_resamples_to_16k_int16(
    browser: BrowserFactory, servers: list[CaptionServer], rate: int
) -> None:
    """The microphone worklet in Chromium: exact length, 100 ms chunks, the same sine at 16 kHz."""
    _, server = await page_server()
    servers.append(server)
    driver = await browser()
    await asyncio.to_thread(driver.get, f"http://127.0.0.1:{server.port}/")
    await asyncio.to_thread(driver.set_script_timeout, TIMEOUT)
    seconds, freq = 1.0, 440.0
    result = await asyncio.to_thread(
        driver.execute_async_script, RENDER_WORKLET_JS, rate, seconds, freq
    )
    assert "error" not in result, result
    sizes, got = result["sizes"], np.array(result["samples"], dtype=np.float64)
    # Every input sample counted once. The worklet sees whole 128-frame render
    # quanta (an offline context rounds its length up); the last output
    # sample may still be open.
    rendered = -(-round(rate * seconds) // 128) * 128
    assert len(got) in (rendered * 16000 // rate, rendered * 16000 // rate - 1), len(got)
    assert all(size == 3200 for size in sizes[:-1]) and 0 < sizes[-1] <= 3200, sizes
    # Output k is the mean of the input over [k r, (k+1) r) in input samples
    # (r = rate / 16000, fractional edges weighted): exact area averaging, so
    # a sample lost or counted twice at a quantum boundary shows as an error.
    ratio = rate / 16000
    k = np.arange(len(got))
    x = 0.5 * np.sin(2 * np.pi * freq * np.arange(rendered + 1) / rate)
    area = np.concatenate([[0.0], np.cumsum(x)])  # area[n] = integral over [0, n)

    def integral(t: Any) -> Any:
        n = np.floor(t).astype(int)
        return area[n] + x[n] * (t - n)

    expected = (integral((k + 1) * ratio) - integral(k * ratio)) / ratio * 32767
    error = np.abs(got - expected).max()
    # ... which is the 440 Hz sine at 16 kHz, delayed by half an input sample.
    sine = 0.5 * np.sin(2 * np.pi * freq * ((k + 0.5) * ratio - 0.5) / rate) * 32767
    deviation = np.abs(got - sine).max()
    print(f"{rate} Hz: {len(got)} samples, error {error:.1f}, off the sine {deviation:.1f}")
    assert error < 8, error  # int16 rounding and the oscillator's wavetable
    assert deviation < 0.01 * 32767, deviation


# -- c, d: the daemon ----------------------------------------------------------------------------


def clip_reference(audio_dir: Path, name: str) -> str:
    for line in (audio_dir / "manifest.jsonl").read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        if entry["path"] == name:
            return str(entry["text"])
    raise KeyError(name)


def word_error_rate(reference: str, hypothesis: str) -> float:
    import jiwer

    def norm(text: str) -> str:
        return " ".join(re.findall(r"[a-z0-9']+", unicodedata.normalize("NFKC", text).lower()))

    return float(jiwer.wer(norm(reference), norm(hypothesis)))


@dataclass
class Daemon:
    proc: asyncio.subprocess.Process
    port: int
    output: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    def log(self) -> str:
        return "".join(self.output)[-6000:]


@contextlib.asynccontextmanager
async def daemon(tmp_path: Path, env: dict[str, str], sources: str) -> AsyncIterator[Daemon]:
    """``python -m streamer serve`` (English, keep serving, console off) on a free port."""
    port = free_port()
    config = tmp_path / "serve.toml"
    config.write_text(
        f"""
{sources}

[model]
id = "builtin:whisper-base"
source_language = "en"
target_language = "en"

[streaming]
chunk_ms = 1000

[websocket]
host = "127.0.0.1"
port = {port}

[console]
enabled = false

[service]
keep_serving = true
""",
        encoding="utf-8",
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "streamer",
        "serve",
        "-c",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    d = Daemon(proc, port)

    async def collect() -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            d.output.append(line.decode("utf-8", "replace"))

    d.reader = asyncio.create_task(collect(), name="daemon-output")
    try:
        async with asyncio.timeout(30):
            while True:  # listening comes first, then the model loads
                if proc.returncode is not None:
                    pytest.fail(f"serve exited with {proc.returncode}\n{d.log()}")
                try:
                    status, _, _ = await asyncio.to_thread(http_request, port, "/healthz")
                except OSError:
                    await asyncio.sleep(0.1)
                    continue
                assert status == 200
                break
        status, _, _ = await asyncio.to_thread(http_request, port, "/")
        assert status == 200, "the daemon does not serve the caption page (add_page_routes)"
        yield d
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        d.reader.cancel()
        await asyncio.gather(d.reader, return_exceptions=True)


async def read_until_final(ws: ClientConnection, events: list[dict[str, Any]]) -> None:
    while not events or events[-1]["type"] != "final":
        message = await ws.recv()
        assert isinstance(message, str)
        events.append(json.loads(message))


@contextlib.contextmanager
def screenshot_on_failure(driver: Any, path: Path) -> Iterator[None]:
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            driver.save_screenshot(str(path))
        raise


CLIP = "fleurs-en-004.ogg"  # 4.3 s of English; partials before the final, one segment


@pytest.mark.slow
@pytest.mark.usefixtures("whisper_base_dir")
async def test_page_against_the_daemon(
    browser: BrowserFactory,
    tmp_path: Path,
    audio_dir: Path,
    cli_env: dict[str, str],
    wire_event: Callable[..., dict[str, Any]],
) -> None:
    sources = f"""
[[sources]]
type = "file"
stream = "clip"
path = "{audio_dir / CLIP}"
pace = "realtime"
"""
    driver = await browser()
    async with daemon(tmp_path, cli_env, sources) as d:
        await asyncio.to_thread(driver.get, f"http://127.0.0.1:{d.port}/")
        await asyncio.to_thread(driver.execute_script, RECORD_TENTATIVE_JS)
        async with connect(f"ws://127.0.0.1:{d.port}/v1/captions", open_timeout=10) as ws:
            await wait_page(driver, lambda s: s["status"] == "live", "status live")
            # Both subscribers are in before the model is even loaded.
            status, _, _ = await asyncio.to_thread(http_request, d.port, "/readyz")
            assert status == 503, "model loaded before the page subscribed: test would race"
            events: list[dict[str, Any]] = []
            with screenshot_on_failure(driver, tmp_path / "failure.png"):
                try:
                    async with asyncio.timeout(DAEMON_TIMEOUT):
                        await read_until_final(ws, events)
                except TimeoutError:
                    pytest.fail(f"no final within {DAEMON_TIMEOUT:.0f} s: {events}\n{d.log()}")
                for event in events:
                    wire_event(event)
                final = events[-1]
                partials = [e for e in events if e["type"] == "partial"]
                assert any(p["tentative"].strip() for p in partials), events
                assert final["stream"] == "clip" and final["text"].strip()
                state = await wait_page(
                    driver,
                    lambda s: bool(s["streams"].get("clip", {}).get("finals")),
                    "the clip's final",
                )
                seen_tentative = await asyncio.to_thread(
                    driver.execute_script, "return window.__tentative;"
                )
        await save_screenshot(driver, tmp_path / "caption_page.png")
    assert state["streams"]["clip"] == {"finals": [final["text"].strip()], "partial": None}
    # The page showed the partials' tentative tails as they came.
    assert seen_tentative, "the page never showed a tentative tail"
    assert set(seen_tentative) <= {p["tentative"] for p in partials}, (seen_tentative, partials)
    assert word_error_rate(clip_reference(audio_dir, CLIP), final["text"]) < 0.5, final


def fake_capture_wav(audio_dir: Path, name: str, path: Path) -> Path:
    """A 16-bit PCM WAV for Chromium's fake microphone: 1 s silence, the clip, 2 s silence."""
    import soxr

    audio, rate = sf.read(audio_dir / name, dtype="float32", always_2d=True)
    mono = audio.mean(axis=1)
    if rate != 48000:
        mono = soxr.resample(mono, rate, 48000)
        rate = 48000
    silence = np.zeros(rate, dtype=np.float32)
    sf.write(path, np.concatenate([silence, mono, silence, silence]), rate, subtype="PCM_16")
    return path


MIC_CLIP = "LDC93S1_timit_sample.wav"  # 2.9 s of English


@pytest.mark.slow
@pytest.mark.usefixtures("whisper_base_dir")
async def test_microphone_button_streams_to_the_daemon(
    browser: BrowserFactory,
    tmp_path: Path,
    audio_dir: Path,
    cli_env: dict[str, str],
) -> None:
    wav = fake_capture_wav(audio_dir, MIC_CLIP, tmp_path / "mic.wav")
    driver = await browser(
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}%noloop",
    )
    async with daemon(tmp_path, cli_env, "sources = []") as d:
        await asyncio.to_thread(driver.get, f"http://127.0.0.1:{d.port}/")
        await wait_page(driver, lambda s: s["status"] == "live", "status live")
        stream_id = await asyncio.to_thread(
            driver.execute_script, "return document.getElementById('mic-stream').value;"
        )
        assert re.fullmatch(r"browser-[a-z0-9]{4}", stream_id), stream_id
        async with connect(
            f"ws://127.0.0.1:{d.port}/v1/captions?streams={stream_id}&kinds=final",
            open_timeout=10,
        ) as ws:
            with screenshot_on_failure(driver, tmp_path / "failure.png"):
                # The ingest endpoint refuses streams until the model is loaded.
                async with asyncio.timeout(DAEMON_TIMEOUT):
                    while (await asyncio.to_thread(http_request, d.port, "/readyz"))[0] != 200:
                        await asyncio.sleep(0.2)

                def click_mic() -> None:
                    from selenium.webdriver.common.by import By

                    driver.find_element(By.TAG_NAME, "summary").click()
                    driver.find_element(By.ID, "mic").click()

                await asyncio.to_thread(click_mic)
                state = await wait_page(
                    driver, lambda s: s["mic"] in ("on", "error"), "the microphone streaming"
                )
                assert state["mic"] == "on", state
                print(f"microphone: {state['mic_text']}")
                events: list[dict[str, Any]] = []
                try:
                    async with asyncio.timeout(DAEMON_TIMEOUT):
                        await read_until_final(ws, events)
                except TimeoutError:
                    pytest.fail(f"no final from the browser's stream\n{d.log()}")
                final = events[-1]
                print(f"browser microphone final: {final}")
                assert final["stream"] == stream_id
                reference = clip_reference(audio_dir, MIC_CLIP)
                assert word_error_rate(reference, final["text"]) < 0.5, (reference, final)
                # The page shows its own stream's final like any other.
                await wait_page(
                    driver,
                    lambda s: (
                        final["text"].strip() in s["streams"].get(stream_id, {}).get("finals", [])
                    ),
                    "the browser stream's final",
                )
                await save_screenshot(driver, tmp_path / "caption_page_mic.png")
                # Stop: the server finalises and closes 1000; the button comes back.
                await asyncio.to_thread(
                    driver.execute_script, "document.getElementById('mic').click();"
                )
                state = await wait_page(
                    driver, lambda s: s["mic"] in ("idle", "error") and s["mic_text"], "stopped"
                )
                assert state["mic"] == "idle" and "finished" in state["mic_text"], state
