"""Stream a file or a microphone to a running daemon's ``/v1/stream``; print the captions.

    python tools/stream_client.py talk.wav                     # paced in real time
    python tools/stream_client.py talk.mp3 --fast --json       # as fast as the server takes
    python tools/stream_client.py --mic [--device 2]           # Ctrl-C stops, tail is finalised
    python tools/stream_client.py talk.wav --url wss://box:8765 --cafile ca.pem --token-file tok

Captions print like the daemon's console (partial line rewritten on a
terminal, one line per event otherwise); ``--json`` prints the raw events.

A stream whose connection breaks once it runs (its daemon died, a network
blip, a load balancer moved it) is resumed on whatever daemon the URL leads
to then: the client keeps its audio from the end of the last final it
received, reconnects with capped exponential backoff and jitter, sends
``start`` with ``resume: {"seq": <last seq received>, "offset": <end of that
final>}`` and sends the audio again from there, so the captions go on with
no gap and no repeats (README "Resuming a stream"). ``--reconnect-for S``
bounds how long it tries (0: never). The first connection is not retried: a
wrong URL or a refusal is reported at once.

Exit status: 0 after the server's 1000 close, 1 when the server closed with
an error (its message is printed) or the stream could not be resumed, 2 for
a connection or usage problem.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import ssl
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
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
BACKOFF_MIN_S = 0.25
BACKOFF_MAX_S = 5.0
#: Audio kept for a resume at most (a microphone's, while the server is away).
KEEP_S = 120.0
#: A file is read at most this far ahead of what was sent.
AHEAD_S = 2.0
#: Recent events remembered to recognise a repeat.
SEQ_MEMORY = 1024
#: Close codes after which the stream is resumed (elsewhere, or here later):
#: going away, no close frame (connection lost), server error, restart, try
#: again later, bad gateway. The others (1003, 1007, 1008, 1009) are final.
RESUME_CODES = frozenset({1001, 1006, 1011, 1012, 1013, 1014})

EventHook = Callable[[dict[str, Any], str], None]


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
    parser.add_argument(
        "--reconnect-for", type=float, default=300.0, metavar="S",
        help="resume a broken stream for up to S seconds (0: do not)",
    )  # fmt: skip
    return parser.parse_args(argv)


def read_token(path: str | None) -> str | None:
    if path:
        return Path(path).read_text(encoding="utf-8").strip() or None
    return os.environ.get(TOKEN_ENV) or None


def pcm16(block: AudioBlock) -> bytes:
    return (np.clip(block.samples, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


async def audio_blocks(args: argparse.Namespace) -> AsyncIterator[bytes]:
    """The file or microphone as 16 kHz s16le PCM, one block per message."""
    if args.mic:
        from streamer.audio.capture import MicrophoneSource

        source: Any = MicrophoneSource("mic", RATE, device=args.device, block_ms=args.block_ms)
    else:
        source = FileSource(
            Path(args.file), "file", RATE, block_ms=args.block_ms, realtime=not args.fast
        )
    async for block in source.blocks():
        yield pcm16(block)


@dataclass(frozen=True, slots=True)
class StreamOptions:
    """What every connection of one stream uses."""

    url: str  # .../v1/stream
    stream: str | None = None
    language: str | None = None
    task: str | None = None
    partials: bool = True
    token: str | None = None
    ssl: ssl.SSLContext | None = None
    ping_timeout: float | None = 20.0
    block_ms: int = 100
    live: bool = False  # a microphone: audio never waits (kept up to KEEP_S)
    reconnect_for: float = 300.0


class AudioLog:
    """A stream's 16 kHz s16le audio from the end of its last final on.

    Sample indices count from the stream's start. ``keep_from`` (the end of
    the last final) is where a resumed connection starts sending again;
    ``sent`` how far the current one got. A file is read at most ``AHEAD_S``
    past ``sent``; a microphone never waits, and beyond ``KEEP_S`` its oldest
    audio is dropped (a resume then leaves that stretch out).
    """

    def __init__(self, live: bool, rate: int = RATE) -> None:
        self.live = live
        self.rate = rate
        self.base = 0  # index of the first kept sample
        self.data = bytearray()
        self.keep_from = 0
        self.sent = 0
        self.ended = False
        self.dropped = 0  # samples dropped by the cap
        self._changed = asyncio.Event()

    @property
    def total(self) -> int:
        return self.base + len(self.data) // 2

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def append(self, pcm: bytes) -> None:
        while not self.live and self.total - self.sent > AHEAD_S * self.rate:
            await self._changed.wait()
        self.data += pcm
        excess = self.total - self.base - round(KEEP_S * self.rate)
        if excess > 0:
            del self.data[: excess * 2]
            self.base += excess
            self.dropped += excess
            self.sent = max(self.sent, self.base)
        self._notify()

    def end(self) -> None:
        self.ended = True
        self._notify()

    def finalised(self, sample: int) -> None:
        """Audio before ``sample`` has its final: no longer needed once sent."""
        self.keep_from = max(self.keep_from, sample)
        cut = min(self.keep_from, self.sent) - self.base
        if cut > 0:
            del self.data[: cut * 2]
            self.base += cut

    def resume_point(self) -> int:
        """Where a new connection starts sending: the end of the last final."""
        return max(self.keep_from, self.base)

    def restart(self, at: int) -> None:
        """A new connection sends from ``at`` (its :meth:`resume_point`)."""
        self.sent = max(at, self.base)
        self.finalised(self.keep_from)

    async def next_chunk(self, samples: int) -> bytes:
        """Up to ``samples`` of audio after ``sent``; b"" once the source ended and all is sent."""
        while self.sent >= self.total and not self.ended:
            await self._changed.wait()
        at = (self.sent - self.base) * 2
        chunk = bytes(self.data[at : at + samples * 2])
        self.sent += len(chunk) // 2
        self.finalised(self.keep_from)
        self._notify()
        return chunk


@dataclass(frozen=True, slots=True)
class _Outcome:
    code: int  # exit status if not resumed
    message: str = ""
    resume: bool = False


class StreamClient:
    """One stream over as many connections as it takes (see the module docstring).

    ``on_event(event, text)`` gets every caption event once (repeats by
    ``seq`` are dropped); ``say`` the status lines.
    """

    def __init__(
        self,
        opts: StreamOptions,
        on_event: EventHook,
        say: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
    ) -> None:
        self.opts = opts
        self.on_event = on_event
        self.say = say
        self.audio = AudioLog(opts.live)
        self.stream = opts.stream  # the server's name for it, once ready
        self.started = False  # a connection got "ready": from now on, breaks are resumed
        self.last_seq: int | None = None
        self.final_end = 0.0  # end of the last final received (stream seconds)
        self.connections_ready = 0  # connections that got "ready"
        self.resumes = 0
        self._from = 0  # where the current connection sends from (a sample index)
        self._seen: deque[int] = deque(maxlen=SEQ_MEMORY)  # recent seqs, to drop repeats
        self._seen_set: set[int] = set()

    async def run(self, source: AsyncIterator[bytes], stop: asyncio.Event) -> int:
        """Stream ``source`` until it ends or ``stop`` is set; returns the exit status."""
        producer = asyncio.create_task(self._produce(source, stop), name="read-audio")
        try:
            return await self._connections()
        finally:
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producer

    async def _produce(self, source: AsyncIterator[bytes], stop: asyncio.Event) -> None:
        blocks = aiter(source)
        try:
            while not stop.is_set():
                block = asyncio.ensure_future(anext(blocks))
                stopped = asyncio.ensure_future(stop.wait())
                await asyncio.wait({block, stopped}, return_when=asyncio.FIRST_COMPLETED)
                stopped.cancel()
                if not block.done():
                    block.cancel()
                    break
                try:
                    pcm = block.result()
                except StopAsyncIteration:
                    break
                await self.audio.append(pcm)
        finally:
            self.audio.end()
            if hasattr(blocks, "aclose"):
                with contextlib.suppress(Exception):
                    await blocks.aclose()

    async def _connections(self) -> int:
        attempt = 0
        lost_at: float | None = None
        while True:
            streamed = self.connections_ready
            outcome = await self._connection()
            if not outcome.resume or not self.started or self.opts.reconnect_for <= 0:
                if outcome.message:
                    self.say(outcome.message)
                return outcome.code
            if self.connections_ready > streamed:  # that one had streamed: a new loss
                attempt, lost_at = 0, None
            now = time.monotonic()
            lost_at = now if lost_at is None else lost_at
            if now - lost_at > self.opts.reconnect_for:
                self.say(f"{outcome.message}; gave up resuming after {self.opts.reconnect_for:g} s")
                return 1
            cap = min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2**attempt)
            delay = cap / 2 + random.uniform(0, cap / 2)  # "equal jitter"
            attempt += 1
            self.say(f"{outcome.message}; resuming stream {self.stream} in {delay:.1f} s")
            await asyncio.sleep(delay)

    async def _connection(self) -> _Outcome:
        """One connection: start (or resume), stream, read events until it closes."""
        opts = self.opts
        headers = {"Authorization": f"Bearer {opts.token}"} if opts.token else None
        try:
            ws = await connect(
                opts.url,
                ssl=opts.ssl,
                additional_headers=headers,
                max_size=2**22,
                ping_timeout=opts.ping_timeout,
                open_timeout=10,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            body = exc.response.body.decode(errors="replace").strip()
            return _Outcome(2, f"refused: HTTP {status} {body}", status >= 500 or status == 429)
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            return _Outcome(2, f"cannot connect to {opts.url}: {exc}", resume=True)
        error: dict[str, Any] | None = None
        sender: asyncio.Task[None] | None = None
        async with ws:
            try:
                await ws.send(json.dumps(self.start_message()))
                async for message in ws:
                    if not isinstance(message, str):
                        continue
                    event = json.loads(message)
                    kind = event.get("type")
                    if kind == "ready":
                        self._ready(event)
                        sender = asyncio.create_task(self._send(ws), name="send-audio")
                    elif kind == "error":
                        error = event
                    elif kind in ("partial", "final"):
                        self._event(event, message)
            except ConnectionClosed:
                pass
            finally:
                if sender is not None:
                    sender.cancel()
                    with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                        await sender
        if error is not None:
            text = f"server closed the stream: {error.get('message')} ({error.get('code')})"
            return _Outcome(1, text, error.get("code") in RESUME_CODES)
        code = ws.close_code if ws.close_code is not None else 1006
        if code == 1000:
            return _Outcome(0)
        return _Outcome(1, f"connection closed: {code} {ws.close_reason}".rstrip(),
                        code in RESUME_CODES)  # fmt: skip

    def start_message(self) -> dict[str, Any]:
        """``start``; once the stream ran, with ``resume`` (from the end of the last final)."""
        msg: dict[str, Any] = {"type": "start", "sample_rate": RATE, "encoding": "pcm_s16le"}
        for key in ("stream", "language", "task"):
            value = self.stream if key == "stream" else getattr(self.opts, key)
            if value:
                msg[key] = value
        if not self.opts.partials:
            msg["partials"] = False
        self._from = self.audio.resume_point()
        self.audio.restart(self._from)  # before any event of this connection trims the log
        if self.started:
            exact = self._from == round(self.final_end * RATE)  # the final's own number
            offset = self.final_end if exact else self._from / RATE
            msg["resume"] = {"seq": self.last_seq or 0, "offset": offset}
        return msg

    def _ready(self, event: dict[str, Any]) -> None:
        self.stream = str(event.get("stream", self.stream))
        if self.started:
            self.resumes += 1
            self.say(f"resumed stream {self.stream} at {self._from / RATE:.2f} s")
        else:
            self.say(f"streaming as {self.stream}")
        self.started = True
        self.connections_ready += 1

    async def _send(self, ws: ClientConnection) -> None:
        """The audio from the resume point on, then ``stop`` once the source ended."""
        frame = max(1, RATE * self.opts.block_ms // 1000)
        with contextlib.suppress(ConnectionClosed):
            while chunk := await self.audio.next_chunk(frame):
                await ws.send(chunk)
            await ws.send(json.dumps({"type": "stop"}))

    def _event(self, event: dict[str, Any], message: str) -> None:
        seq = event.get("seq")
        if isinstance(seq, int) and not isinstance(seq, bool):
            if seq in self._seen_set:
                return  # a repeat
            if len(self._seen) == self._seen.maxlen:
                self._seen_set.discard(self._seen[0])
            self._seen.append(seq)
            self._seen_set.add(seq)
            # (a translation's final may come after a later partial of the source)
            self.last_seq = seq if self.last_seq is None else max(self.last_seq, seq)
        end = event.get("end")
        if event.get("type") == "final" and isinstance(end, int | float):
            self.final_end = max(self.final_end, float(end))
            self.audio.finalised(round(self.final_end * RATE))
        self.on_event(event, message)


async def run(args: argparse.Namespace) -> int:
    url = args.url.rstrip("/") + "/v1/stream"
    ssl_context = None
    if url.startswith("wss://"):
        ssl_context = ssl.create_default_context(cafile=args.cafile)
    opts = StreamOptions(
        url=url,
        stream=args.stream,
        language=args.language,
        task=args.task,
        partials=not args.finals_only,
        token=read_token(args.token_file),
        ssl=ssl_context,
        # Sending faster than the server reads (--fast), our keepalive pings wait
        # behind our own audio in TCP: the server's keepalive watches the link then.
        ping_timeout=None if args.fast else 20.0,
        block_ms=args.block_ms,
        live=args.mic,
        reconnect_for=args.reconnect_for,
    )
    console = ConsoleSink(sys.stdout)

    def show(event: dict[str, Any], text: str) -> None:
        if args.json:
            print(text, flush=True)
        else:
            console.write(Hypothesis.from_wire(event))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGINT, stop.set)
    t0 = time.monotonic()
    try:
        code = await StreamClient(opts, show).run(audio_blocks(args), stop)
    finally:
        console.finish()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)
    if code == 0:
        print(f"done in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(run(args))
    except (StreamerError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
