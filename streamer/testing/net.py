"""Network helpers for tests and tools: one place that picks a free local TCP port.

Servers under test bind port 0 where they can; a free port is needed only
where the port must be known before the process that binds it starts (a
daemon's config file, a broker's ``mosquitto.conf``).
"""

from __future__ import annotations

import socket

__all__ = ["free_port"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (the caller binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port
