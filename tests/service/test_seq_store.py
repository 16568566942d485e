"""Durable seq reservations (``streamer/service/seq_store.py``) on a real folder.

A "crash" is a second store opened on the same folder while the first one
is simply dropped (nothing is closed or flushed at exit: there is nothing
to close). fsync ordering is recorded by wrapping ``os.fsync``/``os.replace``.
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from streamer.config import Config, VadConfig
from streamer.errors import EX_CONFIG, ConfigError
from streamer.service import seq_store
from streamer.service.seq_store import (
    STATE_FILE,
    SeqReservations,
    SeqStoreError,
    resolve_state_dir,
)
from streamer.service.stream_factory import StreamFactory
from streamer.types import Hypothesis

NOW_US = 1_750_000_000_000_000  # a fixed "time in microseconds" for corrupt-file jumps


def on_disk(folder: Path) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads((folder / STATE_FILE).read_text(encoding="ascii"))
    return obj


def test_blocks_are_reserved_once_per_block_not_per_event(tmp_path: Path) -> None:
    store = SeqReservations.open(tmp_path / "state", block=100)
    assert store.start("mic0") == 0 and store.writes == 1  # the opening write
    store.reserve("mic0", 1)
    assert on_disk(tmp_path / "state")["streams"] == {"mic0": 100}
    for seq in range(2, 101):
        store.reserve("mic0", seq)
    assert store.writes == 2  # one block, one write
    store.reserve("mic0", 101)
    assert store.writes == 3 and on_disk(tmp_path / "state")["streams"] == {"mic0": 200}
    assert store.start("mic0") == 200
    assert store.start("other") == 0


def test_a_crash_skips_numbers_but_never_repeats_them(tmp_path: Path) -> None:
    """Random runs of events, each run ended by a crash: every new seq is above every old one."""
    rng = random.Random(13)
    used: list[int] = []
    for _ in range(30):
        store = SeqReservations.open(tmp_path, block=10)  # the previous one "crashed"
        seq = store.start("s")
        assert not used or seq >= max(used)
        for _ in range(rng.randrange(0, 35)):
            seq += 1
            store.reserve("s", seq)  # before the event leaves the process
            used.append(seq)
    assert used == sorted(set(used))  # strictly increasing across all 30 "processes"
    assert len(used) > 300


def test_the_mark_is_on_disk_before_reserve_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """temp file fsynced -> renamed over seq.json -> folder fsynced -> only then published."""
    store = SeqReservations.open(tmp_path, block=1000)
    steps: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        kind = "dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file"
        steps.append(f"fsync {kind}")
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        assert json.loads(Path(src).read_text(encoding="ascii"))["streams"] == {"mic0": 1000}
        steps.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    factory = StreamFactory(
        Config(), SimpleNamespace(sample_rate=16000),  # type: ignore[arg-type]
        lambda event: steps.append(f"publish {event.seq} run={event.run}"),
        run="0123456789abcdef", seqs=store,
    )  # fmt: skip
    for seq in (1, 2, 3):
        factory._publish(Hypothesis("final", "mic0", 0, seq, "hi", 0.0, 1.0))
    assert steps == [
        "fsync file", "replace", "fsync dir",
        "publish 1 run=0123456789abcdef",
        "publish 2 run=0123456789abcdef",
        "publish 3 run=0123456789abcdef",
    ]  # fmt: skip


def test_an_event_whose_block_cannot_be_written_is_not_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store = SeqReservations.open(tmp_path, block=2)
    published: list[int] = []
    factory = StreamFactory(
        Config(), SimpleNamespace(sample_rate=16000),  # type: ignore[arg-type]
        lambda event: published.append(event.seq), seqs=store,
    )  # fmt: skip
    factory._publish(Hypothesis("final", "s", 0, 1, "a", 0.0, 1.0))
    real_fsync = os.fsync

    def broken(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(SeqStoreError, match="No space left"):
        store.reserve("s", 3)
    assert store.start("s") == 2  # the failed block is not counted as reserved
    for seq in (2, 3, 4):  # 2 is covered; 3 and 4 need a block that cannot be written
        factory._publish(Hypothesis("final", "s", 0, seq, "a", 0.0, 1.0))
    monkeypatch.setattr(os, "fsync", real_fsync)
    factory._publish(Hypothesis("final", "s", 0, 5, "a", 0.0, 1.0))
    assert published == [1, 2, 5] and factory.unsent == 2
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "No space left" in errors[0].getMessage()  # once per streak
    assert SeqReservations.open(tmp_path).start("s") == 6


def test_a_new_stream_starts_after_its_mark_and_numbering_continues_in_process(
    tmp_path: Path,
) -> None:
    SeqReservations.open(tmp_path, block=50).reserve("alice", 7)  # an earlier run
    store = SeqReservations.open(tmp_path, block=50)
    published: list[Hypothesis] = []
    factory = StreamFactory(
        Config(vad=VadConfig(enabled=False)), SimpleNamespace(sample_rate=16000),  # type: ignore[arg-type]
        published.append, run="r" * 16, seqs=store,
    )  # fmt: skip
    runner = factory.create("alice", origin="client")
    assert runner.session.last_seq == 56  # numbers after the earlier run's mark (7 - 1 + 50)
    assert factory.create("bob").session.last_seq == 0
    runner.source_state("lost", "unplugged")  # one event: seq 57
    assert [(e.seq, e.run) for e in published] == [(57, "r" * 16)]
    factory.release("alice")
    assert factory.create("alice").session.last_seq == 57  # same process: no gap


def test_missing_file_starts_at_one_and_corrupt_file_jumps_ahead(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fresh = SeqReservations.open(tmp_path / "new" / "deeper")
    assert fresh.start("x") == 0 and (tmp_path / "new" / "deeper" / STATE_FILE).exists()

    for garbage in (b"{not json", b"\xff\xfe\x00", b'{"version": 1, "floor": 0}',
                    b'{"version": 1, "floor": 0, "streams": {"a": -5}}',
                    b'{"version": 9, "floor": 0, "streams": {}}', b""):  # fmt: skip
        folder = tmp_path / f"corrupt-{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        (folder / STATE_FILE).write_bytes(garbage)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=seq_store.__name__):
            store = SeqReservations.open(folder, clock_us=lambda: NOW_US)
        assert store.start("a") == NOW_US and store.start("anything") == NOW_US, garbage
        assert "not a valid seq reservation file" in caplog.text
        kept = [p.name for p in folder.iterdir() if ".corrupt-" in p.name]
        assert len(kept) == 1 and (folder / kept[0]).read_bytes() == garbage  # kept aside
        assert on_disk(folder)["floor"] == NOW_US  # the jump itself is durable
        assert SeqReservations.open(folder, clock_us=lambda: 0).start("a") == NOW_US


def test_remembered_streams_are_bounded_and_forgetting_never_repeats(tmp_path: Path) -> None:
    store = SeqReservations.open(tmp_path, block=10, max_streams=3)
    marks = {}
    for i, name in enumerate(["a", "b", "c", "d", "e"]):
        store.reserve(name, 1 + 100 * i)
        marks[name] = store.start(name)
    assert len(store) == 3 and set(on_disk(tmp_path)["streams"]) == {"c", "d", "e"}
    assert store.floor == marks["b"]  # the largest forgotten mark
    again = SeqReservations.open(tmp_path, max_streams=3)
    for name, mark in marks.items():
        assert again.start(name) >= mark  # forgotten ones number after the floor
    again.reserve("a", again.start("a") + 1)  # a comeback is remembered again
    assert list(on_disk(tmp_path)["streams"]) == ["d", "e", "a"]  # least recent first


def test_any_stream_id_is_stored_safely(tmp_path: Path) -> None:
    names = ['a"b', "x/y\\z", "line\nbreak", "ünï code ✓", "../../etc", "", "nul\x00"]
    store = SeqReservations.open(tmp_path, block=5)
    for i, name in enumerate(names):
        store.reserve(name, 10 * i + 1)
    assert (tmp_path / STATE_FILE).read_bytes().isascii()
    again = SeqReservations.open(tmp_path)
    assert {name: again.start(name) for name in names} == {
        name: 10 * i + 5 for i, name in enumerate(names)
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seq.json", "seq.lock"]


def test_two_daemons_on_one_folder_keep_each_others_marks(tmp_path: Path) -> None:
    one = SeqReservations.open(tmp_path, block=10)
    two = SeqReservations.open(tmp_path, block=10)
    one.reserve("a", 1)
    two.reserve("b", 1)  # re-reads the file under the lock: "a" survives
    one.reserve("a", 11)
    assert on_disk(tmp_path)["streams"] == {"b": 10, "a": 20}


def test_an_unusable_state_dir_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        SeqReservations.open(blocker / "state")
    assert err.value.key == "service.state_dir" and err.value.exit_code == EX_CONFIG
    assert "cannot use the state directory" in str(err.value)
    assert "\n" not in str(err.value)


def test_state_dir_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/streamer:/var/lib/other")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert resolve_state_dir("/srv/state") == Path("/srv/state")
    assert resolve_state_dir("") == Path("/var/lib/streamer")
    monkeypatch.delenv("STATE_DIRECTORY")
    assert resolve_state_dir("") == tmp_path / "xdg" / "streamer"
    monkeypatch.setenv("XDG_STATE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_state_dir("") == tmp_path / "home" / ".local" / "state" / "streamer"
