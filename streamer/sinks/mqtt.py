"""MQTT sink: captions for IoT devices, with no final lost across broker outages.

Topics (``prefix`` defaults to ``streamer``)::

    {prefix}/{stream}/partial   QoS partial_qos (0), not retained, MQTT 5 message expiry
    {prefix}/{stream}/final     QoS final_qos (1), not retained
    {prefix}/{stream}/{target}/partial|final
                                the same, for each translation target's events
    {prefix}/status             retained "online" after each connect; "offline" as the
                                last will (unclean loss) and before a clean disconnect;
                                on MQTT 5 each carries the user property ("run", run id)
    {prefix}/status/run         retained run id of the daemon (random per process start),
                                published before "online" (for MQTT 3.1.1 consumers too)
    {prefix}/status/{node}[/run]  the same two, with ``node`` set (several daemons, one broker)
    hermes/asr/partialTextCaptured, hermes/asr/textCaptured   (optional Hermes mode)

The payload is the WebSocket event, ``json.dumps(event.to_wire())`` (DESIGN.md
section 4); ``seq`` lets subscribers drop QoS 1 duplicates. Which messages an
event makes: :mod:`streamer.sinks.mqtt_messages`; the settings and the
operator's error lines: :mod:`streamer.sinks.mqtt_settings`.

Design: :meth:`MqttSink.run` takes events from its fanout subscription at once
(it never leaves finals there, so the fanout never disconnects it as slow) and
hands them to a connection task that owns the broker. The event loop never
waits for the broker; aiomqtt runs the blocking connect in a thread.

- While disconnected, partials are dropped (counted); finals (of every
  language) wait in a bounded outbox (full: the oldest is dropped, counted,
  and warned about once per outage) and are published in order after
  reconnecting.
- A final leaves the outbox only once its publish completed (PUBACK at QoS 1);
  if the connection drops first it is sent again: duplicates are possible,
  always with the same ``seq``, loss is not.
- Reconnects use capped exponential backoff with full jitter (floored at
  ``reconnect_min_s``). Each failed attempt logs one line saying why (refused,
  not authorized, TLS verification, DNS, timeout) and when it retries; paho's
  own messages are demoted to DEBUG. The password is never logged.
- ``protocol = "auto"`` tries MQTT 5 and falls back to 3.1.1 (for good) when
  the broker refuses the protocol version.
- Shutdown: when the subscription closes, the outbox is flushed for up to
  ``flush_timeout_s``, ``offline`` is published retained, and the client
  disconnects cleanly (so the will does not fire; the status is still right).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import ssl
import time
from collections import deque
from typing import Any

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from streamer.errors import ConfigError
from streamer.sinks.fanout import ALL_KINDS, PartialKey, Subscription, SubscriptionClosed
from streamer.sinks.mqtt_messages import (
    HERMES_FINAL_TOPIC,
    HERMES_PARTIAL_TOPIC,
    hermes_payload,
    messages_for,
)
from streamer.sinks.mqtt_settings import (
    PROTOCOLS,
    UNSUPPORTED_PROTOCOL,
    MqttSettings,
    describe_error,
    needs_operator,
    refusal_code,
    resolve_password,
)
from streamer.sinks.targets import TargetSelection
from streamer.types import Hypothesis

__all__ = [
    "HERMES_FINAL_TOPIC",
    "HERMES_PARTIAL_TOPIC",
    "PROTOCOLS",
    "STATUS_OFFLINE",
    "STATUS_ONLINE",
    "MqttSettings",
    "MqttSink",
    "describe_error",
    "hermes_payload",
    "resolve_password",
]

log = logging.getLogger(__name__)

STATUS_ONLINE = "online"
STATUS_OFFLINE = "offline"

# A connection that lasted less than this does not reset the backoff, so a
# broker that accepts and drops us at once is not hammered.
_STABLE_S = 10.0
# Bound on the goodbye (offline status + DISCONNECT) once flushing is over.
_GOODBYE_TIMEOUT_S = 2.0


class _DemoteToDebug(logging.Filter):
    """paho logs socket errors at ERROR; the sink already says why, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.levelno = logging.DEBUG
        record.levelname = "DEBUG"
        return True


_paho_log = logging.getLogger(f"{__name__}.paho")
_paho_log.addFilter(_DemoteToDebug())


