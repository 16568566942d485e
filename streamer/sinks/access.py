"""Who may connect to the caption server, and how many at once.

:class:`~streamer.sinks.websocket.CaptionServer` applies these, cheapest first:

1. :class:`ConnectionGate`: open TCP connections stay below the file
   descriptor limit (:func:`connection_limit`). At the cap, a new connection
   evicts the oldest one that has not sent its request yet (an idle socket),
   never an established stream; with none to evict it is closed at once,
   before anything is read. :class:`AcceptErrorFilter` turns asyncio's
   accept-error traceback (EMFILE/ENFILE), should it still happen, into one
   line per interval.
2. Host (DNS rebinding): a page on ``http://evil.example:8765`` whose name
   resolves to 127.0.0.1 is same-origin with the daemon in the browser. On a
   server bound to loopback only, a request whose ``Host`` is not a loopback
   name or address (``localhost``, ``127.x.x.x``, ``[::1]``) or one of
   ``server_names`` is refused on every route (HTTP 421).
3. Origin (:meth:`AccessPolicy.origin_allowed`): browsers always send one
   with a WebSocket; no Origin means not a browser and passes. Otherwise only
   the daemon's own page (Origin equal to ``scheme://Host`` where the Host is
   trusted as above, so a spoofed Host does not make an origin "own"), an
   entry of ``allowed_origins`` or ``*`` passes; others get 403.
4. Token: a wrong ``Authorization: Bearer`` header answers 401 (plain HTTP
   routes need the header). A WebSocket without it (browsers cannot set
   headers) must authenticate with its first message; until then it sits in
   the :class:`UnauthenticatedPool`, at most ``max_unauthenticated`` in all
   and ``max_unauthenticated_per_address`` per client address (beyond: 503,
   or 429 for the address cap, before the upgrade), and the server closes it
   with 1008 "authentication timed out" after ``auth_timeout`` seconds unless
   its handler called :meth:`AccessControl.authenticated`. Per-endpoint
   slots (``max_subscribers``, ``max_streams``) are counted only once a
   connection is authenticated, so unauthenticated clients never hold them.

:class:`AccessControl` holds the state (gate, pool, who authenticated) and
runs the checks for the server; refusals go to ``on_reject(endpoint,
reason)`` (the metrics). Tokens are compared in constant time, never logged.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import re
import resource
import socket
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Generic, Literal, TypeVar

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

__all__ = [
    "ACCEPT_ERROR",
    "REASON_AUTH_TIMEOUT",
    "REASON_HOST",
    "REASON_UNAUTHENTICATED_LIMIT",
    "AcceptErrorFilter",
    "AccessControl",
    "AccessPolicy",
    "ConnectionGate",
    "Throttle",
    "UnauthenticatedPool",
    "connection_limit",
    "install_accept_error_filter",
    "is_ip_literal",
    "is_loopback",
    "parse_host",
    "peer",
]

log = logging.getLogger("streamer.sinks.websocket")

#: Told about every refused connection: (endpoint, reason).
RejectHook = Callable[[str, str], None]
#: ``reason`` labels for refusals that the metrics vocabulary
#: (:data:`streamer.service.metrics.REJECT_REASONS`) has no word of their own for.
REASON_HOST = "origin"  # Host not a name of this server (421)
REASON_UNAUTHENTICATED_LIMIT = "limit"  # unauthenticated pool full (503/429)
REASON_AUTH_TIMEOUT = "auth"  # no auth message within auth_timeout (1008)

#: Names that always mean this machine (``*.localhost`` too, RFC 6761).
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
#: File descriptors kept free for model files, MQTT, logs, pipes: at least this many...
FD_RESERVE_MIN = 64
#: ... plus asyncio's accept burst: it accepts up to ``backlog`` (100) sockets
#: per wake-up before the first one reaches the gate.
ACCEPT_BURST = 100
#: The start of asyncio's log message when ``accept()`` fails for lack of resources.
ACCEPT_ERROR = "socket.accept() out of system resource"

_HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?")
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _ip(name: str) -> _Address | None:
    try:
        ip = ipaddress.ip_address(name.split("%", 1)[0])  # drop an IPv6 zone
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def parse_host(value: str) -> str | None:
    """The name of a ``Host`` header: lower case, no port or brackets; None if malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        if not bracket or _ip(name) is None or (rest and not re.fullmatch(r":\d{1,5}", rest)):
            return None
        return name
    name, colon, port = value.partition(":")
    if colon and not re.fullmatch(r"\d{1,5}", port):
        return None
    name = name.rstrip(".")
    return name if _HOST_NAME.fullmatch(name) else None


def is_loopback(name: str) -> bool:
    """A loopback name (``localhost``, ``*.localhost``) or address (127/8, ::1)."""
    name = name.lower().rstrip(".")
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    ip = _ip(name)
    return ip is not None and ip.is_loopback


