"""Durable ``seq`` numbering: blocks reserved in the state directory before use.

Subscribers drop repeats by ``seq`` (MQTT QoS 1 redelivers), so a stream's
``seq`` must keep rising across restarts of the daemon, crashes included.
:class:`SeqReservations` keeps one small JSON file, ``seq.json`` in the state
directory, with a high-water mark per stream id: every number at or below it
may have been used. Before an event whose ``seq`` is above the mark leaves the
process, :meth:`SeqReservations.reserve` raises the mark by a block
(``block``, default 1000) and makes it durable: write a temporary file, fsync
it, rename it over ``seq.json``, fsync the directory. A restarted daemon
numbers each stream after its mark, so a crash skips at most a block of
numbers and never repeats one. The cost is one write and two fsyncs per block
of a stream, not per event.

The file holds the ``max_streams`` streams that reserved most recently; an
older one is forgotten after raising ``floor`` to its mark. A stream that is
not in the file numbers after ``floor``, so forgetting never repeats either.
Stream ids are JSON object keys (any string is safe there; the file itself is
ASCII).

Edge cases, each chosen so that numbers are never repeated:

- no file: numbering starts at 1 (a first start);
- a file that is not a valid reservation file (garbage, a bad value): it is
  kept aside as ``seq.json.corrupt-<time>`` with a warning, and every stream
  jumps ahead to the current time in microseconds since 1970 (``floor``):
  above any number counted up from 1, and above numbers from an earlier jump
  unless a stream used more than one number per microsecond since. A wall
  clock set back by years would break that promise; nothing else does;
- a state directory that cannot be created, read or written: a
  :class:`~streamer.errors.ConfigError` (``service.state_dir``) when opening,
  before the daemon reports ready;
- two daemons on one state directory: each reservation re-reads the file
  under an exclusive lock (``seq.lock``) and merges (largest mark wins), so
  daemons serving different stream ids do not clobber each other. Two
  daemons serving the same stream id at once are not supported.

This module is I/O only: it never numbers events itself. The sessions number
them (``StreamSession(seq_after=...)``) and the stream factory calls
``reserve`` before publishing each one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from streamer.errors import ConfigError, StreamerError

__all__ = [
    "DEFAULT_BLOCK",
    "MAX_STREAMS",
    "STATE_FILE",
    "SeqReservations",
    "SeqStoreError",
    "resolve_state_dir",
]

log = logging.getLogger(__name__)

STATE_FILE = "seq.json"
LOCK_FILE = "seq.lock"
FORMAT_VERSION = 1
DEFAULT_BLOCK = 1000
#: Streams whose marks are kept (as StreamFactory's MAX_REMEMBERED_STREAMS).
MAX_STREAMS = 4096
_KEY = "service.state_dir"


class SeqStoreError(StreamerError):
    """A reservation could not be made durable (the event must not be sent)."""


def resolve_state_dir(state_dir: str = "") -> Path:
    """The daemon's state folder: the configured one, else systemd's
    ``$STATE_DIRECTORY`` (its first entry), else ``$XDG_STATE_HOME/streamer``
    (absolute only, as the XDG spec says), else ``~/.local/state/streamer``."""
    if state_dir:
        return Path(state_dir).expanduser()
    if systemd := os.environ.get("STATE_DIRECTORY", ""):
        return Path(systemd.split(":")[0])
    xdg = os.environ.get("XDG_STATE_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "streamer"
    return Path.home() / ".local" / "state" / "streamer"


def _now_us() -> int:
    return time.time_ns() // 1000


class _Corrupt(ValueError):
    pass


def _parse(text: str) -> tuple[int, dict[str, int]]:
    """``(floor, marks)`` from the file's text; raises :class:`_Corrupt`."""
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise _Corrupt(f"not JSON ({exc})") from None
    if not isinstance(obj, dict) or obj.get("version") != FORMAT_VERSION:
        raise _Corrupt(f"not a version {FORMAT_VERSION} reservation file")
    floor, streams = obj.get("floor"), obj.get("streams")

    def count(value: Any) -> bool:
        return type(value) is int and value >= 0

    if not isinstance(floor, int) or not count(floor) or not isinstance(streams, dict):
        raise _Corrupt("'floor' or 'streams' missing or invalid")
    bad = next((k for k, v in streams.items() if not count(v)), None)
    if bad is not None:
        raise _Corrupt(f"invalid mark for stream {bad!r}")
    return floor, {str(k): int(v) for k, v in streams.items()}


