"""The torch-free part of a classify request's host path, shared by the server process and its HTTP
front-end processes (server/frontend.py): the images of a body, and running calls in a thread pool."""

from __future__ import annotations

import asyncio
import random
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from server.errors import ApiError, bad_image, client_closed, invalid_parameter, request_timeout, too_large
from server.imaging import check_content_type
from server.multipart import MultipartError, TooManyParts, parse_multipart

T = TypeVar("T")
OTHER_FIELDS = 16  # multipart parts beside the files that a request may hold: a cap on parsing work
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def request_id_of(raw_headers: list[tuple[bytes, bytes]]) -> str:
    """The client's valid X-Request-Id (the first one, as `Headers.get`), else a new id."""
    given = ""
    for key, value in raw_headers:  # ASGI servers give lower-case names
        if key == b"x-request-id":
            given = value.decode("latin-1")
            break
    # 32 hex digits like uuid4().hex, without an os.urandom system call per request.
    return given if _REQUEST_ID.fullmatch(given) else f"{random.getrandbits(128):032x}"


def without_reserved(raw_headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The headers less `x-mame-*` (reserved: the server's processes use them among themselves)."""
    return [(key, value) for key, value in raw_headers if not key.startswith(b"x-mame-")]


def image_payloads(content_type: str, body: bytes, max_files: int) -> tuple[list[tuple[str, bytes]], bool]:
    """(name, bytes) of each image, and whether the request was multipart (answered as a list if several)."""
    if not content_type.lower().startswith("multipart/form-data"):
        check_content_type(content_type)
        return [("body", body)], False

    try:
        parts = parse_multipart(body, content_type, max_parts=max_files + OTHER_FIELDS)
    except TooManyParts:
        raise too_large(f"too many multipart parts in one request (limit {max_files + OTHER_FIELDS}: "
                        f"{max_files} files and {OTHER_FIELDS} other fields)") from None
    except MultipartError as exc:
        raise bad_image(f"malformed multipart body: {exc}") from None
    # A `file` field without a filename is an image too (`curl -F 'file=<cat.jpg'` sends one).
    files = [part for part in parts if part.name == "file"]
    if not files:
        raise invalid_parameter("the multipart body has no `file` field holding an image "
                                f"(fields: {', '.join(sorted({repr(part.name) for part in parts})) or 'none'})")
    if len(files) > max_files:
        raise too_large(f"too many files in one request (limit {max_files})")
    payloads = []
    for part in files:
        check_content_type(part.content_type)
        payloads.append((part.filename or "file", part.data))
    return payloads, True


async def read_limited(receive: Callable, declared: str, limit: int, timeout_s: float | None = None) -> bytes:
    """The body from an ASGI `receive`, refused with 413 as soon as it passes `limit` bytes (or announces
    more), and with 408 when it has not all arrived within `timeout_s` (a stalled or slowloris upload would
    otherwise hold its connection and its place in a drain for ever). A client that leaves mid-body is a 499."""
    if declared.isdigit() and int(declared) > limit:
        raise too_large(f"request body of {declared} bytes is over the limit of {limit} bytes")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise client_closed(f"the client closed the connection after {size} bytes of the body")
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise too_large(f"request body is over the limit of {limit} bytes")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
    except TimeoutError:
        raise request_timeout(f"the request body did not arrive within {timeout_s:g} s "
                              f"({size} bytes received)") from None


async def run_all_in_pool(pool: ThreadPoolExecutor, function: Callable[..., T], calls: list[tuple]) -> list[T]:
    """`function(*args)` for each of `calls`, in parallel in `pool`; raises the first call's error, if any.

    The event loop is woken once, when the last call is done: asyncio's run_in_executor wakes it once per
    call, and those wake-ups held the GIL longer than anything else on the host path (py-spy, 8-image
    requests: 43 % of the samples with the GIL held)."""
    if not calls:
        return []
    loop = asyncio.get_running_loop()
    all_done = loop.create_future()
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException | None] = [None] * len(calls)
    remaining = [len(calls)]
    lock = threading.Lock()

    def finish() -> None:
        if not all_done.done():  # the request may have been cancelled meanwhile
            all_done.set_result(None)

    def call(i: int, args: tuple) -> None:
        try:
            results[i] = function(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting request
            errors[i] = exc
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if last:
            try:
                loop.call_soon_threadsafe(finish)
            except RuntimeError:  # the loop has closed: nobody is waiting
                pass

    for i, args in enumerate(calls):
        pool.submit(call, i, args)
    await all_done
    for error in errors:
        if error is not None:
            raise error
    return results


MAX_HEAD_BYTES = 64 * 1024  # request line and headers; nginx's default is 32 KiB, uvicorn's h11 parser's 16 KiB


def head_timeout_protocol(timeout_s: float) -> type:
    """uvicorn's httptools HTTP protocol, plus a deadline and a size limit for each request's head (request
    line and headers), and the contract's JSON errors for heads it refuses:
    - uvicorn times out only idle keep-alive connections, so a client that connected and sent nothing, or half
      its headers (slowloris), held its connection for ever. Past `timeout_s` from the connection or from the
      request's first byte: a request begun gets a 408 `request_timeout`, and the connection is closed.
    - httptools keeps a head of any size in memory (a 300 MB header grew the server by 166 MB): past
      MAX_HEAD_BYTES it is a 431 `http_error`, and the connection is closed.
    - a head httptools cannot parse gets a 400 `http_error` with an X-Request-Id, not uvicorn's text/plain."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    def refuse(transport, status: int, reason: bytes, error: ApiError) -> None:
        request_id = request_id_of([])  # the head with the client's own id never came whole
        body = error.to_answer(request_id)
        transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\nx-request-id: %s\r\n"
                        b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
                        % (status, reason, request_id.encode(), len(body), body))
        transport.close()

    class HeadTimeoutProtocol(HttpToolsProtocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._head_timer = None
            self._head_begun = False
            self._unparsed_head_bytes = 0  # received in chunks that did not complete the head (held by httptools)
            self._chunk_bytes = 0  # of the chunk being parsed
            self._head_too_large = False
            self._start_head_timer()

        def data_received(self, data: bytes) -> None:
            self._chunk_bytes = len(data)
            super().data_received(data)
            if self._head_begun and not self.transport.is_closing():  # still in a head after this chunk
                self._unparsed_head_bytes += len(data)
                if self._unparsed_head_bytes > MAX_HEAD_BYTES:
                    self._refuse_large_head()

        def send_400_response(self, msg: str) -> None:
            if self._head_too_large:
                self._refuse_large_head()
                return
            self._stop_head_timer()
            refuse(self.transport, 400, b"Bad Request", ApiError(400, "http_error", f"{msg} (not valid HTTP/1.1)"))

        def _refuse_large_head(self) -> None:
            self._stop_head_timer()
            refuse(self.transport, 431, b"Request Header Fields Too Large", ApiError(
                431, "http_error", f"the request head is over the limit of {MAX_HEAD_BYTES} bytes"))

        def _start_head_timer(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(timeout_s, self._head_timed_out)

        def _stop_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._head_begun = True
            self._unparsed_head_bytes = 0
            self._start_head_timer()

        def on_headers_complete(self) -> None:
            self._stop_head_timer()
            self._head_begun = False
            # Counted exactly only when the chunks could hold too large a head (one compare per request else).
            if self._unparsed_head_bytes + self._chunk_bytes > MAX_HEAD_BYTES and (
                    len(self.url) + sum(len(k) + len(v) + 4 for k, v in self.headers) > MAX_HEAD_BYTES):
                self._head_too_large = True
                raise ValueError("request head too large")  # stops httptools; uvicorn calls send_400_response
            super().on_headers_complete()

        def connection_lost(self, exc) -> None:
            self._stop_head_timer()
            super().connection_lost(exc)

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.transport.is_closing():
                return
            if self._head_begun:
                refuse(self.transport, 408, b"Request Timeout", request_timeout(
                    f"the request head (request line and headers) did not arrive within {timeout_s:g} s"))
            self.transport.close()

    return HeadTimeoutProtocol