def is_ip_literal(name: str) -> bool:
    """An address, not a name: DNS rebinding needs a name the attacker controls."""
    return _ip(name) is not None


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    """Who may connect: a bearer token (None: anyone), allowed Origins, trusted host names.

    ``allowed_origins`` holds exact origins (``https://host:port``) or ``*``
    (any page); the daemon's own page needs no entry. ``server_names`` are
    extra names the server is reached by (``Host``), besides the loopback ones.
    WebSockets that must still authenticate with their first message are
    capped (``max_unauthenticated`` in all, ``max_unauthenticated_per_address``
    per client address) and closed after ``auth_timeout`` seconds.
    """

    token: str | None = None
    allowed_origins: frozenset[str] = frozenset()
    server_names: frozenset[str] = frozenset()
    auth_timeout: float = 5.0
    max_unauthenticated: int = 16
    max_unauthenticated_per_address: int = 4

    def __post_init__(self) -> None:
        lower = frozenset(o.lower().rstrip("/") for o in self.allowed_origins)
        object.__setattr__(self, "allowed_origins", lower)
        names = frozenset(n.lower().strip("[]").rstrip(".") for n in self.server_names)
        object.__setattr__(self, "server_names", names)

    def __repr__(self) -> str:  # never show the token
        shown = "set" if self.token else "none"
        return (
            f"AccessPolicy(token={shown}, allowed_origins={sorted(self.allowed_origins)}, "
            f"server_names={sorted(self.server_names)})"
        )

    def token_matches(self, candidate: str | None) -> bool:
        """Constant-time comparison; False when no token is configured or none given."""
        if self.token is None or candidate is None:
            return False
        return hmac.compare_digest(candidate.encode(), self.token.encode())

    def host_trusted(
        self, name: str, *, loopback_only: bool, local_names: frozenset[str] = frozenset()
    ) -> bool:
        """``Host`` name ``name`` (see :func:`parse_host`) is a name of this server.

        Loopback names and addresses and ``server_names`` always are. On a
        server reachable from elsewhere (``loopback_only`` False) so are IP
        addresses and ``local_names`` (the machine's own host name).
        """
        if is_loopback(name) or name in self.server_names:
            return True
        return not loopback_only and (is_ip_literal(name) or name in local_names)

    def origin_allowed(self, origin: str | None, own_origin: str | None) -> bool:
        """No Origin (not a browser), the daemon's own page, a listed origin or ``*``."""
        if origin is None:
            return True
        origin = origin.strip().lower()
        if own_origin is not None and origin == own_origin:
            return True
        return "*" in self.allowed_origins or origin in self.allowed_origins


