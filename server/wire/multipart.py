"""multipart/form-data bodies that are already in memory, split in one pass of `bytes.find`.

Why not Starlette's form parser: it streams through python-multipart's per-byte-run callbacks and spools
each file into a temporary-file object, which made it the largest cost of a multi-image request on the
event loop (cProfile, 16-image requests: about half of the handler's time). The server has read the
whole body anyway (it enforces the byte limit first), so a split is all it needs.
"""

from __future__ import annotations

from dataclasses import dataclass

from python_multipart.multipart import parse_options_header


class MultipartError(ValueError):
    """The body is not the multipart/form-data its content type announced."""


class TooManyParts(MultipartError):
    """More parts than the caller allows (a 413, not a malformed body)."""


@dataclass(frozen=True)
class Part:
    name: str
    filename: str | None  # None: a plain form field, not a file
    content_type: str | None
    data: bytes


def parse_multipart(body: bytes, content_type: str, max_parts: int) -> list[Part]:
    """The parts of a multipart/form-data `body` (RFC 7578); raises MultipartError, also past `max_parts`."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary or len(boundary) > 70:
        raise MultipartError("the content type has no valid boundary parameter")
    delimiter = b"--" + boundary
    if body.startswith(delimiter):
        position = len(delimiter)
    else:  # a preamble is allowed before the first delimiter
        start = body.find(b"\r\n" + delimiter)
        if start < 0:
            raise MultipartError("the body does not start with the boundary")
        position = start + 2 + len(delimiter)
    separator = b"\r\n" + delimiter
    parts: list[Part] = []
    while True:
        if body.startswith(b"--", position):  # the closing delimiter; an epilogue may follow
            return parts
        line_end = body.find(b"\r\n", position)
        if line_end < 0 or body[position:line_end].strip(b" \t"):
            raise MultipartError("a boundary line does not end with CRLF")
        headers_end = body.find(b"\r\n\r\n", line_end)
        if headers_end < 0:
            raise MultipartError("a part's headers do not end")
        data_end = body.find(separator, headers_end + 4)
        if data_end < 0:
            raise MultipartError("the body ends without the closing boundary")
        if len(parts) == max_parts:
            raise TooManyParts(f"more than {max_parts} parts")
        parts.append(_part(body[line_end + 2:headers_end], body[headers_end + 4:data_end]))
        position = data_end + len(separator)


def _part(header_block: bytes, data: bytes) -> Part:
    headers = {}
    for line in header_block.split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if not colon:
            raise MultipartError("a part has no headers" if not line else
                                 f"a part header is not 'Name: value': {line[:60]!r}")
        headers[name.strip().lower()] = value.strip()
    # python-multipart's header parser: linear in the header's length (a hand-written regex can be
    # quadratic, an event loop held for seconds by one header) and it unquotes as RFC 7578 says.
    disposition, params = parse_options_header(headers.get(b"content-disposition", b""))
    if disposition.lower() != b"form-data" or b"name" not in params:
        raise MultipartError("a part has no Content-Disposition: form-data with a name")
    filename = params.get(b"filename")
    content_type = headers.get(b"content-type")
    # Names and filenames as UTF-8, which browsers send (latin-1 made "fïle" into "fÃ¯le")
    return Part(params[b"name"].decode("utf-8", "replace"), filename.decode("utf-8", "replace")
                if filename is not None else None, content_type.decode("latin-1") if content_type is not None
                else None, data)
