"""The protocol's error body, {"error": "<text>"}, from the server's own errors (server/wire/errors.py).

The text starts with the server's stable code ("unknown_variant: ..."): the protocol has one field only.
Statuses stay the server's (404 unknown model or version, 413, 503 with Retry-After, 504), except that a
bad request is always 400, as the protocol and Triton have it (the /v1 routes say 422 invalid_parameter).
"""

from __future__ import annotations

import json

from server.wire.errors import ApiError


def invalid_request(detail: str) -> ApiError:
    """A request the protocol's rules refuse: malformed JSON, a tensor that contradicts its shape, ..."""
    return ApiError(400, "invalid_request", detail)


def unknown_model(model: str, known: list[str]) -> ApiError:
    return ApiError(404, "unknown_model", f"unknown model {model!r}; served: {sorted(known)}")


def unknown_version(model: str, version: str, known: list[str]) -> ApiError:
    return ApiError(404, "unknown_variant", f"model {model!r} has no version (variant) {version!r}; "
                                            f"its versions: {sorted(known)}")


def oip_status(exc: ApiError) -> int:
    return 400 if exc.status == 422 else exc.status


def error_body(exc: ApiError) -> bytes:
    return json.dumps({"error": f"{exc.code}: {exc.detail}"}, ensure_ascii=False).encode()
