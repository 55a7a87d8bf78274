"""The Open Inference Protocol's routes (server/oip/handlers.py ROUTES) on the engine's app, and the
protocol's `Engine` over the server's own path: the same routing and A/B assignment, queues and batching,
metrics, experiment records and shadow runs as `POST /v1/classify` (server/http/classify.py).

Images reach the batches as the uint8 crops /v1 makes (encoded files decoded and cropped as /v1 does;
UINT8 `pixels` are those crops already), or, for FP32 `pixel_values` (a client's own preprocessing, already
normalised), as float32 [3, H, W] images the model takes as they are: the workers run them in batches of
their own (server/engine/worker.py by_input_kind; docs/oip.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from starlette.responses import Response

from server.http.classify import (
    _asked_labels,
    _count,
    _observe,
    _Outcome,
    _reserve,
    _results,
    _submit,
    decode_admitted,
    http_classify_request,
)
from server.oip.handlers import ROUTES, Reply, Route, error_reply
from server.oip.interface import Classification, ClassifiedImage, ClassifyCall, Images, ModelSpec
from server.wire.body import read_limited
from server.wire.errors import ApiError, internal, not_ready, oip_status

if TYPE_CHECKING:
    from server.experiments.registry import Assignment
    from server.http.classify import ClassifyRequest
    from server.http.classify import Engine as ServerParts

log = logging.getLogger("mame.server")

def uint8_crops(array: np.ndarray) -> list[torch.Tensor]:
    """uint8 [N, H, W, 3] -> N uint8 [3, H, W] crops, channels-last underneath as the decoders make them."""
    return list(torch.from_numpy(array).permute(0, 3, 1, 2).unbind(0))


class ServerEngine:
    """server/oip/interface.py's Engine over the engine's parts (server/http/classify.py's Engine)."""

    def __init__(self, parts: ServerParts) -> None:
        self.parts = parts
        self._specs: dict[str, ModelSpec] = {}

    def ready(self) -> bool:
        service = self.parts.service
        return service.ready.is_set() and service.failed is None

    def models(self) -> Mapping[str, ModelSpec | None]:
        if not self.parts.service.ready.is_set():
            return dict.fromkeys(self.parts.config.models)
        if not self._specs:
            self._specs = {name: self._spec(name) for name in self.parts.config.models}
        return self._specs

    def _spec(self, name: str) -> ModelSpec:
        cfg, info = self.parts.config.models[name], self.parts.service.models[name]
        transform = self.parts.service.transforms[name]
        depth = cfg.model_kwargs.get("depth")
        return ModelSpec(name, tuple(cfg.variants), cfg.default_variant_name, tuple(info.input_size),
                         tuple(info.labels), tuple(transform.mean), tuple(transform.std),
                         depth=depth if isinstance(depth, int) else None, arch=cfg.arch, weights=info.weights)

    def max_images(self) -> int:
        return self.parts.config.limits.max_images_per_request

    def record_refusal(self, model: str, status: int, context: Request) -> None:
        request: ClassifyRequest = context.state.oip_request
        labels = _asked_labels(self.parts, {"model": model})
        _count(self.parts, _Outcome(labels, status=status), time.monotonic() - request.started)

    async def classify(self, call: ClassifyCall, context: Request) -> Classification:
        request: ClassifyRequest = context.state.oip_request
        asked = {"model": call.model} | ({"experiment": call.experiment} if call.experiment else {})
        outcome = _Outcome(_asked_labels(self.parts, asked))
        try:
            return await self._classify(call, request, outcome)
        except ApiError as exc:
            outcome.status = oip_status(exc)
            raise
        except Exception as exc:
            log.exception("request %s failed", request.request_id)
            raise internal(f"{type(exc).__name__}: {exc}") from None
        finally:
            if outcome.reservation is not None:  # not submitted (an error, a timeout): the places go back
                self.parts.service.scheduler.release(outcome.reservation)
            if outcome.in_flight is not None:
                outcome.in_flight.dec()
            _count(self.parts, outcome, time.monotonic() - request.started)

    async def _classify(self, call: ClassifyCall, request: ClassifyRequest,
                        outcome: _Outcome) -> Classification:
        parts, service = self.parts, self.parts.service
        limit_s = parts.config.limits.request_timeout_s
        deadline = request.started + (limit_s if call.timeout_s is None else min(limit_s, call.timeout_s))
        if not service.ready.is_set():
            raise not_ready("models are still loading and warming up")
        route = outcome.route = parts.registry.choose(
            model=call.model, experiment=call.experiment, variant=call.variant, headers=request.headers,
            query=request.query, client_host=request.client_host)
        outcome.labels = (route.model, route.variant, route.experiment or "")
        outcome.in_flight = parts.metrics.in_flight_of(route.model, route.variant)
        outcome.in_flight.inc()
        outcome.n_images = len(call.images)
        images = await self._crops(route, call.images, outcome, deadline)
        items = _submit(parts, route, images, call.top_k, deadline, outcome)
        results = await _results(parts, items, deadline)
        _observe(parts, outcome, results)
        if route.shadow_variant is not None and parts.shadows is not None:
            parts.shadows.start(route, images, list(results))
        outcome.status = 200
        classified = tuple(ClassifiedImage(tuple(r.indices), tuple(r.scores), r.input_tokens,
                                           tuple(r.tokens_per_block), r.gflops) for r in results)
        return Classification(route.model, route.variant, route.experiment, route.assignment,
                              service.models[route.model].weights, classified)

    async def _crops(self, route: Assignment, images: Images, outcome: _Outcome,
                     deadline: float) -> list[torch.Tensor]:
        """The request's images as the batches' [3, H, W] images (uint8 crops, or float32 normalised pixels),
        admitted as /v1/classify's are: the queue's places are reserved before anything is decoded."""
        parts = self.parts
        if images.kind == "encoded":
            return await decode_admitted(parts, route, outcome, list(images.encoded), deadline)
        assert images.array is not None
        outcome.reservation = _reserve(parts, route, outcome.n_images)
        if images.kind == "uint8_hwc":
            return uint8_crops(images.array)
        return list(torch.from_numpy(images.array).unbind(0))  # float32 [3, H, W]: normalised already


def _endpoint(route: Route, engine: ServerEngine) -> Callable[[Request], Any]:
    async def endpoint(request: Request) -> Response:
        parts = engine.parts
        request.state.oip_request = http_classify_request(request, request.app.state.behind_frontends)
        body = b""
        if route.method == "POST":
            limits = parts.config.limits
            try:
                body = await read_limited(request.receive, request.headers.get("content-length", ""),
                                          limits.max_body_bytes, limits.request_timeout_s)
            except ApiError as exc:
                engine.record_refusal(request.path_params.get("model", ""), oip_status(exc), request)
                return _response(error_reply(exc))
        reply = await route.handler(engine, request.path_params, body, request.headers, request)
        return _response(reply)

    return endpoint


def _response(reply: Reply) -> Response:
    return Response(reply.body, reply.status, headers=reply.headers)


_OIP_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "string", "description": "<code>: <detail>, the code as docs/api.md has it"}}}
_JSON_OBJECT = {"application/json": {"schema": {"type": "object"}}}
_BINARY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
_READY = {"application/json": {"schema": {"type": "object", "required": ["ready"], "properties": {
    "name": {"type": "string"}, "ready": {"type": "boolean"}}}}}


