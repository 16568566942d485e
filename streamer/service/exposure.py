"""Who can reach the daemon's captions: configurations worth a loud warning.

``streamer check-config`` prints these and ``streamer serve`` logs them at
start (one warning line each). Pure: only the configuration and the
environment (``$STREAMER_WS_TOKEN``) are read, nothing is resolved.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from streamer.config import Config, split_items
from streamer.sinks.access import is_loopback

__all__ = ["TOKEN_ENV", "exposure_warnings"]

#: The token's environment variable (read by ``streamer.service.app.load_ws_token``).
TOKEN_ENV = "STREAMER_WS_TOKEN"


def exposure_warnings(cfg: Config, environ: Mapping[str, str] | None = None) -> list[str]:
    """One line per way the captions and audio input are open to anybody."""
    wy = cfg.wyoming
    wyoming = []
    if wy.enabled and not is_loopback(wy.host):
        wyoming.append(
            f"wyoming.host = {wy.host!r} is not a loopback address and Wyoming has no "
            f"authentication: anyone who can reach port {wy.port} can stream audio in and "
            "read its transcripts"
        )
    return _websocket_warnings(cfg, environ) + wyoming


def _websocket_warnings(cfg: Config, environ: Mapping[str, str] | None) -> list[str]:
    ws = cfg.websocket
    if not ws.enabled:
        return []
    env = os.environ if environ is None else environ
    has_token = bool(ws.auth_token_file) or bool(env.get(TOKEN_ENV))
    if has_token:
        return []
    warnings = []
    if not is_loopback(ws.host):
        warnings.append(
            f"websocket.host = {ws.host!r} is not a loopback address and no token is set "
            f"(websocket.auth_token_file): anyone who can reach port {ws.port} can read "
            "every caption, stream audio in and read /metrics"
        )
    if "*" in split_items(ws.allowed_origins):
        warnings.append(
            'websocket.allowed_origins = "*" and no token is set: any web page open in '
            "a browser that can reach the daemon can read the captions"
        )
    return warnings
