"""The FastAPI application: HTTP in, images to the inference service, JSON answers and metrics out."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from server.batching import QueueFull, SchedulerClosed
from server.config import ServingConfig
from server.errors import (
    ApiError,
    bad_image,
    internal,
    invalid_parameter,
    not_ready,
    overloaded,
    timeout,
    too_large,
)
from server.imaging import check_content_type, decode_image
from server.metrics import Metrics
from server.routing import Route, choose_route
from server.service import InferenceService
from server.worker import ImageResult

log = logging.getLogger("mame.server")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def _request_id(request: Request) -> str:
    given = request.headers.get("x-request-id", "")
    return given if _REQUEST_ID.match(given) else uuid.uuid4().hex


def _error_response(exc: ApiError, request_id: str) -> JSONResponse:
    return JSONResponse(
        {"error": exc.code, "detail": exc.detail, "request_id": request_id},
        status_code=exc.status, headers={**exc.headers, "X-Request-Id": request_id},
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes (or announces more)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(f"request body of {declared} bytes is over the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def image_payloads(request: Request, body: bytes, max_files: int) -> tuple[list[tuple[str, bytes]], bool]:
    """(name, bytes) of each image, and whether the request was multipart (answered as a list if several)."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        check_content_type(content_type)
        return [("body", body)], False

    async def replay() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=max_files, max_fields=max_files + 16)
    except MultiPartException as exc:
        if "Too many files" in exc.message:
            raise too_large(f"too many files in one request (limit {max_files})") from None
        raise bad_image(f"malformed multipart body: {exc.message}") from None
    files = [value for key, value in form.multi_items() if key == "file" and isinstance(value, UploadFile)]
    if not files:
        raise invalid_parameter("the multipart body has no `file` field holding an image")
    payloads = []
    for upload in files:
        check_content_type(upload.content_type)
        payloads.append((upload.filename or "file", await upload.read()))
    await form.close()
    return payloads, True


def image_answer(route: Route, weights: str, labels: list[str], request_id: str, result: ImageResult,
                 total_s: float) -> dict[str, Any]:
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
            for i, s in zip(result.indices, result.scores)
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


def create_app(config: ServingConfig, *, preprocess_threads: int = 4, warmup: bool = True,
               torch_threads: int | None = None,
               on_fatal: Callable[[BaseException], None] | None = None) -> FastAPI:
    metrics = Metrics()
    service = InferenceService(config, metrics, warmup=warmup, torch_threads=torch_threads or torch.get_num_threads())
    # One torch thread per preprocessing thread: their tensors are small, and nested OpenMP pools in many
    # threads oversubscribe the cores (measured on an H200 host: 60 img/s served instead of thousands).
    pool = ThreadPoolExecutor(preprocess_threads, thread_name_prefix="preprocess",
                              initializer=torch.set_num_threads, initargs=(1,))
    limits = config.limits

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start(on_failure=on_fatal)
        yield
        # uvicorn has stopped accepting and answered every open request before we get here.
        await asyncio.get_running_loop().run_in_executor(None, service.stop)
        pool.shutdown(wait=True)

    app = FastAPI(
        title="MaMe inference server",
        summary="Image classification with timm ViTs accelerated by MaMe token merging",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.metrics = metrics

    @app.middleware("http")
    async def add_request_id(request: Request, call_next):
        request.state.request_id = _request_id(request)
        response = await call_next(request)
        response.headers["X-Request-Id"] = request.state.request_id
        return response

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc, request.state.request_id)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return _error_response(invalid_parameter(problems), request.state.request_id)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error_response(ApiError(exc.status_code, code, str(exc.detail)), request.state.request_id)

    def prepare(model: str, data: bytes) -> torch.Tensor:
        image = decode_image(data, limits.max_pixels)
        return service.transforms[model](image)

    @app.post("/v1/classify", summary="Classify one or more images")
    async def classify(
        request: Request,
        model: str | None = Query(None, description="model name (default: the config's default model)"),
        variant: str | None = Query(None, description="variant name (default: the model's default variant)"),
        experiment: str | None = Query(None, description="A/B experiment name"),
        top_k: int = Query(5, description="how many predictions per image (1..max_top_k)"),
    ) -> Any:
        started = time.monotonic()
        deadline = started + limits.request_timeout_s
        request_id = request.state.request_id
        labels = {"model": model or "", "variant": "", "experiment": experiment or ""}
        n_images, status, in_flight = 0, 500, None
        log.debug("request %s accepted", request_id)
        try:
            if not service.ready.is_set():
                raise not_ready("models are still loading and warming up")
            if not 1 <= top_k <= limits.max_top_k:
                raise invalid_parameter(f"top_k must be between 1 and {limits.max_top_k}, got {top_k}")
            route = choose_route(config, model=model, variant=variant, experiment=experiment,
                                 headers=request.headers, client_host=request.client.host if request.client else None)
            labels = {"model": route.model, "variant": route.variant, "experiment": route.experiment or ""}
            in_flight = metrics.in_flight.labels(route.model, route.variant)
            in_flight.inc()
            body = await read_body(request, limits.max_body_bytes)
            payloads, multipart = await image_payloads(request, body, limits.max_images_per_request)
            n_images = len(payloads)
            loop = asyncio.get_running_loop()
            images = await asyncio.gather(*(loop.run_in_executor(pool, prepare, route.model, data)
                                            for _, data in payloads))
            try:
                items = service.submit(route.model, route.variant, list(images), top_k, deadline)
            except QueueFull as exc:
                raise overloaded(str(exc)) from None
            except SchedulerClosed as exc:
                raise overloaded(str(exc), retry_after_s=5) from None
            try:
                results = await asyncio.wait_for(asyncio.gather(*(item.future for item in items)),
                                                 timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                service.scheduler.discard(items)
                raise timeout(f"no answer within the request timeout of {limits.request_timeout_s} s") from None
            total_s = time.monotonic() - started
            info = service.models[route.model]
            answers = [image_answer(route, info.weights, info.labels, request_id, r, total_s) for r in results]
            for r, answer in zip(results, answers):
                metrics.queue_wait.labels(**labels).observe(r.queue_s)
                metrics.final_tokens.labels(**labels).observe(answer["tokens"]["final"])
                metrics.gflops.labels(**labels).observe(r.gflops)
            status = 200
            if multipart and len(answers) > 1:
                return {"request_id": request_id, "results": answers}
            return answers[0]
        except ApiError as exc:
            status = exc.status
            raise
        except Exception as exc:
            log.exception("request %s failed", request_id)
            raise internal(f"{type(exc).__name__}: {exc}") from None
        finally:
            log.debug("request %s answered %d", request_id, status)
            if in_flight is not None:
                in_flight.dec()
            metrics.request_duration.labels(**labels).observe(time.monotonic() - started)
            metrics.requests.labels(**labels, status=str(status)).inc()
            if n_images:
                metrics.images.labels(**labels, status=str(status)).inc(n_images)

    @app.get("/v1/models", summary="Served models and their variants")
    async def list_models() -> dict[str, Any]:
        return {
            "models": [info.describe(config) for info in service.models.values()],
            "default_model": config.default_model_name,
            "ready": service.ready.is_set(),
        }

    @app.get("/healthz", summary="Liveness: the process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: models loaded and warmed up")
    async def readyz() -> JSONResponse:
        if service.failed is not None:
            return JSONResponse({"status": "failed", "detail": str(service.failed)}, status_code=503)
        if not service.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
