"""MQTT sink: captions for IoT devices, with no final lost across broker outages.

Topics (``prefix`` defaults to ``streamer``)::

    {prefix}/{stream}/partial   QoS partial_qos (0), not retained, MQTT 5 message expiry
    {prefix}/{stream}/final     QoS final_qos (1), not retained
    {prefix}/status             retained "online" after each connect; "offline" as the
                                last will (unclean loss) and before a clean disconnect;
                                on MQTT 5 each carries the user property ("run", run id)
    {prefix}/status/run         retained run id of the daemon (random per process start),
                                published before "online" (for MQTT 3.1.1 consumers too)
    hermes/asr/partialTextCaptured, hermes/asr/textCaptured   (optional Hermes mode)

The payload is the WebSocket event, ``json.dumps(event.to_wire())`` (DESIGN.md
section 4); ``seq`` lets subscribers drop QoS 1 duplicates.

Design: :meth:`MqttSink.run` takes events from its fanout subscription at once
(it never leaves finals there, so the fanout never disconnects it as slow) and
hands them to a connection task that owns the broker. The event loop never
waits for the broker; aiomqtt runs the blocking connect in a thread.

- While disconnected, partials are dropped (counted); finals wait in a bounded
  outbox (full: the oldest is dropped, counted, and warned about once per
  outage) and are published in order after reconnecting.
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
import json
import logging
import os
import random
import re
import socket
import ssl
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from streamer.errors import ConfigError
from streamer.sinks.fanout import ALL_KINDS, Subscription, SubscriptionClosed
from streamer.types import Hypothesis

__all__ = [
    "HERMES_FINAL_TOPIC",
    "HERMES_PARTIAL_TOPIC",
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
HERMES_PARTIAL_TOPIC = "hermes/asr/partialTextCaptured"
HERMES_FINAL_TOPIC = "hermes/asr/textCaptured"
PROTOCOLS = ("auto", "5", "3.1.1")

# A connection that lasted less than this does not reset the backoff, so a
# broker that accepts and drops us at once is not hammered.
_STABLE_S = 10.0
# Bound on the goodbye (offline status + DISCONNECT) once flushing is over.
_GOODBYE_TIMEOUT_S = 2.0
_TOPIC_UNSAFE = re.compile(r"[+#/\x00]")

# CONNACK reason codes (MQTT 5 values; paho maps 3.1.1 return codes onto them).
_REFUSALS: dict[int, str] = {
    132: "unsupported protocol version",
    133: "client id rejected",
    134: "bad username or password",
    135: "not authorized (check username, password and the broker's ACL)",
    136: "server unavailable",
    137: "server busy",
    138: "banned",
    140: "bad authentication method",
    159: "connection rate exceeded",
}
_UNSUPPORTED_PROTOCOL = 132
_SESSION_TAKEN_OVER = 142


def _default_client_id() -> str:
    return f"streamer-{socket.gethostname()}"


class _DemoteToDebug(logging.Filter):
    """paho logs socket errors at ERROR; the sink already says why, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.levelno = logging.DEBUG
        record.levelname = "DEBUG"
        return True


_paho_log = logging.getLogger(f"{__name__}.paho")
_paho_log.addFilter(_DemoteToDebug())


