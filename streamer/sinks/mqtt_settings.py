"""MQTT sink settings, and what to tell the operator when the broker will not have us.

Split from :mod:`streamer.sinks.mqtt` (the sink and its connection loop):
these are the parts that speak to the person who configured the sink: the
validated ``[mqtt]`` values (:class:`MqttSettings`, errors naming the
``mqtt.*`` key), the password sources (:func:`resolve_password`), and one
readable line per failed connection (:func:`describe_error`), never with a
secret in it.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.reasoncodes import ReasonCode

from streamer.errors import ConfigError

__all__ = [
    "PROTOCOLS",
    "MqttSettings",
    "describe_error",
    "needs_operator",
    "refusal_code",
    "resolve_password",
]

PROTOCOLS = ("auto", "5", "3.1.1")

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
UNSUPPORTED_PROTOCOL = 132
_SESSION_TAKEN_OVER = 142


def _default_client_id() -> str:
    return f"streamer-{socket.gethostname()}"


#: A daemon's name among several on one broker (``[mqtt] node``).
_NODE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


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
    node: str = ""  # several daemons on one broker: each its own status topic
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
        if self.node and (not _NODE.fullmatch(self.node) or self.node == "run"):
            raise bad("node", f"must match {_NODE.pattern} and not be 'run', got {self.node!r}")
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
        """``{prefix}/status``, or ``{prefix}/status/{node}``: daemons sharing a broker
        and a prefix would otherwise overwrite each other's retained status and will."""
        return f"{self.prefix}/status/{self.node}" if self.node else f"{self.prefix}/status"

    @property
    def run_topic(self) -> str:
        """Retained run id of the daemon (next to the status)."""
        return f"{self.status_topic}/run"

    def topic(self, stream: str, kind: str, target: str | None = None) -> str:
        """``{prefix}/{stream}/{kind}``, or ``{prefix}/{stream}/{target}/{kind}`` for a
        translation target's events; ``/ + #`` in a stream name become ``_``."""
        name = _TOPIC_UNSAFE.sub("_", stream) or "_"
        if target is None:
            return f"{self.prefix}/{name}/{kind}"
        return f"{self.prefix}/{name}/{_TOPIC_UNSAFE.sub('_', target) or '_'}/{kind}"


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


def _innermost(exc: BaseException) -> BaseException:
    seen = {id(exc)}
    while exc.__cause__ is not None and id(exc.__cause__) not in seen:
        exc = exc.__cause__
        seen.add(id(exc))
    return exc


def refusal_code(exc: BaseException) -> int | None:
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
    code = refusal_code(exc)
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


def needs_operator(error: str) -> bool:
    """Failures that waiting will not fix (credentials, certificates)."""
    return error.startswith(("broker refused", "TLS")) or "cannot load TLS" in error
