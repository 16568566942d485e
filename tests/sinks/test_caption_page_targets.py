"""The caption page's language picker, in a real headless Chromium.

The page learns the daemon's translation targets from its ``index.html``,
offers "Source" and each target, and subscribes with ``targets=`` for the
chosen one: the recent finals and the live events of that language only,
the choice kept in the page's URL.
"""

from __future__ import annotations

import asyncio
from typing import Any

from streamer.sinks.caption_page import add_page_routes
from streamer.sinks.fanout import Fanout
from streamer.sinks.websocket import CaptionServer
from streamer.types import Hypothesis

from .test_caption_page import (  # noqa: F401 - browser is a fixture
    BrowserFactory,
    browser,
    http_request,
    severe_console_messages,
    until,
    wait_page,
)

PICKER_JS = """
const select = document.getElementById("language");
return {hidden: document.getElementById("language-picker").hidden, value: select.value,
        options: Array.from(select.options, (o) => [o.value, o.textContent]),
        search: location.search};
"""


def final(seq: int, text: str, target: str | None = None, segment: int = 0) -> Hypothesis:
    return Hypothesis(
        "final", "demo", segment, seq, text, float(segment), segment + 1.0, lang="en", target=target
    )


async def started(targets: tuple[str, ...]) -> tuple[Fanout, CaptionServer]:
    fan = Fanout()
    server = CaptionServer(fan, "127.0.0.1", 0, drain_timeout=2.0)
    add_page_routes(server, targets=targets)
    await server.start()
    return fan, server


def finals(state: dict[str, Any]) -> list[str]:
    return list((state["streams"].get("demo") or {}).get("finals", []))


async def picker(driver: Any) -> dict[str, Any]:
    result: dict[str, Any] = await asyncio.to_thread(driver.execute_script, PICKER_JS)
    return result


async def test_the_viewer_picks_a_language(browser: BrowserFactory) -> None:  # noqa: F811
    fan, server = await started(("de", "fr"))
    plain_fan, plain = await started(())
    try:
        _, _, page = await asyncio.to_thread(http_request, server.port, "/")
        assert b'<meta name="streamer-targets" content="de,fr">' in page
        fan.publish(final(1, "Hello.", segment=0))
        fan.publish(final(2, "Hallo.", "de", segment=0))
        driver = await browser()
        await asyncio.to_thread(driver.get, f"http://127.0.0.1:{server.port}/")
        state = await wait_page(driver, lambda s: finals(s) == ["Hello."], "the source's final")
        assert await picker(driver) == {
            "hidden": False,
            "value": "",
            "options": [["", "Source"], ["de", "de"], ["fr", "fr"]],
            "search": "",
        }

        # Pick German: the page starts afresh with German's recent finals and live events.
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import Select

        element = await asyncio.to_thread(driver.find_element, By.ID, "language")
        await asyncio.to_thread(Select(element).select_by_value, "de")
        await wait_page(driver, lambda s: finals(s) == ["Hallo."], "the German history")
        await until(lambda: fan.subscribers == 1, "the old subscription gone")
        fan.publish(final(3, "Goodbye.", segment=1))
        fan.publish(final(4, "Auf Wiedersehen.", "de", segment=1))
        fan.publish(final(5, "Au revoir.", "fr", segment=1))
        state = await wait_page(driver, lambda s: len(finals(s)) == 2, "the live German final")
        assert finals(state) == ["Hallo.", "Auf Wiedersehen."]
        assert (await picker(driver))["search"] == "?target=de"

        # The choice is in the URL: a reload (or a shared link) shows French.
        await asyncio.to_thread(driver.get, f"http://127.0.0.1:{server.port}/?target=fr")
        await wait_page(driver, lambda s: finals(s) == ["Au revoir."], "the French history")
        assert (await picker(driver))["value"] == "fr"
        assert severe_console_messages(driver) == []

        # A daemon without targets shows no picker; an unknown ?target= means the source.
        await asyncio.to_thread(driver.get, f"http://127.0.0.1:{plain.port}/?target=de")
        await until(lambda: plain_fan.subscribers == 1, "the plain page's subscription")
        plain_fan.publish(final(1, "Only the source."))
        await wait_page(driver, lambda s: finals(s) == ["Only the source."], "the source")
        assert (await picker(driver))["hidden"] is True
    finally:
        await server.close()
        await plain.close()
