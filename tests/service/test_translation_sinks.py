"""Translation targets reach the sinks that ask for them, and no other.

One daemon on the tiny models (random Whisper, random mBART-50) with two
targets, a real Mosquitto, caption subscribers with and without ``targets``,
and a Wyoming client: each target's finals arrive on its MQTT topic and on
the caption sockets that asked for it; source subscribers, the source MQTT
topics and the Wyoming transcript see the source only. ``streamer
transcribe`` with two targets writes one output per language.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from streamer import cli
from streamer.config import MqttConfig, WyomingConfig
from streamer.testing.mosquitto import Mosquitto
from streamer.testing.net import free_port
from streamer.testing.tiny_translation import make_mbart50
from streamer.types import Hypothesis

from ..sinks.test_mqtt import Recorder
from .test_ingest import stream_clip, subscribed, ws_url
from .test_translation_daemon import translating
from .test_wyoming import AUDIO, read_until, send_request, streams_ended, wyoming_client
from .test_wyoming import pcm as wyoming_pcm

TIMEOUT = 60.0
TARGETS = ("de", "fr")


@pytest.fixture(scope="module")
def tiny_mbart50(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_mbart50(tmp_path_factory.mktemp("mt") / "mbart50")


def language(event: dict[str, Any]) -> str | None:
    return event.get("target")


def finals_by_language(events: list[dict[str, Any]]) -> dict[str | None, list[dict[str, Any]]]:
    out: dict[str | None, list[dict[str, Any]]] = {}
    for event in events:
        if event["type"] == "final":
            out.setdefault(language(event), []).append(event)
    return out


def marker(target: str | None) -> Hypothesis:
    """A final of a stream of its own: once a subscriber has it, it has all before it."""
    return Hypothesis("final", "marker", 0, 1, f"marker {target}", 0.0, 1.0, target=target)


async def read_to_markers(ws: ClientConnection, languages: set[str | None]) -> list[dict[str, Any]]:
    """Events up to the markers of ``languages`` (each subscriber's fanout queue is in order)."""
    out: list[dict[str, Any]] = []
    waiting = set(languages)
    async with asyncio.timeout(TIMEOUT):
        while waiting:
            event = json.loads(await ws.recv())
            if event["stream"] == "marker":
                waiting.discard(language(event))
            else:
                out.append(event)
    return out


async def test_each_target_reaches_its_sinks_and_only_those(
    tiny_whisper: Path, tiny_mbart50: Path, mosquitto_factory: Any
) -> None:
    broker: Mosquitto = mosquitto_factory()
    cfg = translating(tiny_whisper, tiny_mbart50, targets=",".join(TARGETS))
    mqtt = MqttConfig(enabled=True, host="127.0.0.1", port=broker.port, client_id="translating",
                      reconnect_min_s=0.1, reconnect_max_s=0.5)  # fmt: skip
    cfg = dataclasses.replace(cfg, mqtt=mqtt, wyoming=WyomingConfig(enabled=True, port=free_port()))
    async with Recorder(broker.port) as rec, running_app(cfg) as app:
        await rec.wait_for(lambda: rec.statuses()[-1:] == [b"online"], "status online")
        base = app.fanout.subscribers  # the MQTT sink's
        url = ws_url(app, "/v1/captions")
        async with (
            connect(url) as source,
            connect(url + "?targets=de") as de,
            connect(url + "?targets=source,fr&kinds=final") as source_fr,
        ):
            await subscribed(app, base + 3)
            own = await stream_clip(app, "alice")  # the /v1/stream client gets every language
            want = finals_by_language(own)
            assert set(want) == {None, *TARGETS}, want.keys()
            for target in (None, *TARGETS):
                app.fanout.publish(marker(target))
            got_source = await read_to_markers(source, {None})
            got_de = await read_to_markers(de, {"de"})
            got_source_fr = await read_to_markers(source_fr, {None, "fr"})
        assert {language(e) for e in got_source} == {None}  # no target event at all
        assert finals_by_language(got_source) == {None: want[None]}
        assert {language(e) for e in got_de} == {"de"}
        assert finals_by_language(got_de) == {"de": want["de"]}
        assert finals_by_language(got_source_fr) == {None: want[None], "fr": want["fr"]}
        assert {e["type"] for e in got_source_fr} == {"final"}

        # History per (stream, target): the last final of each language asked for.
        async with connect(url + "?streams=alice&history=1&targets=de") as late:
            replay = json.loads(await late.recv())
        assert replay == {**want["de"][-1], "replay": True}
        async with connect(url + "?streams=alice&history=1&targets=*") as late:
            replays = [json.loads(await late.recv()) for _ in range(3)]
        assert sorted(r["seq"] for r in replays) == sorted(f[-1]["seq"] for f in want.values())

        # MQTT: each target's finals on its own topic (QoS 1), the source's unchanged.
        def on(topic: str) -> list[dict[str, Any]]:
            return [json.loads(m.payload) for m in rec.on(topic)]

        await rec.wait_for(
            lambda: all(len(on(f"streamer/alice/{t}/final")) >= len(want[t]) for t in TARGETS),
            "the targets' finals on MQTT",
        )
        assert on("streamer/alice/final") == want[None]
        for target in TARGETS:
            assert on(f"streamer/alice/{target}/final") == want[target]
            assert {m.qos for m in rec.on(f"streamer/alice/{target}/final")} == {1}
            for message in rec.on(f"streamer/alice/{target}/partial"):  # if the model made any
                assert message.qos == 0 and json.loads(message.payload)["target"] == target
        assert not [e for e in on("streamer/alice/partial") if "target" in e]

        # Wyoming (like Realtime, a one-language client of its own stream): the source only.
        everything = app.fanout.subscribe(kinds={"final"}, targets=None)
        async with wyoming_client(app) as client:
            data = wyoming_pcm(AUDIO / "jfk.flac", 16000, 2, 1, seconds=0.5)
            await send_request(client, data, 16000, 2, 1, language="en")
            events = await read_until(client, "transcript-stop")
        chunks = "".join(e.data["text"] for e in events if e.type == "transcript-chunk")
        transcript = next(e.data["text"] for e in events if e.type == "transcript")
        await streams_ended(app)  # its translations published too
        published: dict[str | None, list[str]] = {}
        while everything.pending:
            event = everything.get_nowait()
            if event.stream.startswith("wyoming-"):
                published.setdefault(event.target, []).append(event.text)
        source_text = " ".join(t for t in published.get(None, []) if t)
        assert transcript == chunks == source_text and transcript
        assert set(published) == {None, *TARGETS}  # it was translated, for the other sinks


def running_app(cfg: Any) -> Any:
    from streamer.testing.daemon import running_app as run

    return run(cfg, TIMEOUT)


def test_transcribe_writes_one_output_per_target(
    tiny_whisper: Path, tiny_mbart50: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--target-language de,fr`` with a translation model: targets, not the speech model's."""
    clip = AUDIO / "jfk.flac"
    args = ["transcribe", "--model", str(tiny_whisper), "--device", "cpu",
            "--source-language", "en", "--translation-model", str(tiny_mbart50),
            "--target-language", "de,fr", "--set", "vad.backend=\"silero\""]  # fmt: skip
    assert cli.main([*args, str(clip)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    by_language = finals_by_language(lines)
    assert set(by_language) == {None, *TARGETS}, lines
    for target in TARGETS:  # one translation per source final, same times
        spans = [(e["start"], e["end"]) for e in by_language[target]]
        assert spans == [(e["start"], e["end"]) for e in by_language[None]]
    assert all(e["file"] == str(clip) for e in lines)

    out = tmp_path / "subs"
    out.mkdir()
    assert cli.main([*args, "--format", "srt", "-o", str(out), str(clip)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["jfk.de.srt", "jfk.fr.srt", "jfk.srt"]
    assert all(p.read_text(encoding="utf-8").startswith("1\n") for p in out.iterdir())
    # One language per srt/vtt/text: with targets, -o must be a folder.
    assert cli.main([*args, "--format", "text", str(clip)]) == 78
    assert "must name a folder" in capsys.readouterr().err
    # Without a translation model a list is an error; one code stays the speech model's.
    plain = [a for a in args if a not in ("--translation-model", str(tiny_mbart50))]
    assert cli.main([*plain, str(clip)]) == 78
    assert "several target languages need a translation model" in capsys.readouterr().err
