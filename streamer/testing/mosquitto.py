"""A real Mosquitto broker for tests: config in a temp folder, free ports, stop by PID.

The MQTT sink is tested against Debian's ``mosquitto`` (no mocks): a broker
outage is a real process kill, a bad password a real CONNACK refusal, a bad CA
a real TLS handshake failure. :class:`Mosquitto` writes a ``mosquitto.conf``
with up to three listeners on 127.0.0.1:

- ``port``: anonymous, plain TCP;
- ``password_port``: ``allow_anonymous false`` with a password file (users
  given to the constructor; hashed here in Mosquitto's ``$7$`` PBKDF2 format,
  so ``mosquitto_passwd`` is not needed);
- ``tls_port``: TLS with a server certificate for 127.0.0.1/localhost issued
  by a throwaway ``trustme`` CA (:attr:`ca_path` for clients;
  :meth:`client_cert` issues client certificates from the same CA).

``start()`` after ``stop()``/``kill()`` reuses the same ports (a restart after
an outage). Persistence is off. The broker log stays in the folder and its
tail is part of every failure message.

:class:`TcpGate` is a TCP forwarder on a fixed port that a test opens and
closes. Put it between the code under test and the broker when a subscriber
must be subscribed (after a broker restart) before the publisher may
reconnect: a restarted broker has no sessions, so messages published before
the subscriber is back would be lost to the test, not to the code under test.
A closed gate refuses connections like a stopped broker.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from streamer.testing.net import free_port
from streamer.testing.process import ServerProcess, accepts

__all__ = ["Mosquitto", "MosquittoError", "TcpGate", "find_mosquitto", "free_port"]

_SEARCH_DIRS = ("/usr/sbin", "/usr/local/sbin", "/usr/bin", "/usr/local/bin")


class MosquittoError(RuntimeError):
    """The broker could not be started (message includes the log tail)."""


def find_mosquitto() -> str | None:
    """Path of the ``mosquitto`` binary ($PATH, then the usual sbin folders), or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for folder in _SEARCH_DIRS:
        candidate = Path(folder) / "mosquitto"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def hash_password(password: str, *, iterations: int = 101) -> str:
    """Mosquitto 2.x ``$7$`` password hash (PBKDF2-HMAC-SHA512, 12-byte salt)."""
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    b64 = base64.b64encode
    return f"$7${iterations}${b64(salt).decode()}${b64(digest).decode()}"


class Mosquitto(ServerProcess):
    """One Mosquitto process with its config, certificates and log under ``workdir``.

    ``users`` (name → password) adds the password listener; ``tls`` adds the
    TLS listener (``require_client_cert`` makes it demand a client
    certificate from the same CA). Use as a context manager or call
    :meth:`start` / :meth:`stop`.
    """

    name = "mosquitto"
    error = MosquittoError

    def __init__(
        self,
        workdir: Path | str,
        *,
        users: dict[str, str] | None = None,
        tls: bool = False,
        require_client_cert: bool = False,
        binary: str | None = None,
    ) -> None:
        found = binary or find_mosquitto()
        if found is None:
            raise MosquittoError("mosquitto binary not found (apt-get install mosquitto)")
        self.binary = found
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.users = dict(users or {})
        self.require_client_cert = require_client_cert
        self.conf_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        super().__init__(self.workdir / "mosquitto.out", (self.log_path,))
        self.port = free_port()
        self.password_port: int | None = free_port() if self.users else None
        self.tls_port: int | None = free_port() if tls else None
        self.ca_path: Path | None = None
        self._ca: Any = None  # trustme.CA; typed loosely so mypy needs no trustme stubs
        if tls:
            self._make_certificates()
        self._write_config()

    # -- files ---------------------------------------------------------------

    def _make_certificates(self) -> None:
        import trustme  # test-only dependency, imported where needed

        self._ca = trustme.CA()
        self.ca_path = self.workdir / "ca.pem"
        self._ca.cert_pem.write_to_path(str(self.ca_path))
        server = self._ca.issue_cert("127.0.0.1", "localhost")
        server.cert_chain_pems[0].write_to_path(str(self.workdir / "server.pem"))
        for extra in server.cert_chain_pems[1:]:
            extra.write_to_path(str(self.workdir / "server.pem"), append=True)
        server.private_key_pem.write_to_path(str(self.workdir / "server.key"))

    def client_cert(self, name: str = "streamer-client") -> tuple[Path, Path]:
        """Issue a client certificate from the broker's CA; returns (cert, key) paths."""
        if self._ca is None:
            raise MosquittoError("client_cert() needs a broker started with tls=True")
        leaf = self._ca.issue_cert(name)
        cert = self.workdir / f"{name}.pem"
        key = self.workdir / f"{name}.key"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        return cert, key

    def _write_config(self) -> None:
        lines = [
            "persistence false",
            "per_listener_settings true",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp_format %H:%M:%S",
        ]
        if os.geteuid() == 0:
            # Run as root, mosquitto would switch to the "mosquitto" user and then
            # fail to open the log and keys in this folder.
            lines.append("user root")
        lines += ["", f"listener {self.port} {self.host}", "allow_anonymous true"]
        if self.password_port is not None:
            passwd = self.workdir / "passwd"
            passwd.write_text(
                "".join(f"{user}:{hash_password(pw)}\n" for user, pw in self.users.items()),
                encoding="utf-8",
            )
            passwd.chmod(0o600)
            lines += [
                "",
                f"listener {self.password_port} {self.host}",
                "allow_anonymous false",
                f"password_file {passwd}",
            ]
        if self.tls_port is not None:
            lines += [
                "",
                f"listener {self.tls_port} {self.host}",
                "allow_anonymous true",
                f"cafile {self.ca_path}",
                f"certfile {self.workdir / 'server.pem'}",
                f"keyfile {self.workdir / 'server.key'}",
                f"require_certificate {'true' if self.require_client_cert else 'false'}",
            ]
        self.conf_path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    # -- process ---------------------------------------------------------------

    @property
    def ports(self) -> list[int]:
        return [p for p in (self.port, self.password_port, self.tls_port) if p is not None]

    def command(self) -> list[str]:
        return [self.binary, "-c", str(self.conf_path)]

    def ready(self) -> bool:
        """Every listener accepts connections."""
        return all(accepts(self.host, port) for port in self.ports)


class TcpGate:
    """Forwards ``host:port`` to ``target``; closed, it refuses connections.

    Runs on the test's event loop. The listening port stays the same across
    :meth:`close` / :meth:`open`. When the target closes a connection (broker
    killed), the gate closes the client side too, so the client sees the
    outage as it would without the gate.
    """

    def __init__(self, target_host: str, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = free_port(host)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def is_open(self) -> bool:
        return self._server is not None

    async def open(self) -> None:
        """Start accepting and forwarding (idempotent)."""
        if self._server is None:
            self._server = await asyncio.start_server(
                self._handle, self.host, self.port, reuse_address=True
            )

    async def close(self) -> None:
        """Stop listening and cut every forwarded connection."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
            except OSError:
                return
            self._writers.add(up_writer)
            pipes = [
                asyncio.create_task(_pipe(reader, up_writer)),
                asyncio.create_task(_pipe(up_reader, writer)),
            ]
            try:
                await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pipe in pipes:
                    pipe.cancel()
                await asyncio.gather(*pipes, return_exceptions=True)
                up_writer.close()
                self._writers.discard(up_writer)
        finally:
            writer.close()
            self._writers.discard(writer)
            self._tasks.discard(task)

    async def __aenter__(self) -> TcpGate:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
