"""The JSON bodies the engine answers: an image's answer, errors as the contract has them, and the one query
parameter read as a number."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from pydantic import TypeAdapter, ValidationError
from pydantic_core import to_json
from starlette.responses import Response

from server.wire.errors import ApiError, internal, invalid_parameter

if TYPE_CHECKING:
    from server.engine.worker import ImageResult
    from server.experiments.registry import Assignment

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


def unexpected_error(method: str, path: str, request_id: str) -> Response:
    """The contract's 500 `internal` for an exception nothing else answered; the traceback goes to the log."""
    log.exception("request %s (%s %s) failed", request_id, method, path)
    return error_response(
        internal(f"unexpected server error; the server log has request {request_id}"), request_id
    )


def image_answer(route: Assignment, weights: str, labels: list[str], request_id: str, result: ImageResult,
                 total_s: float, top_k: int | None = None) -> dict[str, Any]:
    """One image's answer; `top_k`: the predictions shown, of those computed (all when None)."""
    per_block = result.tokens_per_block
    final = per_block[-1] if per_block else result.input_tokens
    return {
        "request_id": request_id,
        "model": route.model,
        "variant": route.variant,
        "experiment": route.experiment,
        "assignment": route.assignment,
        "weights": weights,
        "predictions": [
            {"label": labels[i] if i < len(labels) else f"class_{i}", "index": i, "score": round(s, 6)}
            for i, s in zip(result.indices[:top_k], result.scores[:top_k])
        ],
        "tokens": {
            "input": result.input_tokens,
            "per_block": per_block,
            "final": final,
            "reduction": round(1.0 - final / result.input_tokens, 4),
        },
        "gflops": round(result.gflops, 4),
        "batch_size": result.batch_size,
        "device": result.device,
        "timings_ms": {
            "queue": round(result.queue_s * 1000, 3),
            "inference": round(result.inference_s * 1000, 3),
            "total": round(total_s * 1000, 3),
        },
    }
