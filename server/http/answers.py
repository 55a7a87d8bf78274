"""The JSON bodies the engine answers: JSON content, errors as the contract has them, and the one query
parameter read as a number (an image's answer: server/wire/results.py)."""

from __future__ import annotations

import logging
from typing import Any

from pydantic import TypeAdapter, ValidationError
from pydantic_core import to_json
from starlette.responses import Response

from server.wire.errors import ApiError, internal, invalid_parameter

log = logging.getLogger("mame.server")
_INT = TypeAdapter(int)


def query_int(value: str | None, name: str, default: int) -> int:
    """An integer query parameter read as FastAPI's `Query` validation would (pydantic's lax int), with the
    same 422 detail; plain digit strings skip pydantic."""
    if value is None:
        return default
    if value.isascii() and value.isdigit() and len(value) < 19:
        return int(value)
    try:
        return _INT.validate_python(value)
    except ValidationError as exc:
        raise invalid_parameter("; ".join(f"query.{name}: {e['msg']}" for e in exc.errors())) from None


def json_response(content: Any) -> Response:
    """pydantic's JSON bytes (compact), application/json: what FastAPI answers for an endpoint returning
    Any."""
    return Response(to_json(content), media_type="application/json")


def error_response(exc: ApiError, request_id: str) -> Response:
    return Response(exc.to_answer(request_id), status_code=exc.status,
                    headers={**exc.headers, "X-Request-Id": request_id}, media_type="application/json")


def unexpected_error(method: str, path: str, request_id: str, error: BaseException | None = None) -> Response:
    """The contract's 500 `internal` for an exception nothing else answered (`error`, or the one being
    handled); the traceback goes to the log."""
    log.error("request %s (%s %s) failed", request_id, method, path, exc_info=error or True)
    return error_response(
        internal(f"unexpected server error; the server log has request {request_id}"), request_id
    )
