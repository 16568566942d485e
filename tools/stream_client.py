"""Stream a file or a microphone to a running daemon's ``/v1/stream``; print the captions.

    python tools/stream_client.py talk.wav                     # paced in real time
    python tools/stream_client.py talk.mp3 --fast --json       # as fast as the server takes
    python tools/stream_client.py --mic [--device 2]           # Ctrl-C stops, tail is finalised
    python tools/stream_client.py talk.wav --url wss://box:8765 --cafile ca.pem --token-file tok

Captions print like the daemon's console (partial line rewritten on a
terminal, one line per event otherwise); ``--json`` prints the raw events.
Exit status: 0 after the server's 1000 close, 1 when the server closed with
an error (its message is printed), 2 for a connection or usage problem.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import ssl
import sys
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from streamer.audio.sources import FileSource
from streamer.errors import StreamerError
from streamer.sinks.console import ConsoleSink
from streamer.types import AudioBlock, Hypothesis

RATE = 16000
TOKEN_ENV = "STREAMER_WS_TOKEN"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("file", nargs="?", help="audio file (wav, flac, ogg, opus, mp3)")
    what.add_argument("--mic", action="store_true", help="stream the microphone")
    parser.add_argument("--device", default=None, help="input device (index or name) for --mic")
    parser.add_argument("--url", default="ws://127.0.0.1:8765", help="daemon base URL")
    parser.add_argument("--stream", default=None, help="stream id (the server picks one if unset)")
    parser.add_argument("--language", default=None, help="source language, if the server allows")
    parser.add_argument("--task", choices=("transcribe", "translate"), default=None)
    parser.add_argument("--fast", action="store_true", help="send the file without pacing")
    parser.add_argument("--finals-only", action="store_true", help="ask for finals only")
    parser.add_argument("--json", action="store_true", help="print raw JSON events")
    parser.add_argument("--token-file", default=None, help=f"bearer token file (else ${TOKEN_ENV})")
    parser.add_argument("--cafile", default=None, help="CA bundle to verify a wss:// server")
    parser.add_argument("--block-ms", type=int, default=100, help="audio per message")
    return parser.parse_args(argv)


def read_token(path: str | None) -> str | None:
    if path:
        return Path(path).read_text(encoding="utf-8").strip() or None
    return os.environ.get(TOKEN_ENV) or None


def start_message(args: argparse.Namespace) -> dict[str, Any]:
    msg: dict[str, Any] = {"type": "start", "sample_rate": RATE, "encoding": "pcm_s16le"}
    for key in ("stream", "language", "task"):
        if getattr(args, key):
            msg[key] = getattr(args, key)
    if args.finals_only:
        msg["partials"] = False
    return msg


def pcm16(block: AudioBlock) -> bytes:
    return (np.clip(block.samples, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


async def audio_blocks(args: argparse.Namespace) -> AsyncGenerator[AudioBlock]:
    if args.mic:
        from streamer.audio.capture import MicrophoneSource

        source: Any = MicrophoneSource("mic", RATE, device=args.device, block_ms=args.block_ms)
    else:
        source = FileSource(
            Path(args.file), "file", RATE, block_ms=args.block_ms, realtime=not args.fast
        )
    async for block in source.blocks():
        yield block


async def send_audio(ws: ClientConnection, args: argparse.Namespace, stop: asyncio.Event) -> None:
    """Send blocks until the source ends or ``stop`` is set, then the stop message."""
    blocks = audio_blocks(args)
    try:
        while not stop.is_set():
            next_block = asyncio.ensure_future(anext(blocks))
            stopped = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({next_block, stopped}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if next_block not in done:
                next_block.cancel()
                break
            try:
                block = next_block.result()
            except StopAsyncIteration:
                break
            await ws.send(pcm16(block))
    finally:
        with contextlib.suppress(Exception):
            await blocks.aclose()
    with contextlib.suppress(ConnectionClosed):
        await ws.send(json.dumps({"type": "stop"}))


async def run(args: argparse.Namespace) -> int:
    url = args.url.rstrip("/") + "/v1/stream"
    ssl_context = None
    if url.startswith("wss://"):
        ssl_context = ssl.create_default_context(cafile=args.cafile)
    token = read_token(args.token_file)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGINT, stop.set)
    # Sending faster than the server reads (--fast), our keepalive pings wait
    # behind our own audio in TCP: the server's keepalive watches the link then.
    ping_timeout = None if args.fast else 20.0
    try:
        ws = await connect(
            url,
            ssl=ssl_context,
            additional_headers=headers,
            max_size=2**22,
            ping_timeout=ping_timeout,
        )
    except InvalidStatus as exc:
        body = exc.response.body.decode(errors="replace").strip()
        print(f"refused: HTTP {exc.response.status_code} {body}", file=sys.stderr)
        return 2
    except (OSError, InvalidHandshake, TimeoutError) as exc:
        print(f"cannot connect to {url}: {exc}", file=sys.stderr)
        return 2
    try:
        return await converse(ws, args, stop)
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)


async def converse(ws: ClientConnection, args: argparse.Namespace, stop: asyncio.Event) -> int:
    """Start, send audio once ready, print events until the server closes."""
    console = ConsoleSink(sys.stdout)
    error: dict[str, Any] | None = None
    async with ws:
        await ws.send(json.dumps(start_message(args)))
        sender: asyncio.Task[None] | None = None
        t0 = time.monotonic()
        try:
            async for message in ws:
                event = json.loads(message)
                kind = event.get("type")
                if kind == "ready":
                    print(f"streaming as {event['stream']}", file=sys.stderr)
                    sender = asyncio.create_task(send_audio(ws, args, stop), name="send-audio")
                elif kind == "error":
                    error = event
                elif args.json:
                    print(message, flush=True)
                else:
                    console.write(Hypothesis.from_wire(event))
        except ConnectionClosed:
            pass
        finally:
            console.finish()
            if sender is not None:
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                    await sender
    if error is not None:
        print(f"server closed the stream: {error['message']} ({error['code']})", file=sys.stderr)
        return 1
    if ws.close_code != 1000:
        print(f"connection closed: {ws.close_code} {ws.close_reason}", file=sys.stderr)
        return 1
    print(f"done in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(run(args))
    except (StreamerError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