@dataclass(frozen=True)
class MqttSettings:
    """Broker, credentials, topics and delivery policy of the MQTT sink.

    ``password`` is the resolved secret (see :func:`resolve_password`); it is
    left out of ``repr`` so it never reaches a log. Invalid values raise
    :class:`~streamer.errors.ConfigError` naming the ``mqtt.*`` key.
    """

    host: str = "localhost"
    port: int = 1883
    client_id: str = field(default_factory=_default_client_id)
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    tls_ca: str = ""  # "" with tls: the system CA store
    tls_cert: str = ""  # client certificate (PEM); may hold the key too
    tls_key: str = ""
    protocol: str = "auto"  # "auto" | "5" | "3.1.1"
    prefix: str = "streamer"
    partials: bool = True
    partial_qos: int = 0
    final_qos: int = 1
    partial_expiry_s: int = 5  # MQTT 5 message expiry of partials; 0 = none
    keepalive_s: int = 30
    timeout_s: float = 10.0  # CONNACK / PUBACK wait
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    outbox_size: int = 1000
    flush_timeout_s: float = 5.0
    hermes: bool = False
    hermes_site_id: str = ""  # "" = the stream name

    def __post_init__(self) -> None:
        def bad(key: str, message: str) -> ConfigError:
            return ConfigError(message, key=f"mqtt.{key}")

        if not self.host:
            raise bad("host", "must not be empty")
        if not 1 <= self.port <= 65535:
            raise bad("port", f"must be 1..65535, got {self.port}")
        if not self.client_id or len(self.client_id.encode()) > 65535:
            raise bad("client_id", "must be a non-empty string")
        if self.password is not None and not self.username:
            raise bad("password", "a password needs a username (MQTT sends none without one)")
        if self.protocol not in PROTOCOLS:
            raise bad("protocol", f"must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if not self.tls and (self.tls_ca or self.tls_cert or self.tls_key):
            raise bad("tls", "tls_ca/tls_cert/tls_key are set but tls = false")
        if self.tls_key and not self.tls_cert:
            raise bad("tls_key", "needs tls_cert")
        prefix = self.prefix
        if not prefix or prefix.startswith("/") or prefix.endswith("/"):
            raise bad("prefix", f"must be non-empty without leading/trailing '/', got {prefix!r}")
        if "+" in prefix or "#" in prefix or "\x00" in prefix:
            raise bad("prefix", "must not contain the wildcards '+' or '#'")
        for key in ("partial_qos", "final_qos"):
            if getattr(self, key) not in (0, 1, 2):
                raise bad(key, f"must be 0, 1 or 2, got {getattr(self, key)!r}")
        if self.partial_expiry_s < 0:
            raise bad("partial_expiry_s", "must be >= 0")
        if self.keepalive_s < 5:
            raise bad("keepalive_s", "must be at least 5")
        if self.timeout_s <= 0:
            raise bad("timeout_s", "must be > 0")
        if self.reconnect_min_s <= 0:
            raise bad("reconnect_min_s", "must be > 0")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise bad("reconnect_max_s", "must be >= reconnect_min_s")
        if self.outbox_size < 1:
            raise bad("outbox_size", "must be at least 1")
        if self.flush_timeout_s < 0:
            raise bad("flush_timeout_s", "must be >= 0")

    @property
    def endpoint(self) -> str:
        """``mqtt[s]://host:port`` for log lines (no credentials)."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    @property
    def status_topic(self) -> str:
        return f"{self.prefix}/status"

    @property
    def run_topic(self) -> str:
        """Retained run id of the daemon (next to the status)."""
        return f"{self.prefix}/status/run"

    def topic(self, stream: str, kind: str) -> str:
        """``{prefix}/{stream}/{kind}``; ``/ + #`` in a stream name become ``_``."""
        return f"{self.prefix}/{_TOPIC_UNSAFE.sub('_', stream) or '_'}/{kind}"


def resolve_password(
    password: str, password_file: str, credential: str = "mqtt-password"
) -> str | None:
    """The broker password: explicit, else ``password_file``, else a systemd credential.

    The credential is ``$CREDENTIALS_DIRECTORY/<credential>`` (``LoadCredential=``),
    used only when that file exists. One trailing newline is stripped from a
    file. Returns None when no source gives a password.
    """
    if password:
        return password
    if password_file:
        return _read_secret(Path(password_file), "mqtt.password_file")
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds:
        path = Path(creds) / credential
        if path.exists():  # empty: the unit's SetCredential= fallback, i.e. none given
            return _read_secret(path, f"$CREDENTIALS_DIRECTORY/{credential}") or None
    return None


def _read_secret(path: Path, key: str) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"cannot read password file: {reason}", file=str(path), key=key) from None
    if text.endswith("\r\n"):
        return text[:-2]
    return text.removesuffix("\n")


def hermes_payload(event: Hypothesis, site_id: str = "") -> dict[str, Any]:
    """Rhasspy/Snips Hermes ``AsrTextCaptured`` JSON for ``event``.

    Fields as rhasspy-hermes writes them: ``text``, ``likelihood`` (1.0: the
    model gives no utterance confidence), ``seconds`` (processing time, from
    ``latency_ms``), ``siteId`` (``site_id`` or the stream name), ``sessionId``
    (null: no dialogue session), ``wakewordId`` (null), ``asrTokens`` (one
    list of whitespace tokens with character ranges) and ``lang``.
    """
    text = event.text.strip()
    tokens = [
        {
            "value": m.group(),
            "confidence": 1.0,
            "rangeStart": m.start(),
            "rangeEnd": m.end(),
            "time": None,
        }
        for m in re.finditer(r"\S+", text)
    ]
    seconds = 0.0 if event.latency_ms is None else round(event.latency_ms / 1000.0, 3)
    return {
        "text": text,
        "likelihood": 1.0,
        "seconds": seconds,
        "siteId": site_id or event.stream,
        "sessionId": None,
        "wakewordId": None,
        "asrTokens": [tokens],
        "lang": event.lang,
    }


