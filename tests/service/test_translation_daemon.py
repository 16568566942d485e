"""Captions in several languages at once: the daemon's cascade end to end over /v1/stream.

A tiny random Whisper is the speech model, a tiny random mBART-50 the
translation model (both built from configs, loaded from disk); every
translation runs on the engine thread.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

from streamer.config import Config, TranslationConfig, load_config, validate_config
from streamer.errors import ConfigError
from streamer.testing.tiny_translation import make_mbart50

from ..conftest import check_wire_event
from .test_ingest import make_config, running, start_msg, stream_clip, ws_url


@pytest.fixture(scope="module")
def tiny_mbart50(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_mbart50(tmp_path_factory.mktemp("mt") / "mbart50")


def translating(model: Path, mt: Path, targets: str = "de,fr", **ws: Any) -> Config:
    cfg = make_config(model, **ws)
    return dataclasses.replace(cfg, translation=TranslationConfig(targets=targets, model=str(mt)))


def check_targets(events: list[dict[str, Any]], targets: tuple[str, ...]) -> None:
    for event in events:
        check_wire_event(event)
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(set(seqs)), seqs  # one sequence for the stream, targets included
    source = [e for e in events if "target" not in e]
    finals = {e["segment"]: e for e in source if e["type"] == "final" and e["text"]}
    assert finals, source
    for target in targets:
        got = [e for e in events if e.get("target") == target]
        target_finals = {e["segment"]: e for e in got if e["type"] == "final"}
        assert set(target_finals) == set(finals), (target, got)
        for segment, event in target_finals.items():
            src = finals[segment]
            assert (event["start"], event["end"], event["lang"]) == (
                src["start"], src["end"], src["lang"],
            )  # fmt: skip
            assert event["seq"] > src["seq"] and event["text"]
            assert event["latency_ms"] is not None and event["latency_ms"] >= src["latency_ms"]
        committed: dict[int, str] = {}
        for event in got:  # a target's committed text only grows within a segment
            if event["type"] == "partial":
                previous = committed.get(event["segment"], "")
                assert event["committed"].startswith(previous), (previous, event)
                committed[event["segment"]] = event["committed"]
            else:
                assert event["text"].startswith(committed.get(event["segment"], ""))
    assert not {e.get("target") for e in events} - {None, *targets}


async def test_daemon_wide_targets_and_a_client_choice(tiny_whisper: Path, tiny_mbart50: Path):
    cfg = translating(tiny_whisper, tiny_mbart50, client_targets="de,es")
    async with running(cfg) as app:
        assert app.engine is not None and set(app.engine.targets) == {"de", "fr", "es"}
        check_targets(await stream_clip(app, "alice"), ("de", "fr"))  # [translation] targets
        chosen = await stream_clip(app, "bob", targets=["es"])
        check_targets(chosen, ("es",))
        assert not [e for e in await stream_clip(app, "carol", targets=[]) if "target" in e]
        async with connect(ws_url(app, "/v1/stream")) as ws:  # not in client_targets
            await ws.send(start_msg(16000, targets=["fr"]))
            error = json.loads(await ws.recv())
        assert error["type"] == "error" and "'fr' is not allowed" in error["message"]
        stats = app.engine.stats
        assert stats.translate_requests > 0 and stats.translate_seconds > 0


def test_translation_config(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text('[translation]\ntargets = ["de", "fr"]\nmodel = "x/y"\n', encoding="utf-8")
    cfg = load_config([path])
    assert cfg.translation.targets == "de,fr" and cfg.translation.model == "x/y"
    bad = dataclasses.replace(cfg, translation=TranslationConfig(targets="de"))
    with pytest.raises(ConfigError, match=r"need translation\.model"):
        validate_config(bad)
