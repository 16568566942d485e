"""A real HAProxy in front of test daemons: config in a temp folder, free ports, stop by PID.

The cluster tests put Debian's ``haproxy`` in front of real ``streamer serve``
processes, configured as ``deploy/haproxy.cfg`` is (the same routing,
balancing, health checks, retries and WebSocket timeouts) with these
differences: everything listens on 127.0.0.1 (free ports), no TLS, no
``/metrics`` filter, and health checks every ``check_ms`` (default 200 ms)
with one failure or success enough to change a server's state, so a test
sees a full daemon skipped within a fraction of a second. Daemon names must
be lower-case letters and digits (they are URL path parts). Paths, as in production:

- ``/v1/stream``: backend ``streams``, ``leastconn`` over every daemon whose
  ``/readyz`` says 200 (a full or saturated daemon answers 503);
- ``/d/<name>/...``: that daemon alone, the prefix removed (caption
  subscribers that follow every daemon, its caption page);
- anything else: backend ``pages``, one live daemon per client address (``/healthz``).

:meth:`HAProxy.server_status` reads a server's state (``UP``, ``DOWN``, ...)
from the stats socket (TCP on 127.0.0.1), and :meth:`HAProxy.connections`
how many sessions HAProxy sent it. The process log (one line per request and
every state change) stays in the folder and its tail is part of every failure
message.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path

from streamer.testing.net import free_port
from streamer.testing.process import ServerProcess, accepts

__all__ = ["HAProxy", "HAProxyError", "find_haproxy", "haproxy_config"]

_SEARCH_DIRS = ("/usr/sbin", "/usr/local/sbin", "/usr/bin", "/usr/local/bin")
STREAMS = "streams"
PAGES = "pages"


class HAProxyError(RuntimeError):
    """HAProxy could not be started or asked (the message includes the log tail)."""


def find_haproxy() -> str | None:
    """Path of the ``haproxy`` binary ($PATH, then the usual sbin folders), or None."""
    found = shutil.which("haproxy")
    if found:
        return found
    for folder in _SEARCH_DIRS:
        candidate = Path(folder) / "haproxy"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def haproxy_config(
    servers: Mapping[str, int], port: int, stats_port: int, check_ms: int = 200
) -> str:
    """``haproxy.cfg`` for daemons on 127.0.0.1 (name → port), as deploy/haproxy.cfg."""
    check = f"check inter {check_ms}ms fastinter {check_ms}ms downinter {check_ms}ms fall 1 rise 1"
    lines = [
        "global",
        f"    stats socket ipv4@127.0.0.1:{stats_port} level admin",
        "    log stdout format raw local0 info",
        "",
        "defaults",
        "    mode http",
        "    log global",
        "    option httplog",
        "    timeout connect 2s",
        "    timeout client 30s",
        "    timeout server 30s",
        "    timeout http-request 10s",
        "    timeout tunnel 1h",
        "    timeout client-fin 5s",
        "    timeout server-fin 5s",
        "    retries 2",
        "    option redispatch 1",
        "    retry-on conn-failure empty-response 503",
        "",
        "frontend streamer",
        f"    bind 127.0.0.1:{port}",
        "    http-request redirect location %[path]/ code 301 if { path -m reg ^/d/[a-z0-9]+$ }",
    ]
    lines += [f"    use_backend d_{name} if {{ path_beg /d/{name}/ }}" for name in servers]
    lines += [
        f"    use_backend {STREAMS} if {{ path /v1/stream }}",
        f"    default_backend {PAGES}",
        "",
        f"backend {STREAMS}",
        "    balance leastconn",
        "    option httpchk",
        "    http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host localhost",
        "    http-check expect status 200",
    ]
    lines += [f"    server {name} 127.0.0.1:{p} {check}" for name, p in servers.items()]
    lines += [
        "",
        f"backend {PAGES}",
        "    balance source",
        "    hash-type consistent",
        "    option httpchk",
        "    http-check send meth GET uri /healthz ver HTTP/1.1 hdr Host localhost",
    ]
    lines += [f"    server {name} 127.0.0.1:{p} {check}" for name, p in servers.items()]
    for name, p in servers.items():
        lines += [
            "",
            f"backend d_{name}",
            f"    http-request replace-path /d/{name}(/.*) \\1",
            f"    server {name} 127.0.0.1:{p}",
        ]
    return "\n".join(lines) + "\n"


class HAProxy(ServerProcess):
    """One HAProxy process with its config and log under ``workdir``.

    ``servers`` maps daemon names to their ports on 127.0.0.1. Use as a
    context manager or call :meth:`start` / :meth:`stop`.
    """

    name = "haproxy"
    error = HAProxyError

    def __init__(
        self,
        workdir: Path | str,
        servers: Mapping[str, int],
        *,
        check_ms: int = 200,
        binary: str | None = None,
    ) -> None:
        found = binary or find_haproxy()
        if found is None:
            raise HAProxyError("haproxy binary not found (apt-get install haproxy)")
        self.binary = found
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.servers = dict(servers)
        self.port = free_port()
        self.stats_port = free_port()
        self.conf_path = self.workdir / "haproxy.cfg"
        self.log_path = self.workdir / "haproxy.log"
        super().__init__(self.log_path)
        self.conf_path.write_text(
            haproxy_config(self.servers, self.port, self.stats_port, check_ms), encoding="utf-8"
        )

    def url(self, path: str, scheme: str = "ws") -> str:
        return f"{scheme}://{self.host}:{self.port}{path}"

    # -- process ---------------------------------------------------------------

    def check(self) -> None:
        """``haproxy -c``: the config is valid (raises with HAProxy's words if not)."""
        done = subprocess.run(
            [self.binary, "-c", "-f", str(self.conf_path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise HAProxyError(f"haproxy -c failed:\n{done.stdout}{done.stderr}")

    def command(self) -> list[str]:
        return [self.binary, "-db", "-f", str(self.conf_path)]  # -db: in the foreground

    def ready(self) -> bool:
        """It listens and its stats socket answers."""
        return accepts(self.host, self.port) and bool(self._ask("show info").strip())

    # -- the stats socket ------------------------------------------------------

    def _ask(self, command: str, timeout: float = 2.0) -> str:
        with socket.create_connection((self.host, self.stats_port), timeout=timeout) as sock:
            sock.sendall(command.encode() + b"\n")
            chunks = []
            while data := sock.recv(65536):
                chunks.append(data)
        return b"".join(chunks).decode(errors="replace")

    def stats(self) -> dict[tuple[str, str], dict[str, str]]:
        """``show stat`` as ``{(backend, server): {column: value}}``."""
        text = self._ask("show stat")
        header, *rows = [line for line in text.splitlines() if line.strip()]
        columns = header.lstrip("# ").split(",")
        out = {}
        for row in rows:
            values = dict(zip(columns, row.split(","), strict=False))
            out[(values["pxname"], values["svname"])] = values
        return out

    def server_status(self, server: str, backend: str = STREAMS) -> str:
        """``UP``, ``DOWN``, ``UP 1/2``... of ``server`` in ``backend``."""
        try:
            return self.stats()[(backend, server)]["status"]
        except (OSError, KeyError, ValueError) as exc:
            tail = self.log_tail()
            raise HAProxyError(f"no status for {backend}/{server}: {exc}\n{tail}") from exc

    def connections(self, server: str, backend: str = STREAMS) -> int:
        """Sessions HAProxy has sent to ``server`` in ``backend`` so far."""
        return int(self.stats()[(backend, server)]["stot"] or 0)
