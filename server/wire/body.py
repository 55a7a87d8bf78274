"""A request's body: read with a byte limit and a deadline, and the images it holds (one image, or the
`file` parts of a multipart form)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from server.wire.errors import (
    bad_image,
    client_closed,
    echo,
    invalid_parameter,
    request_timeout,
    too_large,
    unsupported_media_type,
)
from server.wire.multipart import MultipartError, TooManyParts, parse_multipart

OTHER_FIELDS = 16  # multipart parts beside the files that a request may hold: a cap on parsing work
# Content types we try to decode. octet-stream is what many clients send for an unnamed file part.
GENERIC_TYPES = {"application/octet-stream", ""}


def check_content_type(content_type: str | None) -> None:
    """415 unless the declared type is an image (or untyped bytes, which decoding then judges)."""
    main = (content_type or "").split(";")[0].strip().lower()
    if main.startswith("image/") or main in GENERIC_TYPES:
        return
    raise unsupported_media_type(
        f"content type {echo(main)} is not an image type (send image/jpeg, image/png, ...)"
    )


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
        raise invalid_parameter(
            "the multipart body has no `file` field holding an image "
            f"(fields: {', '.join(sorted({repr(part.name) for part in parts})) or 'none'})"
        )
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
    otherwise hold its connection and its place in a drain for ever). A client that leaves mid-body is a
    499."""
    if declared.isdigit() and int(declared) > limit:
        raise too_large(f"request body of {declared} bytes is over the limit of {limit} bytes", close=True)
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
                    raise too_large(f"request body is over the limit of {limit} bytes", close=True)
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
    except TimeoutError:
        raise request_timeout(f"the request body did not arrive within {timeout_s:g} s "
                              f"({size} bytes received)") from None

