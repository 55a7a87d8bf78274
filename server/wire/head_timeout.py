"""uvicorn's httptools protocol with a deadline and a size limit for each request's head.

It subclasses uvicorn's HttpToolsProtocol, a class uvicorn does not document as public: pyproject.toml pins
uvicorn to the minor versions this is tested with (tests/test_wire.py checks the methods it overrides; the
end-to-end tests send slow, large and malformed heads), so an upgrade that changes the class fails in CI, not
in production.
"""

from __future__ import annotations

import fcntl
import struct
import termios

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from server.wire.errors import ApiError, overloaded, request_timeout
from server.wire.protocol import request_id_of

# request line and headers; nginx's default is 32 KiB, uvicorn's h11 parser's 16 KiB
MAX_HEAD_BYTES = 64 * 1024


def refuse(transport, status: int, reason: bytes, error: ApiError) -> None:
    """Answer a head this protocol refuses with the contract's JSON error, and close the connection."""
    request_id = request_id_of([])  # the head with the client's own id never came whole
    body = error.to_answer(request_id)
    extra = b"".join(b"%s: %s\r\n" % (name.lower().encode(), value.encode())
                     for name, value in error.headers.items())  # Retry-After
    transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\nx-request-id: %s\r\n%s"
                    b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
                    % (status, reason, request_id.encode(), extra, len(body), body))
    transport.close()


class HeadTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools HTTP protocol, plus a deadline and a size limit for each request's head (request
    line and headers), and the contract's JSON errors for heads it refuses:
    - uvicorn times out only idle keep-alive connections, so a client that connected and sent nothing, or half
      its headers (slowloris), would hold its connection for ever. Past `timeout_s` from the connection or
      from the request's first byte: a request begun gets a 408 `request_timeout`; the connection is closed.
    - httptools keeps a head of any size in memory: past MAX_HEAD_BYTES it is a 431 `http_error`, and the
      connection is closed.
    - a head httptools cannot parse gets a 400 `http_error` with an X-Request-Id, not uvicorn's text/plain.
    - past `max_connections` open connections a new one is answered 503 `overloaded` and closed at once, so
      the others keep working (uvicorn's `limit_concurrency` accepts the connection, holds it while idle and
      answers only its requests 503, in text); a new connection that sends nothing for `idle_timeout_s` is
      closed (uvicorn's `timeout_keep_alive` closes only those that have had an answer).
    - a graceful stop closes a keep-alive connection only when no request is under way on it: uvicorn closed
      one whose next request had begun to arrive (part of its head read, or its bytes waiting in the socket),
      and that request, sent, got no answer. Now it is answered, with `Connection: close`."""

    timeout_s = 30.0  # set by head_timeout_protocol
    max_connections: int | None = None
    idle_timeout_s: float | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_timer = None
        self._idle_timer = None
        self._head_begun = False
        self._unparsed_head_bytes = 0  # received in chunks that did not complete the head (held by httptools)
        self._chunk_bytes = 0  # of the chunk being parsed
        self._head_too_large = False
        self._draining = False
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            refuse(transport, 503, b"Service Unavailable", overloaded(
                f"the server holds its limit of {self.max_connections} connections; retry later"))
            return
        self._start_head_timer()
        if self.idle_timeout_s is not None:
            self._idle_timer = self.loop.call_later(self.idle_timeout_s, self._idle_timed_out)

    def _idle_timed_out(self) -> None:
        self._idle_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
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
        refuse(
            self.transport, 400, b"Bad Request", ApiError(400, "http_error", f"{msg} (not valid HTTP/1.1)")
        )

    def _refuse_large_head(self) -> None:
        self._stop_head_timer()
        refuse(self.transport, 431, b"Request Header Fields Too Large", ApiError(
            431, "http_error", f"the request head is over the limit of {MAX_HEAD_BYTES} bytes"))

    def _start_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.timeout_s, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_begun = True
        self._unparsed_head_bytes = 0
        self._start_head_timer()

    def shutdown(self) -> None:
        self._draining = True
        idle = self.cycle is None or self.cycle.response_complete
        if idle and not self.transport.is_closing() and (self._head_begun or unread_bytes(self.transport)):
            return  # a request is arriving: answered with Connection: close (on_headers_complete)
        super().shutdown()

    def on_headers_complete(self) -> None:
        self._stop_head_timer()
        self._head_begun = False
        # Counted exactly only when the chunks could hold too large a head (one compare per request else).
        if self._unparsed_head_bytes + self._chunk_bytes > MAX_HEAD_BYTES and (
                len(self.url) + sum(len(k) + len(v) + 4 for k, v in self.headers) > MAX_HEAD_BYTES):
            self._head_too_large = True
            raise ValueError("request head too large")  # stops httptools; uvicorn calls send_400_response
        super().on_headers_complete()
        if self._draining:  # the last request of this connection
            self.cycle.keep_alive = False

    def connection_lost(self, exc) -> None:
        self._stop_head_timer()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        super().connection_lost(exc)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._head_begun:
            refuse(self.transport, 408, b"Request Timeout", request_timeout(
                f"the request head (request line and headers) did not arrive within {self.timeout_s:g} s"))
        self.transport.close()


def unread_bytes(transport) -> int:
    """Bytes received by the kernel for this connection that the event loop has not read yet."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return 0


def head_timeout_protocol(timeout_s: float, max_connections: int | None = None,
                          idle_timeout_s: float | None = None) -> type[HeadTimeoutProtocol]:
    """The protocol class for uvicorn's `http` setting, with heads due within `timeout_s`, at most
    `max_connections` open connections and new ones closed after `idle_timeout_s` without a byte (None: no
    limit, as for the engine's private socket behind front-ends)."""
    return type("HeadTimeoutProtocol", (HeadTimeoutProtocol,), {
        "timeout_s": timeout_s, "max_connections": max_connections, "idle_timeout_s": idle_timeout_s})
