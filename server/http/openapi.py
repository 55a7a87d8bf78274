"""What /docs says of the routes that the handlers' signatures cannot: the classify request's body and query,
and the contract's error bodies."""

from __future__ import annotations

from typing import Any

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
            {"type": "integer", "default": DEFAULT_TOP_K},
            "how many predictions per image (1..max_top_k)",
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


def error_responses(*documented: tuple[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the contract's error body. A route that lists 422 here is not given FastAPI's
    HTTPValidationError, which is not what this server answers."""
    return {status: {"description": text, "content": {"application/json": {"schema": _ERROR_SCHEMA}}}
            for status, text in documented}


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
    (503, "overloaded (queue full) or not_ready (loading); Retry-After"),
    (504, "timeout: no answer within the request timeout"))
