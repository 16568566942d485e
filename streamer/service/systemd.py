"""systemd integration: a dependency-free sd_notify client and the watchdog feeder.

Under ``Type=notify`` systemd passes ``$NOTIFY_SOCKET`` (and ``$WATCHDOG_USEC``
with ``WatchdogSec=``); the daemon tells it, as datagrams of ``KEY=VALUE`` lines:

- ``EXTEND_TIMEOUT_USEC`` every few seconds while the model loads, so a slow
  first conversion does not hit ``TimeoutStartSec`` (capped by
  :data:`LOAD_EXTEND_LIMIT_S`, so a load that hangs still times out);
- ``READY=1`` once the model is loaded and the engine thread runs;
- ``WATCHDOG=1`` twice per watchdog interval, but only while the engine is
  alive and its heartbeat is fresh: a hung forward pass stops the pings, and a
  blocked event loop stops them too (the feeder is a coroutine on that loop),
  so systemd kills and restarts the service;
- ``STATUS=`` with live figures (``systemctl status``), or with the reason the
  daemon is unhealthy or failed;
- ``STOPPING=1`` when shutdown begins (systemd stops watching the watchdog then).

Without ``$NOTIFY_SOCKET`` everything here is a no-op. Socket errors never
reach the daemon: the first one is logged, the rest are dropped until a send
works again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Protocol

__all__ = [
    "EXTEND_BY_S",
    "EXTEND_EVERY_S",
    "HEARTBEAT_FLOOR_S",
    "LOAD_EXTEND_LIMIT_S",
    "EngineHealth",
    "EngineLike",
    "Notifier",
    "StatusLine",
    "SystemdService",
    "extend_start_timeout",
    "feed_watchdog",
]

log = logging.getLogger(__name__)

#: While loading: every this many seconds ...
EXTEND_EVERY_S = 10.0
#: ... ask for this much more start time (must exceed EXTEND_EVERY_S) ...
EXTEND_BY_S = 30.0
#: ... for at most this long; a load still running then is left to TimeoutStartSec.
LOAD_EXTEND_LIMIT_S = 1800.0
#: The engine's heartbeat may be this old (and at least one watchdog interval)
#: before the daemon counts as hung; the engine beats every second when idle.
HEARTBEAT_FLOOR_S = 5.0
#: A heartbeat gap up to this many times the longest engine step so far is normal.
STEP_FACTOR = 3.0
#: STATUS is refreshed (and health checked) at least this often.
MAX_TICK_S = 5.0
#: Decode rates shown in STATUS cover windows of about this length.
RATE_WINDOW_S = 10.0
#: Longest STATUS text sent (a datagram to systemd must stay under 4 KiB).
MAX_STATUS_CHARS = 1000


class EngineStatsLike(Protocol):
    @property
    def busy_seconds(self) -> float: ...
    @property
    def audio_seconds(self) -> float: ...
    @property
    def max_step_seconds(self) -> float: ...


class EngineLike(Protocol):
    """What the watchdog reads of ``streamer.engine.core.Engine`` (no torch import here)."""

    @property
    def alive(self) -> bool: ...
    @property
    def heartbeat(self) -> float: ...
    @property
    def fatal(self) -> BaseException | None: ...
    @property
    def stats(self) -> EngineStatsLike: ...


def _clean(value: object) -> str:
    """One line: a newline in a value would start a new (spoofable) field."""
    text = str(value).replace("\r", " ").replace("\n", " ")
    return text if len(text) <= MAX_STATUS_CHARS else text[: MAX_STATUS_CHARS - 1] + "…"


class Notifier:
    """Sends sd_notify messages to ``$NOTIFY_SOCKET``; every method is a no-op without it.

    ``address`` is an absolute socket path or ``@name`` (abstract namespace);
    anything else (e.g. ``vsock:``) disables notifications with a warning.
    """

    def __init__(
        self,
        address: str | None,
        *,
        watchdog_usec: str | None = None,
        watchdog_pid: str | None = None,
    ) -> None:
        self.address = address or None
        self._target: bytes | None = None
        if address:
            if address.startswith("/"):
                self._target = os.fsencode(address)
            elif address.startswith("@") and len(address) > 1:
                self._target = b"\0" + os.fsencode(address[1:])
            else:
                log.warning("unsupported NOTIFY_SOCKET %r: not notifying systemd", address)
        self._watchdog_usec = watchdog_usec
        self._watchdog_pid = watchdog_pid
        self._sock: socket.socket | None = None
        self._failing = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        return cls(
            env.get("NOTIFY_SOCKET"),
            watchdog_usec=env.get("WATCHDOG_USEC"),
            watchdog_pid=env.get("WATCHDOG_PID"),
        )

    @property
    def enabled(self) -> bool:
        return self._target is not None

    def send(self, **fields: object) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; True when it was delivered."""
        if self._target is None or not fields:
            return False
        message = "\n".join(f"{key}={_clean(value)}" for key, value in fields.items())
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)  # a full queue drops the message, never waits
            self._sock.sendto(message.encode("utf-8"), self._target)
        except OSError as exc:
            if not self._failing:
                log.warning(
                    "cannot notify systemd at %s: %s (further failures not logged)",
                    self.address,
                    exc.strerror or exc,
                )
                self._failing = True
            return False
        if self._failing:
            log.info("notifying systemd at %s works again", self.address)
            self._failing = False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send(READY=1, **({"STATUS": status} if status is not None else {}))

    def status(self, text: str) -> bool:
        return self.send(STATUS=text)

    def stopping(self, status: str | None = None) -> bool:
        return self.send(STOPPING=1, **({"STATUS": status} if status is not None else {}))

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def reloading(self) -> bool:
        """RELOADING=1 (for a SIGHUP reload); send ``ready()`` when the reload is done."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send(RELOADING=1, MONOTONIC_USEC=usec)

    def extend_timeout(self, seconds: float) -> bool:
        """Push the current start/stop timeout to at least ``seconds`` from now."""
        return self.send(EXTEND_TIMEOUT_USEC=max(0, round(seconds * 1_000_000)))

    def watchdog_interval(self) -> float | None:
        """``WatchdogSec`` in seconds when it applies to this process, else None."""
        if self._target is None or not self._watchdog_usec:
            return None
        try:
            usec = int(self._watchdog_usec)
            pid = int(self._watchdog_pid) if self._watchdog_pid else os.getpid()
        except ValueError:
            return None
        if usec <= 0 or pid != os.getpid():  # WATCHDOG_PID names another process
            return None
        return usec / 1_000_000

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class EngineHealth:
    """``check() -> None`` while the engine is alive and its heartbeat is fresh, else why not.

    The engine beats after every step and every second when idle, so the
    heartbeat's age is at most the running step's duration. The allowed age is
    ``max(floor, STEP_FACTOR x the longest step so far)``: a model that is
    simply slow raises the bound with its first long step that ends; a step
    that never ends does not.
    """

    def __init__(
        self,
        engine: EngineLike,
        floor: float = HEARTBEAT_FLOOR_S,
        *,
        factor: float = STEP_FACTOR,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.floor = floor
        self.factor = factor
        self._clock = clock

    @property
    def limit(self) -> float:
        return max(self.floor, self.factor * self.engine.stats.max_step_seconds)

    def __call__(self) -> str | None:
        engine = self.engine
        if not engine.alive:
            fatal = engine.fatal
            return f"engine stopped: {fatal}" if fatal is not None else "engine thread ended"
        age, limit = self._clock() - engine.heartbeat, self.limit
        if age > limit:
            return f"engine heartbeat {age:.0f} s old (limit {limit:.0f} s): decode hung?"
        return None


class StatusLine:
    """The live figures for ``systemctl status``: streams, subscribers, RTF, engine load.

    RTF (decode seconds per audio second) and engine load cover the last
    :data:`RATE_WINDOW_S` or so, not the whole uptime. ``extras`` are more
    fragments (e.g. the MQTT connection state), appended in order.
    """

    def __init__(
        self,
        engine: EngineLike,
        streams: Callable[[], Mapping[str, int]],
        subscribers: Callable[[], int],
        extras: list[Callable[[], str]] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.streams = streams
        self.subscribers = subscribers
        self.extras = extras if extras is not None else []
        self._clock = clock
        self._since = (clock(), engine.stats.busy_seconds, engine.stats.audio_seconds)
        self._rates = "RTF -, engine idle"

    def _update_rates(self) -> str:
        now, stats = self._clock(), self.engine.stats
        t0, busy0, audio0 = self._since
        wall, busy, audio = now - t0, stats.busy_seconds - busy0, stats.audio_seconds - audio0
        if wall > 0:
            rtf = f"RTF {busy / audio:.2f}" if audio > 0 else "RTF -"
            self._rates = f"{rtf}, engine {min(100.0, 100 * busy / wall):.0f}% busy"
        if wall >= RATE_WINDOW_S:
            self._since = (now, stats.busy_seconds, stats.audio_seconds)
        return self._rates

    def __call__(self) -> str:
        counts = self.streams()
        total, clients = sum(counts.values()), counts.get("client", 0)
        parts = [
            f"streams {total} ({clients} from clients)",
            f"subscribers {self.subscribers()}",
            self._update_rates(),
        ]
        parts.extend(fragment() for fragment in self.extras)
        return ", ".join(parts)


def _safe(fn: Callable[[], str | None], what: str, logged: set[str] | None = None) -> str | None:
    """``fn()``, or a description of its exception (logged once per distinct error)."""
    try:
        return fn()
    except Exception as exc:  # a bug in a figure must not stop the watchdog
        text = f"{what} failed: {type(exc).__name__}: {exc}"
        if logged is None or text not in logged:
            log.exception("%s failed", what)
            if logged is not None:
                logged.add(text)
        return text


async def feed_watchdog(
    notifier: Notifier,
    check: Callable[[], str | None],
    interval: float | None,
    status: Callable[[], str],
) -> None:
    """Ping ``WATCHDOG=1`` every ``interval / 2`` while ``check()`` returns None.

    ``check`` returns None when healthy, else the reason, which then becomes
    STATUS (logged once per episode) while the pings stop, so systemd restarts
    the service after ``WatchdogSec``. Healthy ticks set STATUS to ``status()``
    when it changed. ``interval`` None (no watchdog): STATUS updates only.
    Runs until cancelled.
    """
    tick = MAX_TICK_S if interval is None else min(interval / 2, MAX_TICK_S)
    shown: str | None = None
    problem: str | None = None
    logged: set[str] = set()
    while True:
        was = problem
        problem = _safe(check, "health check", logged)
        if problem is None:
            text = _safe(status, "status", logged) or ""
            fields: dict[str, object] = {"STATUS": text} if text != shown else {}
            if interval is not None:
                fields["WATCHDOG"] = 1
            notifier.send(**fields)
            shown = text
            if was is not None:
                log.warning("healthy again (%s): feeding the watchdog", text)
        else:
            if was is None:
                log.error("%s: no longer feeding the systemd watchdog", problem)
            if problem != shown:
                notifier.status(problem)
                shown = problem
        await asyncio.sleep(tick)


async def extend_start_timeout(
    notifier: Notifier,
    every: float | None = None,
    by: float | None = None,
    limit: float | None = None,
) -> None:
    """Send ``EXTEND_TIMEOUT_USEC`` now and every ``every`` s, for at most ``limit`` s."""
    every = EXTEND_EVERY_S if every is None else every
    by = EXTEND_BY_S if by is None else by
    limit = LOAD_EXTEND_LIMIT_S if limit is None else limit
    started = time.monotonic()
    while time.monotonic() - started < limit:
        notifier.extend_timeout(by)
        await asyncio.sleep(every)
    log.warning("still loading after %.0f s: no longer extending the start timeout", limit)


class SystemdService:
    """What the daemon tells systemd, in the order ``App.run`` calls it.

    ``loading()`` around the model load, ``running(engine, ...)`` once ready,
    ``failed(reason)`` on a fatal engine error, ``stopping()`` when shutdown
    begins. Sinks add STATUS fragments with :meth:`add_status`.
    """

    def __init__(self, notifier: Notifier | None = None) -> None:
        self.notifier = Notifier.from_env() if notifier is None else notifier
        self.extras: list[Callable[[], str]] = []
        self.failure: str | None = None
        self._watchdog: asyncio.Task[None] | None = None

    def add_status(self, fragment: Callable[[], str]) -> None:
        """Show ``fragment()`` (e.g. "MQTT connected") in STATUS after the figures."""
        self.extras.append(fragment)

    @contextlib.asynccontextmanager
    async def loading(self, what: str = "loading the model") -> AsyncIterator[None]:
        """Say what is loading and keep extending the start timeout meanwhile."""
        if not self.notifier.enabled:
            yield
            return
        self.notifier.status(f"starting: {what}")
        task = asyncio.create_task(extend_start_timeout(self.notifier), name="systemd-extend")
        try:
            yield
        except Exception as exc:
            self.notifier.status(f"failed to start: {exc}")
            raise
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def running(
        self,
        engine: EngineLike,
        *,
        streams: Callable[[], Mapping[str, int]],
        subscribers: Callable[[], int],
    ) -> None:
        """READY=1 with the first figures, then feed the watchdog while healthy."""
        if not self.notifier.enabled:
            return
        status = StatusLine(engine, streams, subscribers, self.extras)
        self.notifier.ready(status=_safe(status, "status"))
        interval = self.notifier.watchdog_interval()
        health = EngineHealth(engine, floor=max(HEARTBEAT_FLOOR_S, interval or 0.0))
        self._watchdog = asyncio.create_task(
            feed_watchdog(self.notifier, health, interval, status), name="systemd-watchdog"
        )

    def failed(self, reason: str) -> None:
        """STATUS says why the daemon is going down (the exit code says that it failed)."""
        self.failure = reason
        self.notifier.status(reason)

    async def stopping(self) -> None:
        """STOPPING=1 and the watchdog feeder ends (systemd stops watching now)."""
        why = f"stopping after {self.failure}" if self.failure else "stopping"
        self.notifier.stopping(status=why)
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None
