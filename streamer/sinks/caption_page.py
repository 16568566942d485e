"""The browser caption page: static files from ``streamer/data/web`` on the caption port.

The daemon serves its own viewer so that "open http://host:8765/" is all a
user needs: no web server, no build step, nothing fetched from elsewhere.
Routes are added to a :class:`~streamer.sinks.websocket.CaptionServer`
(plain HTTP answers before any WebSocket upgrade):

=====================  ===========================================================
``GET /``              ``index.html`` (the page)
``GET /captions.js``   the page's script (captions subscription, microphone)
``GET /captions.css``  its style sheet
``GET /mic-worklet.js``  AudioWorklet: resample to 16 kHz, int16 LE, 100 ms chunks
=====================  ===========================================================

The page subscribes with ``history=20`` (``?history=N`` on its own URL
overrides it), so a page opened late, or reconnecting after an outage, shows
each stream's recent finals; it drops the replayed ones it already shows
(same ``seq``). ``?streams=`` and ``?kinds=`` pass through likewise.

Languages: with translation targets the page offers a picker, "Source" (the
speech model's text) or one of the daemon's targets, which it learns from
``<meta name="streamer-targets" content="de,fr">`` in ``index.html``
(filled in by :func:`add_page_routes`; empty: no picker). The choice
subscribes with ``targets=<target>`` (README "Translation targets") and is
kept in the page's URL (``?target=de``), so a reload or a shared link shows
the same language.

Every answer carries a strict Content-Security-Policy (same-origin scripts,
styles and connections plus ``ws:``/``wss:``; no inline script, no framing),
``X-Content-Type-Options: nosniff`` and ``Cache-Control: no-cache`` (a
daemon upgrade must not leave a stale script in the browser). The files are
read once, when the routes are added: the page is part of the installed
package, not something edited under a running daemon.

websockets parses any request method but only GET can become a WebSocket;
these routes answer other methods with 405 (a request with a body is
dropped by websockets' parser before it reaches us).
"""

from __future__ import annotations

import html
import importlib.resources
from collections.abc import Iterable
from http import HTTPStatus

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from streamer.sinks.websocket import CaptionServer, HttpProcess, http_response

__all__ = [
    "CONTENT_SECURITY_POLICY",
    "PAGE_FILES",
    "TARGETS_META",
    "add_page_routes",
    "static_response",
]

#: URL path -> (file in streamer/data/web, Content-Type).
PAGE_FILES: dict[str, tuple[str, str]] = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/captions.js": ("captions.js", "text/javascript; charset=utf-8"),
    "/captions.css": ("captions.css", "text/css; charset=utf-8"),
    "/mic-worklet.js": ("mic-worklet.js", "text/javascript; charset=utf-8"),
}

#: The tag of ``index.html`` that tells the page the daemon's translation targets.
TARGETS_META = b'<meta name="streamer-targets" content="">'

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "media-src 'self'",
        "connect-src 'self' ws: wss:",
        "worker-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)

_SECURITY_HEADERS = (
    ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-cache"),
)


def read_page_file(name: str) -> bytes:
    """One file of the page, from the installed package."""
    return importlib.resources.files("streamer").joinpath("data", "web", name).read_bytes()


def static_response(
    status: HTTPStatus, body: bytes, content_type: str, extra: tuple[tuple[str, str], ...] = ()
) -> Response:
    """A complete HTTP response with the page's security headers."""
    return http_response(status, body, content_type, (*_SECURITY_HEADERS, *extra))


def _static(body: bytes, content_type: str) -> HttpProcess:
    """The route process for one file (GET only)."""

    def process(conn: ServerConnection, request: Request) -> Response:
        if request.method != "GET":
            return static_response(
                HTTPStatus.METHOD_NOT_ALLOWED,
                b"method not allowed\n",
                "text/plain; charset=utf-8",
                (("Allow", "GET"),),
            )
        return static_response(HTTPStatus.OK, body, content_type)

    return process


def with_targets(page: bytes, targets: Iterable[str]) -> bytes:
    """``index.html`` telling the page the daemon's translation ``targets``."""
    if TARGETS_META not in page:
        raise ValueError("index.html lacks its streamer-targets meta tag")
    listed = html.escape(",".join(targets), quote=True).encode()
    return page.replace(TARGETS_META, TARGETS_META.replace(b'content=""', b'content="%s"' % listed))


def add_page_routes(server: CaptionServer, targets: Iterable[str] = ()) -> None:
    """Register the caption page and its static files on ``server``; the page
    offers ``targets`` (the daemon's translation targets) besides the source.

    Raises OSError (FileNotFoundError) when the package was installed without
    its ``data/web`` files: better at startup than as a 500 later.
    """
    targets = tuple(targets)
    for path, (name, content_type) in PAGE_FILES.items():
        body = read_page_file(name)
        if name == "index.html":
            body = with_targets(body, targets)
        server.add_route(path, _static(body, content_type))