class Throttle:
    """At most one report per ``interval`` seconds; counts the ones it held back."""

    def __init__(self, interval: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self.clock = clock
        self._last: float | None = None
        self.suppressed = 0

    def ready(self) -> int | None:
        """None: hold this one back; else report it with this many held back since."""
        now = self.clock()
        if self._last is not None and now - self._last < self.interval:
            self.suppressed += 1
            return None
        self._last = now
        held, self.suppressed = self.suppressed, 0
        return held


class AcceptErrorFilter(logging.Filter):
    """Lets one asyncio accept-error record through per interval, as one line.

    asyncio logs every failed ``accept()`` (EMFILE: out of file descriptors)
    with a traceback; under a connection flood that is thousands of lines.
    """

    def __init__(self, interval: float = 10.0, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.throttle = Throttle(interval, clock)

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(ACCEPT_ERROR):
            return True
        held = self.throttle.ready()
        if held is None:
            return False
        exc = record.exc_info[1] if record.exc_info else None
        record.msg = "%s: %s (asyncio pauses accepting for 1 s; %d more in the last %g s)"
        record.args = (ACCEPT_ERROR, exc, held, self.throttle.interval)
        record.exc_info = None
        record.exc_text = None
        return True


def install_accept_error_filter(logger: logging.Logger | None = None) -> AcceptErrorFilter:
    """Add the one :class:`AcceptErrorFilter` to the ``asyncio`` logger (idempotent)."""
    logger = logger or logging.getLogger("asyncio")
    for existing in logger.filters:
        if isinstance(existing, AcceptErrorFilter):
            return existing
    installed = AcceptErrorFilter()
    logger.addFilter(installed)
    return installed


def connection_limit(fd_limit: int | None = None) -> int:
    """Connections the server may hold: the fd limit (``RLIMIT_NOFILE``) minus a reserve.

    The reserve is max(64, 10 %) for everything else the daemon opens plus
    asyncio's accept burst, so that ``accept()`` itself does not run out.
    """
    if fd_limit is None:
        fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if fd_limit == resource.RLIM_INFINITY or fd_limit <= 0:
            fd_limit = 1 << 20
    reserve = max(FD_RESERVE_MIN, fd_limit // 10) + ACCEPT_BURST
    return max(8, fd_limit - reserve)


class ConnectionGate:
    """Caps open TCP connections; see the module docstring (1).

    :meth:`opened` for every new connection, :meth:`busy` once it is upgraded
    to a WebSocket (never evicted from then on); a connection leaves when it is
    lost. One answered with plain HTTP stays evictable while the client has
    not closed it yet.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: set[ServerConnection] = set()
        self._idle: dict[ServerConnection, None] = {}  # arrival order: oldest first
        self.refused = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._open)

    def opened(self, conn: ServerConnection) -> bool:
        """Admit ``conn`` (evicting the oldest idle one at the cap) or close it: False."""
        if len(self._open) >= self.limit:
            victim = next(iter(self._idle), None)
            if victim is None:
                self.refused += 1
                conn.transport.abort()
                return False
            self.evicted += 1
            self._forget(victim)
            victim.transport.abort()
        self._open.add(conn)
        self._idle[conn] = None
        conn.connection_lost_waiter.add_done_callback(lambda _: self._forget(conn))
        return True

    def busy(self, conn: ServerConnection) -> None:
        self._idle.pop(conn, None)

    def connections(self) -> set[ServerConnection]:
        """Every open connection (upgraded or not)."""
        return set(self._open)

    def _forget(self, conn: ServerConnection) -> None:
        self._open.discard(conn)
        self._idle.pop(conn, None)


K = TypeVar("K", bound=Hashable)


class UnauthenticatedPool(Generic[K]):
    """WebSockets that have not shown the token yet: capped, each with a deadline.

    :meth:`admit` before the upgrade; :meth:`release` once authenticated (or
    gone). A connection still here after ``timeout`` seconds is handed to
    ``on_expire`` (the server closes it with 1008).
    """

    def __init__(
        self, limit: int, per_address: int, timeout: float, on_expire: Callable[[K, str], None]
    ) -> None:
        self.limit = limit
        self.per_address = per_address
        self.timeout = timeout
        self.on_expire = on_expire
        self._entries: dict[K, tuple[str, str, asyncio.TimerHandle]] = {}
        self._by_address: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def admit(self, key: K, address: str, endpoint: str) -> Literal["total", "address"] | None:
        """Add ``key``; or say which cap is full ("total", "address") and add nothing."""
        if key in self._entries:
            return None
        if len(self._entries) >= self.limit:
            return "total"
        if self._by_address[address] >= self.per_address:
            return "address"
        handle = asyncio.get_running_loop().call_later(self.timeout, self._expire, key)
        self._entries[key] = (address, endpoint, handle)
        self._by_address[address] += 1
        return None

    def release(self, key: K) -> bool:
        """Remove ``key`` and cancel its deadline; False when it was not here."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        address, _, handle = entry
        handle.cancel()
        self._by_address[address] -= 1
        if self._by_address[address] <= 0:
            del self._by_address[address]
        return True

    def clear(self) -> None:
        for key in list(self._entries):
            self.release(key)

    def _expire(self, key: K) -> None:
        entry = self._entries.get(key)
        if entry is not None and self.release(key):
            self.on_expire(key, entry[1])


class AccessControl:
    """The access state of one server and the checks it runs before the upgrade.

    ``on_reject(endpoint, reason)`` counts refusals; ``on_expire(conn,
    endpoint)`` closes a connection whose authentication deadline passed.
    ``max_connections`` None: from the file descriptor limit at :meth:`bound`.
    """

    def __init__(
        self,
        policy: AccessPolicy,
        *,
        tls: bool,
        on_reject: RejectHook,
        on_expire: Callable[[ServerConnection, str], None],
        max_connections: int | None = None,
    ) -> None:
        self.policy = policy
        self.scheme = "https" if tls else "http"
        self.on_reject = on_reject
        self.max_connections = max_connections
        self.gate = ConnectionGate(max_connections or connection_limit())
        self.pool: UnauthenticatedPool[ServerConnection] = UnauthenticatedPool(
            policy.max_unauthenticated,
            policy.max_unauthenticated_per_address,
            policy.auth_timeout,
            on_expire,
        )
        self.loopback_only = True  # every bound address is a loopback one
        self.local_names: frozenset[str] = frozenset()
        self._authenticated: set[ServerConnection] = set()  # by header or authenticated()
        self._gate_log = Throttle()

    def bound(self, addresses: Iterable[str], host: str) -> None:
        """The server listens on ``addresses`` (configured as ``host``); re-reads the fd limit."""
        self.gate.limit = self.max_connections or connection_limit()
        install_accept_error_filter()
        self.loopback_only = all(is_loopback(address) for address in addresses)
        if not self.loopback_only:  # reachable by the machine's own name too
            name = socket.gethostname().lower()
            self.local_names = frozenset({name, f"{name}.local", host.lower()})

    def connection_made(self, conn: ServerConnection) -> None:
        before = (self.gate.refused, self.gate.evicted)
        self.gate.opened(conn)
        if (self.gate.refused, self.gate.evicted) != before and self._gate_log.ready() is not None:
            log.warning(
                "connection limit (%d, below the file descriptor limit) reached: "
                "closing idle connections; %d refused, %d evicted so far",
                self.gate.limit, self.gate.refused, self.gate.evicted,
            )  # fmt: skip

    def needs_auth_message(self, conn: ServerConnection) -> bool:
        return self.policy.token is not None and conn not in self._authenticated

    def authenticated(self, conn: ServerConnection) -> None:
        self.pool.release(conn)
        if conn not in self._authenticated:
            self._authenticated.add(conn)
            conn.connection_lost_waiter.add_done_callback(
                lambda _: self._authenticated.discard(conn)
            )

    def trusted_host(self, request: Request) -> str | None:
        """The request's ``Host`` header when it names this server (lower case), else None."""
        host = request.headers.get("Host")
        name = parse_host(host) if host is not None else None
        if host is None or name is None:
            return None
        if not self.policy.host_trusted(
            name, loopback_only=self.loopback_only, local_names=self.local_names
        ):
            return None
        return host.strip().lower()

    def check_host(
        self, conn: ServerConnection, request: Request, endpoint: str | None
    ) -> Response | None:
        """Bound to loopback: refuse a Host that is not ours (DNS rebinding), on every route."""
        host = request.headers.get("Host")
        if not self.loopback_only or host is None or self.trusted_host(request) is not None:
            return None  # no Host: not a browser
        if endpoint is not None:
            self.on_reject(endpoint, REASON_HOST)
        log.info("refused %s from %s: Host %r is not a name of this server",
                 request.path.split("?")[0][:100], peer(conn), host[:100])  # fmt: skip
        return conn.respond(HTTPStatus.MISDIRECTED_REQUEST, "unknown host\n")

    def check(
        self, conn: ServerConnection, request: Request, endpoint: str, websocket: bool
    ) -> Response | None:
        """Origin, bearer header, unauthenticated pool; None lets the request through."""
        origin = request.headers.get("Origin")
        host = self.trusted_host(request)
        own = None if host is None else f"{self.scheme}://{host}"
        if not self.policy.origin_allowed(origin, own):
            self.on_reject(endpoint, "origin")
            log.info("refused %s from %s: origin %r not allowed", endpoint, peer(conn), origin)
            return conn.respond(HTTPStatus.FORBIDDEN, "origin not allowed\n")
        if self.policy.token is None:
            return None
        header = request.headers.get("Authorization")
        if header is not None:
            scheme, _, credential = header.partition(" ")
            if scheme.lower() != "bearer" or not self.policy.token_matches(credential.strip()):
                self.on_reject(endpoint, "auth")
                log.info("refused %s from %s: bad bearer token", endpoint, peer(conn))
                return _unauthorized(conn)
            self.authenticated(conn)
            return None
        if not websocket:  # plain HTTP has no first message to carry a token
            self.on_reject(endpoint, "auth")
            return _unauthorized(conn)
        full = self.pool.admit(conn, _address(conn), endpoint)
        if full is None:  # it authenticates with its first message, before the deadline
            conn.connection_lost_waiter.add_done_callback(lambda _: self.pool.release(conn))
            return None
        self.on_reject(endpoint, REASON_UNAUTHENTICATED_LIMIT)
        if full == "address":
            return conn.respond(
                HTTPStatus.TOO_MANY_REQUESTS, "too many unauthenticated connections from you\n"
            )
        return conn.respond(
            HTTPStatus.SERVICE_UNAVAILABLE, "too many unauthenticated connections\n"
        )


def _unauthorized(conn: ServerConnection) -> Response:
    response = conn.respond(HTTPStatus.UNAUTHORIZED, "authentication required\n")
    response.headers["WWW-Authenticate"] = 'Bearer realm="streamer"'
    return response


def _address(conn: ServerConnection) -> str:
    """The client's IP address (the per-address key of the unauthenticated pool)."""
    addr = conn.remote_address
    if isinstance(addr, tuple | list) and addr:
        return str(addr[0])
    return str(addr)


def peer(conn: ServerConnection) -> str:
    """``address:port`` of the client, for log lines."""
    addr = conn.remote_address
    if isinstance(addr, Iterable) and not isinstance(addr, str):
        parts = list(addr)
        if len(parts) >= 2:
            return f"{parts[0]}:{parts[1]}"
    return str(addr)