def _errors(*documented: tuple[int, str]) -> dict[int | str, dict[str, Any]]:
    retry = {"Retry-After": {"required": True, "schema": {"type": "string"}}}
    return {status: {"description": text, "content": {"application/json": {"schema": _OIP_ERROR}},
                     **({"headers": retry} if status == 503 else {})} for status, text in documented}


_UNKNOWN = (404, "unknown_model or unknown_variant (the version)")
_INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"}, "parameters": {"type": "object"},
        "inputs": {"type": "array", "minItems": 1, "items": {"type": "object"}},
        "outputs": {"type": "array", "items": {"type": "object"}}}}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary",
                                            "description": "JSON header, then binary tensor data "
                                                           "(Inference-Header-Content-Length)"}}}}}
# What each handler can answer (docs/oip.md), for the OpenAPI description.
_RESPONSES: dict[str, dict[int | str, dict[str, Any]]] = {
    "server_metadata_handler": {200: {"description": "server metadata", "content": _JSON_OBJECT}},
    "server_live": {200: {"description": "live", "content": {"application/json": {"schema": {
        "type": "object", "required": ["live"], "properties": {"live": {"type": "boolean"}}}}}}},
    "server_ready": {200: {"description": "ready", "content": _READY},
                     503: {"description": "loading", "content": _READY}},
    "model_metadata_handler": {200: {"description": "model metadata", "content": _JSON_OBJECT},
                               **_errors(_UNKNOWN, (503, "not_ready: the model is loading"))},
    "model_ready_handler": {200: {"description": "ready", "content": _READY},
                            503: {"description": "loading", "content": _READY}, **_errors(_UNKNOWN)},
    "infer": {200: {"description": "outputs: JSON, or JSON then binary tensor data",
                    "content": {**_JSON_OBJECT, **_BINARY}},
              **_errors((400, "invalid_request (malformed JSON or tensors, datatype, shape) or bad_image"),
                        _UNKNOWN, (408, "request_timeout: the body did not arrive in time"),
                        (413, "too_large: body bytes, images or pixels over the limits"),
                        (415, "unsupported_media_type: a compressed request"),
                        (500, "internal: the batch failed on the device"), (503, "overloaded or not_ready"),
                        (504, "timeout: no answer within the request timeout"))},
}


def add_oip_routes(app: FastAPI, parts: ServerParts) -> None:
    """Every route of the protocol (docs/oip.md) on `app`, answered over `parts`."""
    engine = ServerEngine(parts)
    for route in ROUTES:
        app.add_api_route(route.path, _endpoint(route, engine), methods=[route.method], summary=route.summary,
                          tags=["Open Inference Protocol v2"], response_model=None,
                          responses=_RESPONSES[route.handler.__name__],
                          openapi_extra=_openapi_extra(route))


def _openapi_extra(route: Route) -> dict[str, Any]:
    """The path's parameters (the endpoint reads them from the request itself) and infer's body."""
    described = {"model": "the model's name", "version": "one of the model's variants"}
    parameters = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"},
                   "description": text} for name, text in described.items() if f"{{{name}}}" in route.path]
    return {"parameters": parameters, **(_INFER_BODY if route.method == "POST" else {})}
