"""The channel between HTTP front-end processes and the engine (server/frontend/): framed messages over
one Unix socket per front-end, many requests in flight on it at once.

Why not HTTP: a second HTTP hop costs the engine's event loop about as much per request as the client's
own request, and that loop is the part that does not spread over processes. A frame is a fixed header, a
small JSON head and the body:

  FRAME (head bytes, body bytes) + JSON head + body
  request head  {"id": n, "query": {"top_k": "3"}, "headers": {name: value}} (server/wire/protocol.py's
                request_head: parsed by the front-end), and "path" for /v1/explain
                body: the crops, if not in shared memory
  answer head   {"id": n, "status": 200, "headers": [[name, value], ...]}, and "results": true where the body
                is a classification's results for the front-end to render (server/wire/results.py)
                body: the HTTP answer's body
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import struct
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

from pydantic_core import from_json, to_json

FRAME = struct.Struct("!II")  # JSON head bytes, body bytes
Head = dict[str, Any]


def frame(head: Head, body: bytes = b"") -> bytes:
    encoded = to_json(head)  # pydantic's Rust encoder: 1 us for a request's head, the json module's 5
    return FRAME.pack(len(encoded), len(body)) + encoded + body


READ_BYTES = 1 << 18


class FrameBuffer:
    """The bytes of a stream as they arrive, and the complete frames among them."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def complete(self) -> tuple[list[tuple[Head, bytes]], int]:
        """The complete frames at the buffer's start (taken out of it), and the bytes the next one lacks."""
        buffer, start, frames, missing = self._buffer, 0, [], 0
        while len(buffer) - start >= FRAME.size:
            head_size, body_size = FRAME.unpack_from(buffer, start)
            head_end = start + FRAME.size + head_size
            end = head_end + body_size
            if len(buffer) < end:
                missing = end - len(buffer)
                break
            head = from_json(buffer[start + FRAME.size:head_end])
            frames.append((head, bytes(buffer[head_end:end])))
            start = end
        if start:
            del buffer[:start]
        return frames, missing

    def pending(self) -> bytes:
        return bytes(self._buffer)


class FrameReader:
    """The frames of a stream, every complete one that a read brought at once: no await per frame (three
    per frame with readexactly)."""

    def __init__(self, reader: asyncio.StreamReader):
        self.reader = reader
        self._buffer = FrameBuffer()

    async def frames(self) -> list[tuple[Head, bytes]]:
        """One or more frames; asyncio.IncompleteReadError when the other side has closed."""
        while True:
            frames, missing = self._buffer.complete()
            if frames:
                return frames
            # a large frame (crops in the message): the rest of it in one read
            data = await (self.reader.readexactly(missing) if missing > READ_BYTES
                          else self.reader.read(READ_BYTES))
            if not data:
                raise asyncio.IncompleteReadError(self._buffer.pending(), None)
            self._buffer.feed(data)


class FrameWriter:
    """Frames written in one turn of the event loop leave in one system call: the answers to a batch are
    written together (a write per answer is a large share of the engine's GIL time, py-spy shows). Writes
    to a StreamWriter or a transport."""

    def __init__(self, writer: asyncio.StreamWriter | asyncio.WriteTransport):
        self.writer = writer
        self._frames: list[bytes] = []
        # Python 3.11's get_running_loop() is a getpid() system call: looked up once
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes) -> None:
        if not self._frames:
            self._loop.call_soon(self._flush)
        self._frames.append(data)

    def _flush(self) -> None:
        frames, self._frames = self._frames, []
        if not self.writer.is_closing():
            self.writer.writelines(frames)

    def is_closing(self) -> bool:
        return self.writer.is_closing()

    def close(self) -> None:
        self._flush()
        self.writer.close()


Reply = Callable[[Head, bytes], None]
# A request's head and body, and the function that answers it: called once, at once or later.
Handler = Callable[[Head, bytes, Reply], None]


def answered_by_tasks(handler: Callable[[Head, bytes], Awaitable[tuple[Head, bytes]]]) -> Handler:
    """A coroutine handler as a channel's handler: each request answered by a task of its own."""
    tasks: set[asyncio.Task] = set()  # the loop keeps weak references only

    def handle(head: Head, body: bytes, reply: Reply) -> None:
        task = asyncio.get_running_loop().create_task(handler(head, body))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        task.add_done_callback(lambda done: reply(*done.result()))

    return handle


class _EngineSide(asyncio.Protocol):
    """One front-end's connection, on the engine's side: a protocol that parses frames as the bytes arrive and
    hands each request to the handler at once. A StreamReader, a task that awaits it and a task per request
    cost the engine's event loop about half as much again per 1-image request (docs/benchmarks.md)."""

    def __init__(self, handler: Handler):
        self._handler = handler
        self._frames = FrameBuffer()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._writer = FrameWriter(transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        self._frames.feed(data)
        try:
            for head, body in self._frames.complete()[0]:
                self._handler(head, body, functools.partial(self._reply, head["id"]))
        except Exception:  # a frame that does not parse, or a handler that failed to answer: this
            # connection cannot be trusted any more (the front-end fails what it has in flight on it)
            log.exception("a bad frame from a front-end: closing its channel")
            self._writer.close()

    def _reply(self, request_id: int, head: Head, body: bytes) -> None:
        if not self._writer.is_closing():  # a front-end gone: what it sent is still answered, into the void
            self._writer.write(frame({**head, "id": request_id}, body))  # whole frames


async def serve(path: str, handler: Handler) -> asyncio.AbstractServer:
    """The engine's side: answer each request frame with `handler(head, body, reply)`, many at once. The
    handler answers every request, errors included: a frame left unanswered is a call that waits for ever."""
    return await asyncio.get_running_loop().create_unix_server(lambda: _EngineSide(handler), path)


class ChannelError(ConnectionError):
    """The engine closed the channel or could not be reached."""


class Channel:
    """A front-end's side: one connection to the engine, opened on first use and again after a failure."""

    def __init__(self, path: str):
        self.path = path
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future] = {}
        self._writer: FrameWriter | None = None
        self._connecting = asyncio.Lock()

    async def call(self, head: Head, body: bytes = b"") -> tuple[Head, bytes]:
        writer = await self._connected()
        request_id = next(self._ids)
        answer = asyncio.get_running_loop().create_future()
        self._pending[request_id] = answer
        try:
            writer.write(frame({**head, "id": request_id}, body))
            return await answer
        finally:
            self._pending.pop(request_id, None)

    async def _connected(self) -> FrameWriter:
        async with self._connecting:
            if self._writer is None or self._writer.is_closing():
                try:
                    reader, stream = await asyncio.open_unix_connection(self.path, limit=1 << 20)
                except OSError as exc:
                    raise ChannelError(f"cannot reach the engine: {exc}") from None
                self._writer = FrameWriter(stream)
                self._receiver = asyncio.create_task(self._receive(reader, self._writer))
            return self._writer

    async def _receive(self, reader: asyncio.StreamReader, writer: FrameWriter) -> None:
        incoming = FrameReader(reader)
        try:
            while True:
                for head, body in await incoming.frames():
                    answer = self._pending.get(head["id"])
                    if answer is not None and not answer.done():
                        answer.set_result((head, body))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception:  # a frame that does not parse: this connection cannot be trusted any more
            log.exception("a bad frame from the engine: closing the channel")
        finally:  # on any exit: the next call reconnects, and no pending call waits for ever
            writer.close()
            for answer in list(self._pending.values()):
                if not answer.done():
                    answer.set_exception(ChannelError("the engine closed the channel"))

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