class MqttSink:
    """Publishes caption events to an MQTT broker (see the module docstring).

    Wiring: ``sink = MqttSink(settings)``, then
    ``task = create_task(sink.run(fanout.subscribe(kinds=sink.kinds, targets=sink.targets,
    name="mqtt")))`` (the source and every translation target).
    Closing the subscription ends ``run`` after the outbox flush (at most
    ``flush_timeout_s`` plus a short goodbye). The state attributes below are
    for ``/metrics`` and ``/readyz``.
    """

    def __init__(
        self,
        settings: MqttSettings,
        *,
        rng: random.Random | None = None,
        run_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.run_id = run_id  # the daemon's run id, next to the status (None: not published)
        self._rng = rng or random.Random()
        if settings.tls:
            self._tls_context()  # fail fast (ConfigError) on unreadable CA/cert/key files
        self._outbox: deque[Hypothesis] = deque()
        self._inflight: Hypothesis | None = None  # final being published, not yet acked
        # newest unpublished partial per (stream, target)
        self._partials: dict[PartialKey, Hypothesis] = {}
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._overflow_warned = False
        self._use_v311 = settings.protocol == "3.1.1"
        self._running = False
        #: True while a broker session is up.
        self.connected = False
        #: "idle", "connecting", "connected", "disconnected" or "stopped".
        self.state = "idle"
        #: Why the last connection attempt failed or the connection ended; None if fine.
        self.last_error: str | None = None
        self.protocol_version: str | None = None  # "5" / "3.1.1" once connected
        self.published_partials = 0
        self.published_finals = 0
        self.dropped_partials = 0
        self.dropped_finals = 0
        self.reconnects = 0  # successful connects after the first
        self.connects = 0
        self.failed_attempts = 0

    # -- state for /metrics and /readyz ------------------------------------------

    @property
    def kinds(self) -> frozenset[str]:
        """The event kinds to subscribe with."""
        return ALL_KINDS if self.settings.partials else frozenset({"final"})

    @property
    def targets(self) -> TargetSelection:
        """The languages to subscribe with: all (targets have their own topics)."""
        return None

    @property
    def outbox_len(self) -> int:
        """Finals waiting for a completed publish (including the one in flight)."""
        return len(self._outbox) + (self._inflight is not None)

    def stats(self) -> dict[str, Any]:
        """Counters and state as one dict (metrics exporters, tests)."""
        return {
            "connected": self.connected,
            "state": self.state,
            "last_error": self.last_error,
            "protocol": self.protocol_version,
            "published_partials": self.published_partials,
            "published_finals": self.published_finals,
            "dropped_partials": self.dropped_partials,
            "dropped_finals": self.dropped_finals,
            "outbox": self.outbox_len,
            "reconnects": self.reconnects,
            "failed_attempts": self.failed_attempts,
        }

    def describe(self) -> str:
        """One line for ``/readyz`` detail."""
        where = self.settings.endpoint
        if self.connected:
            return f"mqtt {where}: connected (MQTT {self.protocol_version})"
        error = f" ({self.last_error})" if self.last_error else ""
        return f"mqtt {where}: {self.state}{error}, {self.outbox_len} finals queued"

    # -- consumer side -------------------------------------------------------------

    async def run(self, sub: Subscription) -> None:
        """Publish events from ``sub`` until it closes, then flush and disconnect."""
        if self._running:
            raise RuntimeError("MqttSink.run() is already running")
        self._running = True
        conn = asyncio.create_task(self._connection_loop(), name="mqtt-connection")
        try:
            while True:
                try:
                    event = await sub.get()
                except SubscriptionClosed:
                    break
                self._accept(event)
                while sub.pending:  # take the backlog in one go
                    self._accept(sub.get_nowait())
        except BaseException:
            sub.close("mqtt sink stopped")
            self._stop.set()
            conn.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await conn
            self._finish()
            raise
        sub.close("mqtt sink stopped")  # no-op after a normal end
        await self._shutdown(conn)

    def _accept(self, event: Hypothesis) -> None:
        """Queue one event; never waits."""
        key = (event.stream, event.target)
        if event.kind == "final":
            stale = self._partials.get(key)
            if stale is not None and stale.segment <= event.segment:
                del self._partials[key]
                self.dropped_partials += 1
            self._outbox.append(event)
            self._trim_outbox()
        else:
            if not self.settings.partials:
                return
            if not self.connected:
                self.dropped_partials += 1
                return
            if self._partials.pop(key, None) is not None:
                self.dropped_partials += 1  # superseded before it was sent
            self._partials[key] = event
        self._wake.set()

    def _trim_outbox(self) -> None:
        size = self.settings.outbox_size
        dropped = 0
        while len(self._outbox) > size:
            self._outbox.popleft()
            dropped += 1
        if not dropped:
            return
        self.dropped_finals += dropped
        if not self._overflow_warned:
            self._overflow_warned = True
            log.warning(
                "mqtt %s: outbox full (%d finals): dropping the oldest finals until the "
                "broker takes them again",
                self.settings.endpoint,
                size,
            )

    # -- shutdown ----------------------------------------------------------------------

    async def _shutdown(self, conn: asyncio.Task[None]) -> None:
        self._stop.set()
        self._wake.set()
        timeout = self.settings.flush_timeout_s
        try:
            done, _ = await asyncio.wait((conn,), timeout=timeout)
            if not done:  # cancelling still publishes "offline" when connected
                conn.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await conn
        finally:
            if not conn.done():
                conn.cancel()
            self._finish()
        if self.outbox_len:
            log.warning(
                "mqtt %s: %d finals not delivered at shutdown (flush timeout %.1f s)",
                self.settings.endpoint,
                self.outbox_len,
                timeout,
            )

    def _finish(self) -> None:
        self.connected = False
        self.state = "stopped"
        self._running = False

    # -- connection side -----------------------------------------------------------------

    def _tls_context(self) -> ssl.SSLContext:
        s = self.settings
        try:
            ctx = ssl.create_default_context(cafile=s.tls_ca or None)
            if s.tls_cert:
                ctx.load_cert_chain(s.tls_cert, s.tls_key or None)
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            files = ", ".join(p for p in (s.tls_ca, s.tls_cert, s.tls_key) if p)
            raise ConfigError(
                f"cannot load TLS files ({files}): {reason}", key="mqtt.tls"
            ) from None
        return ctx

    def _protocol(self) -> aiomqtt.ProtocolVersion:
        return aiomqtt.ProtocolVersion.V311 if self._use_v311 else aiomqtt.ProtocolVersion.V5

    def _make_client(self, tls_context: ssl.SSLContext | None) -> aiomqtt.Client:
        s = self.settings
        return aiomqtt.Client(
            s.host,
            s.port,
            identifier=s.client_id,
            username=s.username or None,
            password=s.password,
            protocol=self._protocol(),
            will=aiomqtt.Will(
                s.status_topic,
                STATUS_OFFLINE,
                qos=1,
                retain=True,
                properties=self._run_property(PacketTypes.WILLMESSAGE),
            ),
            keepalive=s.keepalive_s,
            timeout=s.timeout_s,
            tls_context=tls_context,
            logger=_paho_log,
        )

    async def _connection_loop(self) -> None:
        """Connect, serve, and reconnect with backoff until stopped and flushed."""
        failures = 0
        while True:
            if self._stop.is_set() and not self.outbox_len:
                return
            self.state = "connecting"
            lost = False
            try:
                await self._connect_and_serve()
                return  # clean stop: flushed, offline published, disconnected
            except _SessionEnded as exc:  # a session that was up ended
                lost = True
                error = describe_error(exc.cause, self.settings, connecting=False)
                if time.monotonic() - exc.started >= _STABLE_S:
                    failures = 0
            except Exception as exc:  # the connection could not be set up
                error = describe_error(exc, self.settings)
                self.failed_attempts += 1
            self._on_disconnected()
            self.last_error = error
            self.state = "disconnected"
            failures += 1
            delay = self._backoff(failures)
            level = logging.ERROR if needs_operator(error) else logging.WARNING
            if lost:
                log.log(
                    level,
                    "mqtt %s: connection lost (%s); %d finals queued; reconnecting in %.1f s",
                    self.settings.endpoint,
                    error,
                    self.outbox_len,
                    delay,
                )
            else:
                log.log(
                    level,
                    "mqtt %s: cannot connect: %s; retrying in %.1f s",
                    self.settings.endpoint,
                    error,
                    delay,
                )
            if self._stop.is_set():
                await asyncio.sleep(delay)
            else:  # a shutdown starting meanwhile ends the wait: try to flush at once
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)

    def _backoff(self, failures: int) -> float:
        """Full jitter: uniform in [min, min(max, min * 2**(failures-1))]."""
        s = self.settings
        cap = min(s.reconnect_max_s, s.reconnect_min_s * 2.0 ** min(failures - 1, 30))
        return self._rng.uniform(s.reconnect_min_s, cap)

    async def _connect_and_serve(self) -> None:
        """One session: returns after a clean stop; raises when it cannot start or ends.

        A session that was up and ended raises :class:`_SessionEnded`.
        """
        s = self.settings
        tls_context = await asyncio.to_thread(self._tls_context) if s.tls else None
        client = self._make_client(tls_context)
        try:
            await _enter(client)
        except MqttConnectError as exc:
            if not (
                s.protocol == "auto"
                and not self._use_v311
                and refusal_code(exc) == UNSUPPORTED_PROTOCOL
            ):
                raise
            self._use_v311 = True
            log.info("mqtt %s: broker does not speak MQTT 5; using 3.1.1", s.endpoint)
            client = self._make_client(tls_context)
            await _enter(client)
        started = time.monotonic()
        self._on_connected()
        try:
            if self.run_id is not None:
                await client.publish(s.run_topic, self.run_id, qos=1, retain=True)
            await self._publish_status(client, STATUS_ONLINE)
            await self._serve(client)
            client.timeout = _GOODBYE_TIMEOUT_S
            await self._publish_status(client, STATUS_OFFLINE)
        except asyncio.CancelledError:
            # Flush timeout at shutdown: still leave "offline" behind, briefly.
            client.timeout = _GOODBYE_TIMEOUT_S
            with contextlib.suppress(aiomqtt.MqttError):
                await self._publish_status(client, STATUS_OFFLINE)
            await self._close(client)
            raise
        except Exception as exc:
            cause = _disconnect_cause(client) or exc  # why the session ended, if known
            await self._close(client)
            raise _SessionEnded(cause, started) from exc
        await self._close(client)
        log.info("mqtt %s: disconnected (clean shutdown)", s.endpoint)

    def _run_property(self, packet_type: int) -> Properties | None:
        """MQTT 5 properties carrying the user property ("run", run id); None on 3.1.1."""
        if self.run_id is None or self._use_v311:
            return None
        properties = Properties(packet_type)  # type: ignore[no-untyped-call]
        properties.UserProperty = ("run", self.run_id)
        return properties

    async def _publish_status(self, client: aiomqtt.Client, status: str) -> None:
        properties = self._run_property(PacketTypes.PUBLISH)
        topic = self.settings.status_topic
        await client.publish(topic, status, qos=1, retain=True, properties=properties)

    async def _close(self, client: aiomqtt.Client) -> None:
        self._on_disconnected()
        await _quiet_exit(client)

    def _on_connected(self) -> None:
        s = self.settings
        self.connects += 1
        if self.connects > 1:
            self.reconnects += 1
        self.connected = True
        self.state = "connected"
        self.protocol_version = "3.1.1" if self._use_v311 else "5"
        self._overflow_warned = False
        queued = self.outbox_len
        failed = self.failed_attempts
        after = f" after {failed} failed attempts" if failed else ""
        log.info(
            "mqtt %s: connected as %r (MQTT %s)%s%s",
            s.endpoint,
            s.client_id,
            self.protocol_version,
            after,
            f"; sending {queued} queued finals" if queued else "",
        )
        self.last_error = None
        self.failed_attempts = 0

    def _on_disconnected(self) -> None:
        if self._inflight is not None:  # unacknowledged: send it again first
            self._outbox.appendleft(self._inflight)
            self._inflight = None
            self._trim_outbox()
        self.dropped_partials += len(self._partials)
        self._partials.clear()
        if self.connected:
            self.connected = False
            self.state = "disconnected"

    async def _serve(self, client: aiomqtt.Client) -> None:
        """Publish until stopped and flushed; raise MqttError when the connection ends."""
        watcher = asyncio.create_task(_watch(client), name="mqtt-watch")
        publisher = asyncio.create_task(self._publish_loop(client), name="mqtt-publish")
        try:
            done, _ = await asyncio.wait((watcher, publisher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (watcher, publisher):
                task.cancel()
            await asyncio.gather(watcher, publisher, return_exceptions=True)
        if watcher in done:  # the connection ended (more telling than a failed publish)
            watcher.result()
            raise aiomqtt.MqttError("connection closed")
        publisher.result()

    async def _publish_loop(self, client: aiomqtt.Client) -> None:
        while True:
            if self._inflight is None and self._outbox:
                self._inflight = self._outbox.popleft()
            event = self._inflight
            if event is not None:
                try:
                    await self._publish_event(client, event)
                    self.published_finals += 1
                except (ValueError, TypeError) as exc:  # unpublishable: do not retry forever
                    log.error("mqtt: final seq %d dropped: %s", event.seq, exc)
                    self.dropped_finals += 1
                self._inflight = None
                if not self._outbox:
                    self._overflow_warned = False
                continue
            if self._partials:
                event = self._partials.pop(next(iter(self._partials)))
                try:
                    await self._publish_event(client, event)
                except (ValueError, TypeError) as exc:
                    log.error("mqtt: partial seq %d dropped: %s", event.seq, exc)
                    self.dropped_partials += 1
                    continue
                except BaseException:
                    self.dropped_partials += 1
                    raise
                self.published_partials += 1
                continue
            if self._stop.is_set():
                return
            self._wake.clear()
            await self._wake.wait()

    async def _publish_event(self, client: aiomqtt.Client, event: Hypothesis) -> None:
        s = self.settings
        expiry: Properties | None = None
        if not self._use_v311 and s.partial_expiry_s > 0:
            expiry = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            expiry.MessageExpiryInterval = s.partial_expiry_s
        for message in messages_for(s, event):
            properties = expiry if message.expires else None
            await client.publish(message.topic, message.payload, qos=message.qos,
                                 properties=properties)  # fmt: skip


class _SessionEnded(Exception):
    """A session that was up ended with ``cause``; ``started`` is its monotonic start."""

    def __init__(self, cause: BaseException, started: float) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.started = started


async def _enter(client: aiomqtt.Client) -> None:
    """Connect (``async with`` entry).

    Cancelled meanwhile (shutdown), the attempt is left to finish by itself
    (bounded by ``timeout_s``) and a late connection is closed: cancelling
    aiomqtt's CONNACK wait would leave a cancelled future that paho's
    callbacks trip over.
    """
    attempt = asyncio.ensure_future(client.__aenter__())
    try:
        await asyncio.shield(attempt)
    except asyncio.CancelledError:
        attempt.add_done_callback(functools.partial(_close_abandoned, client))
        raise
    except aiomqtt.MqttError:
        # After a CONNACK timeout aiomqtt leaves the socket open; this closes it.
        client.timeout = 0.1
        with contextlib.suppress(aiomqtt.MqttError):
            await client.__aexit__(None, None, None)
        raise


_abandoned: set[asyncio.Task[None]] = set()  # strong references until they finish


def _close_abandoned(client: aiomqtt.Client, attempt: asyncio.Future[Any]) -> None:
    if attempt.cancelled() or attempt.exception() is not None:
        return  # never connected (the exception is retrieved, so never reported)
    task = attempt.get_loop().create_task(_quiet_exit(client))
    _abandoned.add(task)
    task.add_done_callback(_abandoned.discard)


async def _quiet_exit(client: aiomqtt.Client) -> None:
    client.timeout = _GOODBYE_TIMEOUT_S
    with contextlib.suppress(aiomqtt.MqttError):
        await client.__aexit__(None, None, None)
    _disconnect_cause(client)


async def _watch(client: aiomqtt.Client) -> None:
    """Return never; raise MqttError once the connection ends (aiomqtt's public signal)."""
    async for _ in client.messages:  # nothing is subscribed: this only waits
        pass


def _disconnect_cause(client: aiomqtt.Client) -> BaseException | None:
    """The exception aiomqtt recorded when the connection dropped.

    Reading it also marks it retrieved (no "Future exception was never retrieved").

    aiomqtt keeps it in a private future; read defensively so an aiomqtt
    update can only make the log line vaguer, never break the sink.
    """
    fut = getattr(client, "_disconnected", None)
    if isinstance(fut, asyncio.Future) and fut.done() and not fut.cancelled():
        return fut.exception()
    return None