def _innermost(exc: BaseException) -> BaseException:
    seen = {id(exc)}
    while exc.__cause__ is not None and id(exc.__cause__) not in seen:
        exc = exc.__cause__
        seen.add(id(exc))
    return exc


def _refusal_code(exc: BaseException) -> int | None:
    """The CONNACK reason code of a refused connection, else None."""
    if not isinstance(exc, MqttConnectError):
        return None
    rc = exc.rc
    if isinstance(rc, ReasonCode):
        return int(rc.value)
    if isinstance(rc, int):  # MQTT 3.1.1 return codes
        return {1: 132, 2: 133, 3: 136, 4: 134, 5: 135}.get(rc, 128)
    return None


def describe_error(
    exc: BaseException, settings: MqttSettings | None = None, *, connecting: bool = True
) -> str:
    """One human line for a failed connect (or, ``connecting=False``, an ended session).

    No traceback, no secrets: the texts come from the socket, TLS and CONNACK layers.
    """
    code = _refusal_code(exc)
    if code is not None:
        why = _REFUSALS.get(code) or str(getattr(exc, "rc", "")) or "error"
        return f"broker refused the connection: {why} (code {code})"
    if isinstance(exc, ConfigError):
        return str(exc)
    inner = _innermost(exc)
    text = str(inner) or type(inner).__name__
    host = settings.host if settings else "the broker"
    if "CERTIFICATE_VERIFY_FAILED" in text:
        why = text.split("certificate verify failed:", 1)[-1].split("(_ssl.c", 1)[0].strip()
        return f"TLS certificate verification failed: {why or text}"
    if "[SSL" in text or isinstance(inner, ssl.SSLError):
        return f"TLS error: {text}"
    if "Errno 111" in text or "Connection refused" in text:
        return "connection refused (is the broker running and listening on this port?)"
    if "Errno -" in text or "Name or service not known" in text or "name resolution" in text:
        return f"DNS lookup of {host!r} failed: {text.split('] ', 1)[-1]}"
    if "timed out" in text.lower():
        hint = " (wrong port, or a TLS port without tls = true?)" if connecting else ""
        return f"no answer from the broker: {text}{hint}"
    if isinstance(inner, aiomqtt.MqttCodeError):  # the session ended
        rc = inner.rc
        value = int(rc.value) if isinstance(rc, ReasonCode) else rc
        if value == _SESSION_TAKEN_OVER:
            return "session taken over: another client connected with the same client_id"
        if value in (4, 7, 128, None):  # paho: no connection / connection lost / unspecified
            return "connection lost"
        return f"disconnected by the broker: {rc}"
    return text


class MqttSink:
    """Publishes caption events to an MQTT broker (see the module docstring).

    Wiring: ``sink = MqttSink(settings)``, then
    ``task = create_task(sink.run(fanout.subscribe(kinds=sink.kinds, name="mqtt")))``.
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
        self._partials: dict[str, Hypothesis] = {}  # newest unpublished partial per stream
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
        if event.kind == "final":
            stale = self._partials.get(event.stream)
            if stale is not None and stale.segment <= event.segment:
                del self._partials[event.stream]
                self.dropped_partials += 1
            self._outbox.append(event)
            self._trim_outbox()
        else:
            if not self.settings.partials:
                return
            if not self.connected:
                self.dropped_partials += 1
                return
            if self._partials.pop(event.stream, None) is not None:
                self.dropped_partials += 1  # superseded before it was sent
            self._partials[event.stream] = event
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
            level = logging.ERROR if _needs_operator(error) else logging.WARNING
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
                and _refusal_code(exc) == _UNSUPPORTED_PROTOCOL
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
                stream = next(iter(self._partials))
                event = self._partials.pop(stream)
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
        payload = json.dumps(event.to_wire(), ensure_ascii=False)
        properties: Properties | None = None
        if event.kind == "final":
            qos = s.final_qos
        else:
            qos = s.partial_qos
            if not self._use_v311 and s.partial_expiry_s > 0:
                properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                properties.MessageExpiryInterval = s.partial_expiry_s
        await client.publish(
            s.topic(event.stream, event.kind), payload, qos=qos, properties=properties
        )
        if s.hermes and event.text:  # an empty final (retracted partials) is no utterance
            topic = HERMES_FINAL_TOPIC if event.kind == "final" else HERMES_PARTIAL_TOPIC
            body = json.dumps(hermes_payload(event, s.hermes_site_id), ensure_ascii=False)
            await client.publish(topic, body, qos=qos, properties=properties)


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


def _needs_operator(error: str) -> bool:
    """Failures that waiting will not fix (credentials, certificates)."""
    return error.startswith(("broker refused", "TLS")) or "cannot load TLS" in error
