"""What /docs says of the routes that the handlers' signatures cannot: the classify request's body and query,
the 200 answers (server/http/schemas.py, documentation only), and the contract's error bodies."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

DEFAULT_TOP_K = 5

_ERROR_SCHEMA = {"type": "object", "required": ["error", "detail", "request_id"], "properties": {
    "error": {"type": "string"}, "detail": {"type": "string"}, "request_id": {"type": "string"}}}


def _query(name: str, schema: dict, description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


# The classify handler reads its body and query itself (classify() validates and counts every request, a bad
# top_k too), so FastAPI cannot infer them: /docs can still send an image.
CLASSIFY_OPENAPI = {
    "parameters": [
        _query("model", {"type": "string"}, "model name (default: the config's default model)"),
        _query("variant", {"type": "string"}, "variant name (default: the model's default variant)"),
        _query("experiment", {"type": "string"}, "A/B experiment name"),
        _query(
            "top_k",
            {"type": "integer", "default": DEFAULT_TOP_K, "minimum": 1, "maximum": 20},
            "how many predictions per image (1..limits.max_top_k; the maximum here is the server's)",
        ),
    ],
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "array",
                            "minItems": 1,
                            "items": {"type": "string", "format": "binary"},
                            "description": "one or more images "
                            "(several: the answer is {request_id, results: [...]})",
                        }
                    },
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    },
}


RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before trying again", "required": True,
                                "schema": {"type": "string"}}}


def error_responses(*documented: tuple[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the contract's error body. A route that lists 422 here is not given FastAPI's
    HTTPValidationError, which is not what this server answers. A 503 always carries Retry-After."""
    return {status: {"description": text, "content": {"application/json": {"schema": _ERROR_SCHEMA}},
                     **({"headers": RETRY_AFTER} if status == 503 else {})}
            for status, text in documented}


def answer(model: type[BaseModel] | Any, description: str = "Successful Response",
           status: int = 200) -> dict[int | str, dict[str, Any]]:
    """The `responses` entry of a 200 (or 201) answer documented by a model that nothing validates."""
    return {status: {"model": model, "description": description}}


def with_top_k_bound(schema: dict[str, Any], max_top_k: int) -> dict[str, Any]:
    """The OpenAPI document with classify's top_k bounded by this server's limits.max_top_k."""
    for parameter in schema["paths"]["/v1/classify"]["post"]["parameters"]:
        if parameter["name"] == "top_k":
            parameter["schema"]["maximum"] = max_top_k
    return schema


_ADMIN_404 = "admin_disabled (MAME_ADMIN_TOKEN unset), unknown_model, unknown_variant, unknown_experiment"
ADMIN_ERRORS = ((401, "unauthorized: no bearer token"), (403, "forbidden: wrong token"), (404, _ADMIN_404),
                (422, "invalid_parameter: a body that is not the schema's, a bad split or name"))
CLASSIFY_ERRORS = error_responses(
    (400, "bad_image: undecodable or truncated image, malformed multipart"),
    (404, "unknown_model, unknown_variant or unknown_experiment"),
    (408, "request_timeout: the request's head or body did not arrive in time"),
    (413, "too_large: over the byte, pixel, file-count or queue limit"),
    (415, "unsupported_media_type: not an image type"),
    (422, "invalid_parameter: top_k out of range, an experiment of another model"),
    (500, "internal: the batch failed on the device; the log has the request id"),
    (503, "overloaded (queue full) or not_ready (loading); Retry-After"),
    (504, "timeout: no answer within the request timeout"))

EXPLAIN_OPENAPI = {
    "parameters": [
        _query("model", {"type": "string"}, "model name (default: the config's default model)"),
        _query("variant", {"type": "string"}, "variant name (default: the model's default variant)"),
        _query("blocks", {"type": "string", "pattern": "^[0-9]+(,[0-9]+)*$"},
               "1-based blocks to show, comma-separated (default: every block that merges)"),
    ],
    "requestBody": CLASSIFY_OPENAPI["requestBody"],
}
_LIST = {"schema": {"type": "string"}}
EXPLAIN_HEADERS = {
    "X-Model": {"description": "the model", **_LIST},
    "X-Variant": {"description": "the variant", **_LIST},
    "X-Blocks-Shown": {"description": "the blocks drawn, in panel order", **_LIST},
    "X-Tokens-Input": {"description": "tokens entering the first block", **_LIST},
    "X-Tokens-Per-Block": {"description": "tokens after each block, comma-separated", **_LIST},
    "X-Tokens-Shown": {"description": "tokens after each block drawn", **_LIST},
}
EXPLAIN_ERRORS = error_responses(
    (400, "bad_image: undecodable or truncated image, malformed multipart"),
    (404, "unknown_model or unknown_variant"),
    (408, "request_timeout: the request's head or body did not arrive in time"),
    (413, "too_large: over the byte or pixel limit, or more than one file"),
    (415, "unsupported_media_type: not an image type"),
    (422, "invalid_parameter: blocks outside the model"),
    (500, "internal: the forward failed on the device, or its device process stopped"),
    (503, "overloaded (an explanation is running), not_ready (loading) or device_stalled; Retry-After"),
    (504, "timeout: no answer within the request timeout"))
