"""The headers the server's processes use among themselves: request ids, and the `x-mame-*` headers a
front-end process sends the engine with a request it decoded (a client's own `x-mame-*` headers are dropped
on the way in)."""

from __future__ import annotations

import random
import re
from urllib.parse import parse_qsl

FRONTEND_CLIENT = "x-mame-client"  # the client's address (sticky assignment by client)
FRONTEND_STARTED = "x-mame-started"  # time.monotonic() when the front-end took the request
FRONTEND_MODEL = "x-mame-model"  # the model the crops were made for
FRONTEND_IMAGES = "x-mame-images"  # images in the request (counted even when it fails)
FRONTEND_MULTIPART = "x-mame-multipart"  # "1": a multipart request (several images answer as a list)
FRONTEND_ERROR = "x-mame-error"  # JSON {status, code, detail}: what reading or decoding the images raised
FRONTEND_CROPS_AT = "x-mame-crops-at"  # "<arena file> <byte offset> ...": the crops are in shared memory
# Admission before decoding: "1" asks the engine to route the request and reserve its queue places (the
# answer, 202, names the reservation); the request then comes again, decoded, naming it. A front-end asks
# first only while the engine refuses requests as overloaded; otherwise the request comes once, decoded, and
# is admitted then (one message instead of two).
FRONTEND_ADMIT = "x-mame-admit"
FRONTEND_RESERVATION = "x-mame-reservation"
# "1": the x-mame-error was met decoding a request not admitted yet: the engine admits it first (a full
# queue answers 503, as it would have before decoding), then answers the error.
FRONTEND_DECODING_ERROR = "x-mame-decoding-error"

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


def request_head(query: str, raw_headers: list[tuple[bytes, bytes]]) -> dict:
    """A channel request's head (server/wire/channel.py) as a front-end sends it: the query's parameters and
    the headers, each a dict the engine reads as it is. Made here, so that the one interpreter every request
    passes through parses neither."""
    return {"query": query_dict(query),
            "headers": first_values([(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw_headers])}


def query_dict(query: str) -> dict[str, str]:
    """A query string's parameters, the last of a repeated one: what Starlette's QueryParams.get gives, at a
    dict's cost (its Mapping.get raises and catches KeyError for each absent parameter, and a request asks
    for several)."""
    return dict(parse_qsl(query, keep_blank_values=True)) if query else {}


def first_values(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """Headers by lower-case name, the first of a repeated one: what Starlette's Headers.get gives, at a
    dict's cost per lookup (Headers scans the list on every one, and a request takes a dozen lookups)."""
    headers: dict[str, str] = {}
    for name, value in pairs:
        headers.setdefault(name.lower(), value)
    return headers
