"""Fixtures shared by the whole suite: the real demo model, subprocess env, wire schema.

The real Whisper base is converted once into the user's cache folder (the same
one the CLI uses), so warm test runs reuse it; ``streamer.engine`` (and torch)
is imported lazily, so tests that never touch the model stay fast.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

#: Keys of the caption events of DESIGN.md section 4, per event type.
FINAL_KEYS = frozenset(
    {"v", "type", "stream", "segment", "seq", "text", "start", "end", "lang", "latency_ms"}
)
PARTIAL_KEYS = FINAL_KEYS | {"committed", "tentative"}
#: Optional keys: the daemon's run id (``streamer transcribe`` has none), word timestamps,
#: the translation target of a target's event.
OPTIONAL_KEYS = frozenset({"run", "words", "target"})


def _cache_dir() -> Path:
    from streamer.engine.ct2_whisper import default_cache_dir

    return default_cache_dir()


@pytest.fixture(autouse=True)
def _state_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test's daemons (in process or not) keep their state (``seq.json``) in
    a folder of the test's own, never in the user's ~/.local/state."""
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("xdg-state")))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The checkout, for paths such as ``configs/`` and ``tests/data/audio``."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def audio_dir() -> Path:
    return REPO_ROOT / "tests" / "data" / "audio"


@pytest.fixture(scope="session")
def streamer_cache_dir() -> Path:
    """The model cache folder the CLI would use ($STREAMER_CACHE_DIR, else ~/.cache)."""
    return _cache_dir()


@pytest.fixture(scope="session")
def tiny_whisper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Whisper checkpoint on disk, built once per run (read-only for tests)."""
    from streamer.testing.tiny_models import make_whisper

    return make_whisper(tmp_path_factory.mktemp("tiny") / "whisper")


@pytest.fixture(scope="session")
def whisper_base_dir(streamer_cache_dir: Path) -> Path:
    """The converted ``builtin:whisper-base`` checkpoint (converted on first use)."""
    from streamer.engine.ct2_whisper import ensure_whisper_base

    return ensure_whisper_base(streamer_cache_dir)


@pytest.fixture
def cli_env(streamer_cache_dir: Path) -> dict[str, str]:
    """Environment for ``python -m streamer`` subprocesses: same cache, offline hub."""
    env = dict(os.environ)
    env["STREAMER_CACHE_DIR"] = str(streamer_cache_dir)
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def check_wire_event(event: Any, extra_keys: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Assert ``event`` is one caption event of DESIGN.md section 4; return it."""
    assert isinstance(event, dict), event
    kind = event.get("type")
    assert kind in ("partial", "final"), event
    expected = (PARTIAL_KEYS if kind == "partial" else FINAL_KEYS) | extra_keys
    keys = set(event) - (OPTIONAL_KEYS - expected)
    assert keys == expected, f"keys {sorted(event)} != {sorted(expected)}"
    if "run" in event:
        assert isinstance(event["run"], str) and len(event["run"]) == 16, event
    assert event["v"] == 1
    assert isinstance(event["stream"], str) and event["stream"]
    for key in ("segment", "seq"):
        assert type(event[key]) is int and event[key] >= 0, (key, event)
    assert isinstance(event["text"], str)
    for key in ("start", "end"):
        value = event[key]
        assert isinstance(value, int | float) and not isinstance(value, bool), (key, event)
        assert math.isfinite(value) and value >= 0, (key, event)
    assert event["start"] <= event["end"], event
    assert event["lang"] is None or isinstance(event["lang"], str), event
    latency = event["latency_ms"]
    assert latency is None or (isinstance(latency, int | float) and latency >= 0), event
    if kind == "partial":
        assert isinstance(event["committed"], str) and isinstance(event["tentative"], str)
        assert event["text"] == event["committed"] + event["tentative"], event
    if "words" in event:
        words = event["words"]
        assert isinstance(words, list) and words, event
        for w in words:
            assert set(w) == {"word", "start", "end"} and isinstance(w["word"], str), event
            assert 0 <= w["start"] <= w["end"], event
        assert [w["start"] for w in words] == sorted(w["start"] for w in words), event
        spelled = "".join(w["word"] for w in words).split()
        assert spelled == event["committed" if kind == "partial" else "text"].split(), event
    return event


@pytest.fixture(scope="session")
def wire_event() -> Callable[..., dict[str, Any]]:
    """The section 4 schema check, as a fixture (tests/ is not a package)."""
    return check_wire_event


# -- MQTT: a real Mosquitto broker (streamer/testing/mosquitto.py) ------------------------


def _require_mosquitto() -> None:
    """Skip without a broker binary; in CI (``CI`` set, not false/0) fail instead."""
    from streamer.testing.mosquitto import find_mosquitto

    if find_mosquitto() is None:
        reason = "mosquitto is not installed (apt-get install mosquitto)"
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail(f"{reason}; CI must run the MQTT tests against a real broker")
        pytest.skip(reason)


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Any:
    """``make(users=..., tls=..., require_client_cert=...)`` -> a started Mosquitto.

    Every broker made is stopped (by PID) at teardown.
    """
    _require_mosquitto()
    from streamer.testing.mosquitto import Mosquitto

    brokers: list[Mosquitto] = []

    def make(**kwargs: Any) -> Mosquitto:
        broker = Mosquitto(tmp_path / f"mosquitto-{len(brokers)}", **kwargs)
        brokers.append(broker)
        broker.start()
        return broker

    yield make
    for broker in brokers:
        broker.stop()


@pytest.fixture
def mosquitto(mosquitto_factory: Any) -> Any:
    """A running broker on 127.0.0.1: ``port`` (anonymous), ``password_port``
    (user/password in ``.users``) and ``tls_port`` (CA at ``.ca_path``)."""
    return mosquitto_factory(users={"streamer": "correct horse battery"}, tls=True)