class SeqReservations:
    """High-water marks of ``seq`` per stream, durable in ``directory/seq.json``.

    Use :meth:`open` (it creates the folder and proves it writable). A session
    of a stream numbers after :meth:`start`; each event's ``seq`` goes through
    :meth:`reserve` before the event is sent.
    """

    def __init__(
        self,
        directory: Path,
        *,
        block: int = DEFAULT_BLOCK,
        max_streams: int = MAX_STREAMS,
        clock_us: Callable[[], int] = _now_us,
    ) -> None:
        if block < 1 or max_streams < 1:
            raise ValueError("block and max_streams must be at least 1")
        self.directory = directory
        self.path = directory / STATE_FILE
        self.block = block
        self.max_streams = max_streams
        self._clock_us = clock_us
        self._floor = 0
        self._marks: dict[str, int] = {}  # least recently reserved first
        self.writes = 0  # durable writes made (each one a block or the opening write)

    @classmethod
    def open(cls, directory: Path, **kwargs: Any) -> SeqReservations:
        """Create ``directory`` if needed, load the marks and write them back once
        (proving the folder writable); a ``ConfigError`` says why it cannot."""
        store = cls(directory, **kwargs)
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            with store._locked():
                store._floor, store._marks = store._load(initial=True)
                store._write()
        except OSError as exc:
            reason = exc.strerror or str(exc)
            where = exc.filename or directory
            raise ConfigError(
                f"cannot use the state directory {directory} ({where}: {reason}); "
                "set [service] state_dir to a writable folder",
                key=_KEY,
            ) from None
        log.debug("seq reservations in %s: %d stream(s), floor %d",
                  store.path, len(store._marks), store._floor)  # fmt: skip
        return store

    # ----------------------------------------------------------------- queries
    def start(self, stream: str) -> int:
        """The number a new session of ``stream`` must number after (its mark)."""
        return self._marks.get(stream, self._floor)

    @property
    def floor(self) -> int:
        return self._floor

    def __len__(self) -> int:
        return len(self._marks)

    # ----------------------------------------------------------------- reserve
    def reserve(self, stream: str, seq: int) -> None:
        """Make sure ``seq`` of ``stream`` is covered by a durable mark.

        Free while ``seq`` is within the current block; otherwise the mark
        becomes ``seq - 1 + block`` and is on disk (fsynced) when this returns.
        Raises :class:`SeqStoreError` when it cannot be written: then the
        event with this ``seq`` must not be sent.
        """
        if seq <= self.start(stream):
            return
        mark = seq - 1 + self.block
        try:
            with self._locked():
                floor, marks = self._load(initial=False)
                for name, value in self._marks.items():  # ours: never lower than we know
                    if value > marks.get(name, -1):
                        marks[name] = value
                floor = max(floor, self._floor)
                mark = max(mark, marks.pop(stream, floor))
                marks[stream] = mark  # most recent last
                while len(marks) > self.max_streams:
                    oldest = next(iter(marks))
                    floor = max(floor, marks.pop(oldest))
                old = (self._floor, self._marks)
                self._floor, self._marks = floor, marks
                try:
                    self._write()
                except OSError:
                    self._floor, self._marks = old
                    raise
        except OSError as exc:
            raise SeqStoreError(
                f"cannot reserve seq numbers in {self.path}: {exc.strerror or exc}"
            ) from None

    # --------------------------------------------------------------- internals
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _load(self, *, initial: bool) -> tuple[int, dict[str, int]]:
        """The file's ``(floor, marks)``; a missing file is empty, a corrupt one
        is set aside and replaced by a jump ahead (see the module docstring)."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return (0, {}) if initial else (self._floor, dict(self._marks))
        except UnicodeDecodeError:
            text = ""
        try:
            return _parse(text)
        except _Corrupt as exc:
            jump = max(self._clock_us(), self._floor, *self._marks.values())
            aside = self.path.with_name(f"{STATE_FILE}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
            os.replace(self.path, aside)
            log.warning(
                "%s is not a valid seq reservation file (%s); kept as %s. Every stream's "
                "seq now continues above %d (the time in microseconds), so no number repeats",
                self.path, exc, aside.name, jump,
            )  # fmt: skip
            return jump, {}

    def _write(self) -> None:
        """Write temp, fsync it, rename over the file, fsync the folder."""
        body = {"version": FORMAT_VERSION, "floor": self._floor, "streams": self._marks}
        data = (json.dumps(body, separators=(",", ":")) + "\n").encode("ascii")
        tmp = self.path.with_name(STATE_FILE + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self.writes += 1
