"""The protocol's endpoints as plain functions of an Engine, and the route table the HTTP layer adds.

Every handler has one signature, `(engine, path_params, body, headers, context) -> Reply`, and answers
every outcome itself (errors too, in the protocol's body), so that the HTTP layer only has to read the
body (with its usual byte limit and timeout: a 413 or 408 from there is answered as its other errors are),
call the handler and send the Reply:

    for route in ROUTES:
        async def endpoint(request: Request, route: Route = route) -> Response:
            body = await read_limited(...) if route.method == "POST" else b""
            reply = await route.handler(engine, request.path_params, body, request.headers, request)
            return Response(reply.body, reply.status, reply.headers)
        app.add_api_route(route.path, endpoint, methods=[route.method], summary=route.summary)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata as package_metadata
from typing import Any

from server.oip.interface import Engine, ModelSpec
from server.oip.metadata import model_metadata, model_ready, server_metadata
from server.oip.plan import plan_infer
from server.oip.request import parse_infer_request
from server.oip.response import infer_response
from server.wire.errors import (
    ApiError,
    error_body,
    internal,
    not_ready,
    oip_status,
    unsupported_media_type,
)

log = logging.getLogger("mame.server")

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON = "application/json"


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)  # Content-Type included


def json_reply(document: Any, status: int = 200) -> Reply:
    return Reply(status, json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode(),
                 {"Content-Type": JSON})


def error_reply(exc: ApiError) -> Reply:
    return Reply(oip_status(exc), error_body(exc), {**exc.headers, "Content-Type": JSON})


def server_version() -> str:
    try:
        return package_metadata.version("mame-serve")
    except package_metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


def unknown_model(model: str, known: list[str]) -> ApiError:
    return ApiError(404, "unknown_model", f"unknown model {model!r}; served: {sorted(known)}")


def unknown_version(model: str, version: str, known: list[str]) -> ApiError:
    return ApiError(404, "unknown_variant", f"model {model!r} has no version (variant) {version!r}; "
                                            f"its versions: {sorted(known)}")


def model_spec(engine: Engine, model: str, version: str | None) -> ModelSpec:
    """The loaded model the path names, or the ApiError to answer (404 unknown, 503 still loading)."""
    models = engine.models()
    if model not in models:
        raise unknown_model(model, list(models))
    spec = models[model]
    if spec is None:
        raise not_ready(f"model {model!r} is still loading")
    if version is not None and version not in spec.variants:
        raise unknown_version(model, version, list(spec.variants))
    return spec


Handler = Callable[[Engine, Mapping[str, str], bytes, Mapping[str, str], Any], Awaitable[Reply]]


async def server_live(engine: Engine, params: Mapping[str, str], body: bytes, headers: Mapping[str, str],
                      context: Any) -> Reply:
    return json_reply({"live": True})


async def server_ready(engine: Engine, params: Mapping[str, str], body: bytes, headers: Mapping[str, str],
                       context: Any) -> Reply:
    ready = engine.ready()
    return json_reply({"ready": ready}, 200 if ready else 503)


async def server_metadata_handler(engine: Engine, params: Mapping[str, str], body: bytes,
                                  headers: Mapping[str, str], context: Any) -> Reply:
    return json_reply(server_metadata(server_version()))


async def model_metadata_handler(engine: Engine, params: Mapping[str, str], body: bytes,
                                 headers: Mapping[str, str], context: Any) -> Reply:
    try:
        return json_reply(model_metadata(model_spec(engine, params["model"], params.get("version"))))
    except ApiError as exc:
        return error_reply(exc)


async def model_ready_handler(engine: Engine, params: Mapping[str, str], body: bytes,
                              headers: Mapping[str, str], context: Any) -> Reply:
    """200 {"name", "ready": true} once loaded; 503 with "ready": false while loading; 404 unknown."""
    model, version = params["model"], params.get("version")
    try:
        model_spec(engine, model, version)
    except ApiError as exc:
        if exc.code == "not_ready":
            return json_reply(model_ready(model, False), 503)
        return error_reply(exc)
    return json_reply(model_ready(model, engine.ready()), 200 if engine.ready() else 503)


async def infer(engine: Engine, params: Mapping[str, str], body: bytes, headers: Mapping[str, str],
                context: Any) -> Reply:
    """POST .../infer. The version, when the path has one, is the variant (an override of any A/B
    assignment); without one the server chooses as /v1 does. Refusals before the engine runs are
    reported to it (record_refusal) so that its request metrics count every answer."""
    model, version = params["model"], params.get("version")
    headers = {name.lower(): value for name, value in headers.items()}  # a dict or Starlette's Headers
    try:
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":  # tritonclient's request_compression_algorithm: refused, not misread
            raise unsupported_media_type(f"Content-Encoding {encoding!r}: send infer requests uncompressed")
        spec = model_spec(engine, model, version)
        plan = plan_infer(parse_infer_request(body, headers.get(HEADER_LENGTH.lower())), spec, version,
                          engine.max_images())
    except ApiError as exc:
        engine.record_refusal(model, oip_status(exc), context)
        return error_reply(exc)
    except Exception:  # a bug in reading the request: answered, counted and logged
        log.exception("reading an infer request for model %r failed", model)
        engine.record_refusal(model, 500, context)
        return error_reply(internal("unexpected server error reading the request; the server log has it"))
    try:
        result = await engine.classify(plan.call, context)
        answer, header_length = infer_response(plan, result, spec)
    except ApiError as exc:
        return error_reply(exc)
    except Exception:  # the engine counted the request; the client still gets the protocol's body
        log.exception("infer on model %r failed", model)
        return error_reply(internal("unexpected server error; the server log has it"))
    if header_length is None:
        return Reply(200, answer, {"Content-Type": JSON})
    return Reply(200, answer, {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(header_length)})


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # Starlette's syntax
    handler: Handler
    summary: str


ROUTES: tuple[Route, ...] = (
    Route("GET", "/v2", server_metadata_handler, "Open Inference Protocol: server metadata"),
    Route("GET", "/v2/health/live", server_live, "Open Inference Protocol: server live"),
    Route("GET", "/v2/health/ready", server_ready,
          "Open Inference Protocol: server ready (503 while loading)"),
    Route("GET", "/v2/models/{model}", model_metadata_handler, "Open Inference Protocol: model metadata"),
    Route("GET", "/v2/models/{model}/versions/{version}", model_metadata_handler,
          "Open Inference Protocol: model metadata of one variant"),
    Route("GET", "/v2/models/{model}/ready", model_ready_handler, "Open Inference Protocol: model ready"),
    Route("GET", "/v2/models/{model}/versions/{version}/ready", model_ready_handler,
          "Open Inference Protocol: model ready, one variant"),
    Route("POST", "/v2/models/{model}/infer", infer,
          "Open Inference Protocol: infer (the server chooses the variant, A/B experiments included)"),
    Route("POST", "/v2/models/{model}/versions/{version}/infer", infer,
          "Open Inference Protocol: infer on one variant"),
)
