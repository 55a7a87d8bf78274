"""The FastAPI application: HTTP in, images to the inference service, JSON answers and metrics out."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any

import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import TypeAdapter, ValidationError
from pydantic_core import to_json
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import get_route_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import channel
from server.batching import QueueFull, SchedulerClosed, WorkItem
from server.config import ServingConfig
from server.errors import (
    ApiError,
    internal,
    invalid_parameter,
    not_ready,
    overloaded,
    timeout,
    too_large,
)
from server.experiments import (
    ExperimentError,
    NewExperiment,
    SplitChange,
    Top1,
    admin_token_from_env,
    check_admin,
    compare_top1,
)
from server.frontend import (
    FRONTEND_CLIENT,
    FRONTEND_IMAGES,
    FRONTEND_MODEL,
    FRONTEND_MULTIPART,
    FRONTEND_STARTED,
    decode_plan,
)
from server.hostpath import image_payloads, read_limited, request_id_of, run_all_in_pool, without_reserved
from server.intake import CropArenas, Reroute, frontend_crops, raise_frontend_error
from server.metrics import Metrics
from server.routing import Route, as_api_error, build_registry, choose_route
from server.service import InferenceService
from server.worker import ImageResult

log = logging.getLogger("mame.server")

Handler = Callable[[Request], Awaitable[Response]]


class RequestIdMiddleware:
    """Puts the request id (the client's valid X-Request-Id, else a new one) in `request.state.request_id`
    and in the answer's X-Request-Id header. Plain ASGI: `@app.middleware("http")` (Starlette's
    BaseHTTPMiddleware) spends a task group, streams and events on every request and every body read.

    `direct` maps (method, path) to a handler that this middleware calls itself, past the exception
    middleware, the router and FastAPI's request handling, which cost the event loop more than the hot
    `POST /v1/classify` handler does. Such a handler takes no parameters from FastAPI and answers a
    Response or raises ApiError (answered as the ApiError exception handler does); the route stays
    registered with FastAPI, which serves it (and documents it) when FastAPI's telemetry is on."""

    def __init__(self, app: ASGIApp, direct: dict[tuple[str, str], Handler] | None = None,
                 drop_reserved: bool = True) -> None:
        self.app = app
        self.direct = direct if direct is not None else {}
        self.drop_reserved = drop_reserved  # x-mame-* headers; kept behind front-ends, which set them

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] == "HEAD":  # as GET (load balancers probe with HEAD); uvicorn sends no body
            scope = {**scope, "method": "GET"}
        if self.drop_reserved:
            scope["headers"] = without_reserved(scope["headers"])
        request_id = request_id_of(scope["headers"])
        scope.setdefault("state", {})["request_id"] = request_id
        handler = self.direct.get((scope["method"], get_route_path(scope)))
        if handler is not None and "fastapi.telemetry" not in scope:
            request = Request(scope, receive)
            try:
                response = await handler(request)
            except ApiError as exc:
                response = _error_response(exc, request_id)
            except Exception:  # noqa: BLE001 - logged and answered as a 500 by _unexpected_error
                response = _unexpected_error(scope, request_id)
            response.headers["X-Request-Id"] = request_id
            await response(scope, receive, send)
            return

        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message.setdefault("headers", [])
                MutableHeaders(scope=message)["X-Request-Id"] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            if started:  # too late for an answer: uvicorn closes the connection
                raise
            # A bug, answered here: Starlette's would be a text/plain 500 without an id, and uvicorn would then
            # close the connection, failing the client's next request on it too.
            await _unexpected_error(scope, request_id)(scope, receive, send)


class AdminAuthMiddleware:
    """Refuses `/v1/admin/...` without the right token (MAME_ADMIN_TOKEN: 404 when unset, 401 without, 403 when
    wrong) before anything reads the body: FastAPI parses a body parameter before it runs a route's
    dependencies, so a malformed body with a wrong token got a 422. Front-ends check the same way."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (scope["path"] + "/").startswith("/v1/admin/"):
            denied = check_admin(Headers(scope=scope).get("authorization"), self.token)
            if denied is not None:
                await _error_response(denied.as_api_error(), scope["state"]["request_id"])(scope, receive, send)
                return
        await self.app(scope, receive, send)


DEFAULT_TOP_K = 5

_ERROR_SCHEMA = {"type": "object", "required": ["error", "detail", "request_id"], "properties": {
    "error": {"type": "string"}, "detail": {"type": "string"}, "request_id": {"type": "string"}}}
# The body the handler reads itself (so FastAPI cannot infer it), and its errors: /docs can send an image.
CLASSIFY_OPENAPI = {
    "requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
            "file": {"type": "array", "items": {"type": "string", "format": "binary"},
                     "description": "one or more images (several: the answer is {request_id, results: [...]})"}}}},
        "image/*": {"schema": {"type": "string", "format": "binary"}},
    }},
}


def error_responses(*documented: tuple[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the contract's error body. A route that lists 422 here is not given FastAPI's
    HTTPValidationError, which is not what this server answers."""
    return {status: {"description": text, "content": {"application/json": {"schema": _ERROR_SCHEMA}}}
            for status, text in documented}


_ADMIN_ERRORS = ((401, "unauthorized: no bearer token"), (403, "forbidden: wrong token"),
                 (404, "admin_disabled (MAME_ADMIN_TOKEN unset), unknown_model, unknown_variant, unknown_experiment"),
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
_INT = TypeAdapter(int)


def query_int(value: str | None, name: str, default: int) -> int:
    """An integer query parameter as FastAPI's `Query` validation read it (pydantic's lax int), with the
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
    """What FastAPI answered for an endpoint returning `Any`: pydantic's JSON bytes (compact), application/json."""
    return Response(to_json(content), media_type="application/json")


def _unexpected_error(scope: Scope, request_id: str) -> Response:
    """The contract's 500 `internal` for an exception nothing else answered; the traceback goes to the log."""
    log.exception("request %s (%s %s) failed", request_id, scope["method"], scope["path"])
    return _error_response(internal(f"unexpected server error; the server log has request {request_id}"), request_id)


def _error_response(exc: ApiError, request_id: str) -> Response:
    return Response(exc.to_answer(request_id), status_code=exc.status,
                    headers={**exc.headers, "X-Request-Id": request_id}, media_type="application/json")


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
               torch_threads: int | None = None, device_process: str = "auto", decode_processes: str = "auto",
               on_fatal: Callable[[BaseException], None] | None = None,
               frontend_channel: str | None = None) -> FastAPI:
    """The server's application. `frontend_channel`: the path of a Unix socket on which it takes the requests
    that HTTP front-end processes (server/frontend.py) have decoded (server/channel.py); it then listens on a
    private Unix socket too, for what they pass on as it came. Their `x-mame-*` headers (client address,
    start time) are trusted: nothing else can connect."""
    behind_frontends = frontend_channel is not None
    metrics = Metrics()
    service = InferenceService(config, metrics, warmup=warmup, torch_threads=torch_threads or torch.get_num_threads(),
                               device_process=device_process, decode_processes=decode_processes,
                               preprocess_threads=preprocess_threads)
    # One torch thread per preprocessing thread: their tensors are small, and nested OpenMP pools in many
    # threads oversubscribe the cores (measured on an H200 host: 60 img/s served instead of thousands).
    pool = ThreadPoolExecutor(preprocess_threads, thread_name_prefix="preprocess",
                              initializer=torch.set_num_threads, initargs=(1,))
    limits = config.limits
    registry = build_registry(config)
    admin_token = admin_token_from_env()
    arenas = CropArenas()
    shadow_tasks: set[asyncio.Task] = set()  # strong references: the loop keeps only weak ones

    def sync_weights() -> None:
        """`mame_experiment_weight` shows the splits in force; a stopped experiment's series disappear."""
        metrics.experiment_weight.clear()
        for name, split in registry.current_weights().items():
            for variant, weight in split.items():
                metrics.experiment_weight.labels(name, variant).set(weight)

    sync_weights()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # What is alive now (imported modules: torch, timm, FastAPI, pydantic; ~400k objects) lives as long
        # as the process. Frozen, the cyclic collector stops walking it: a full collection took ~170 ms with
        # the GIL held (every thread, the event loop included, stalled), every ~10 s under load.
        gc.collect()
        gc.freeze()
        service.start(on_failure=on_fatal)
        channel_server = await channel.serve(frontend_channel, channel_request) if frontend_channel else None
        yield
        # uvicorn has stopped accepting and answered every open request before we get here (and the
        # front-ends have stopped: each answered what it accepted).
        if channel_server is not None:
            channel_server.close()
        await asyncio.get_running_loop().run_in_executor(None, service.stop)
        pool.shutdown(wait=True)
        gc.unfreeze()

    app = FastAPI(
        title="MaMe inference server",
        summary="Image classification with timm ViTs accelerated by MaMe token merging",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.metrics = metrics
    app.state.experiments = registry

    direct_routes: dict[tuple[str, str], Handler] = {}  # filled below
    app.add_middleware(AdminAuthMiddleware, token=admin_token)  # inside RequestIdMiddleware: the id is set
    app.add_middleware(RequestIdMiddleware, direct=direct_routes, drop_reserved=not behind_frontends)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return _error_response(exc, request.state.request_id)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return _error_response(invalid_parameter(problems), request.state.request_id)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400:  # FastAPI's "There was an error parsing the body" (not UTF-8, cut short, ...)
            cause = f"{type(exc.__cause__).__name__}: {exc.__cause__}" if exc.__cause__ else exc.detail
            return _error_response(invalid_parameter(f"body: could not be read ({cause})"), request.state.request_id)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        # Starlette's headers too: a 405 must say what is allowed (RFC 9110 15.5.6).
        return _error_response(ApiError(exc.status_code, code, str(exc.detail), dict(exc.headers or {})),
                               request.state.request_id)

    def check_queue_room(model: str, n_images: int) -> None:
        """More images than the model's queue holds would be a 503 `overloaded` on every try, idle or not."""
        limit = config.models[model].batching.max_queue
        if n_images > limit:
            raise too_large(f"{n_images} images in one request; model {model!r} queues at most {limit} "
                            "(its batching.max_queue)")

    def prepare(model: str, data: bytes) -> torch.Tensor:
        return service.preprocess(model, data, limits.max_pixels)

    async def run_shadow(route: Route, images: list[torch.Tensor], results: list[ImageResult]) -> None:
        """Run answered images again on the route's reference variant, at low priority, and compare top-1s."""
        reference = route.shadow_variant
        assert reference is not None
        labels = (route.model, route.experiment or "", route.variant, reference)  # the shadow metrics' order
        loop = asyncio.get_running_loop()
        settings = config.models[route.model].variants[reference]
        deadline = time.monotonic() + limits.request_timeout_s
        items = [WorkItem(route.model, reference, settings, image, 1, deadline, loop.create_future(), loop)
                 for image in images]
        try:
            service.scheduler.submit(items, shadow=True)
        except (QueueFull, SchedulerClosed) as exc:
            log.debug("shadow run dropped: %s", exc)
            metrics.shadow_dropped_of(*labels).inc(len(items))
            return
        outcomes = await asyncio.gather(*(item.future for item in items), return_exceptions=True)
        for served, shadowed in zip(results, outcomes):
            if isinstance(shadowed, BaseException):  # expired in the queue or dropped at shutdown
                metrics.shadow_dropped_of(*labels).inc()
                continue
            # clamp: a float32 softmax may overshoot 1 by an ulp
            comparison = compare_top1(Top1(served.indices[0], min(served.scores[0], 1.0)),
                                      Top1(shadowed.indices[0], min(shadowed.scores[0], 1.0)))
            registry.record_shadow(route, comparison)
            metrics.shadow_comparisons_of(*labels).inc()
            metrics.shadow_agreements_of(*labels).inc(comparison.agree)
            metrics.shadow_top1_prob_abs_diff_sum_of(*labels).inc(comparison.prob_abs_diff)

    def start_shadow(route: Route, images: list[torch.Tensor], results: list[ImageResult]) -> None:
        task = asyncio.create_task(run_shadow(route, images, results))
        shadow_tasks.add(task)
        task.add_done_callback(shadow_tasks.discard)

    def client_host(request: Request) -> str | None:
        if behind_frontends:
            return request.headers.get(FRONTEND_CLIENT)
        return request.client.host if request.client else None

    async def classify_request(request: Request, from_frontend: bool = False) -> Response:
        """`POST /v1/classify`: the answer, or an ApiError. Plain Python on the request's path: it runs on the
        event loop, the one thread every request passes through (docs/CONTRACT.md has the contract).

        `from_frontend`: `/internal/classify`, the same request decoded by a front-end process."""
        params = request.query_params
        model, variant, experiment = params.get("model"), params.get("variant"), params.get("experiment")
        # CLOCK_MONOTONIC is one clock for every process of the host: the front-end's start counts.
        given_start = request.headers.get(FRONTEND_STARTED) if behind_frontends else None
        started = float(given_start) if given_start else time.monotonic()
        deadline = started + limits.request_timeout_s
        request_id = request.state.request_id
        # Client-chosen names become label values only when they exist (bounded series).
        experiment_model = registry.model_of(experiment) if experiment is not None else None
        known_experiment = experiment_model is not None
        if model is None:  # what the request asked for, as if named: its experiment's model, or the default
            model_label = (experiment_model or "") if experiment is not None else config.default_model_name
        else:
            model_label = model if model in config.models else ""
        label_values = (model_label, "", experiment if known_experiment else "")
        n_images, status, in_flight, counted = 0, 500, None, True
        route: Route | None = None
        final_tokens: list[int] = []
        gflops: list[float] = []
        log.debug("request %s accepted", request_id)
        try:
            # First, as FastAPI's parameter validation did: a bad value is a 422 (counted like any answer).
            top_k = query_int(params.get("top_k"), "top_k", DEFAULT_TOP_K)
            if not service.ready.is_set():
                raise not_ready("models are still loading and warming up")
            if not 1 <= top_k <= limits.max_top_k:
                raise invalid_parameter(f"top_k must be between 1 and {limits.max_top_k}, got {top_k}")
            route = choose_route(registry, model=model, variant=variant, experiment=experiment,
                                 headers=request.headers, query=params,
                                 client_host=client_host(request))
            label_values = (route.model, route.variant, route.experiment or "")
            in_flight = metrics.in_flight_of(route.model, route.variant)
            in_flight.inc()
            if from_frontend:
                n_images = int(request.headers[FRONTEND_IMAGES])
                multipart = request.headers[FRONTEND_MULTIPART] == "1"
                raise_frontend_error(request)  # errors first: they do not depend on the model
                if request.headers.get(FRONTEND_MODEL) != route.model:
                    raise Reroute(route.model)
                check_queue_room(route.model, n_images)
                images = await frontend_crops(request, service.models[route.model].input_size, arenas)
            else:
                body = await read_limited(request.receive, request.headers.get("content-length", ""),
                                          limits.max_body_bytes, max(0.0, deadline - time.monotonic()))
                payloads, multipart = image_payloads(request.headers.get("content-type", ""), body,
                                                     limits.max_images_per_request)
                n_images = len(payloads)
                check_queue_room(route.model, n_images)
                images = await run_all_in_pool(pool, prepare, [(route.model, data) for _, data in payloads])
            try:
                items = service.submit(route.model, route.variant, list(images), top_k, deadline)
            except QueueFull as exc:
                raise overloaded(str(exc)) from None
            except SchedulerClosed as exc:
                raise overloaded(str(exc), retry_after_s=5) from None
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    if len(items) == 1:
                        results = [await items[0].future]
                    else:
                        results = await asyncio.gather(*(item.future for item in items))
            except TimeoutError:
                service.scheduler.discard(items)
                raise timeout(f"no answer within the request timeout of {limits.request_timeout_s} s") from None
            total_s = time.monotonic() - started
            info = service.models[route.model]
            answers = [image_answer(route, info.weights, info.labels, request_id, r, total_s) for r in results]
            queue_wait = metrics.queue_wait_of(*label_values)
            final_tokens_hist = metrics.final_tokens_of(*label_values)
            gflops_hist = metrics.gflops_of(*label_values)
            for r, answer in zip(results, answers):
                final = answer["tokens"]["final"]
                queue_wait.observe(r.queue_s)
                final_tokens_hist.observe(final)
                gflops_hist.observe(r.gflops)
                final_tokens.append(final)
                gflops.append(r.gflops)
            if route.shadow_variant is not None:
                # Crops in a front-end's arena are its to reuse once this request is answered: copied.
                start_shadow(route, [image.clone() for image in images] if from_frontend else list(images),
                             list(results))
            status = 200
            if multipart and len(answers) > 1:
                return json_response({"request_id": request_id, "results": answers})
            return json_response(answers[0])
        except ApiError as exc:
            status = exc.status
            raise
        except Reroute as exc:
            counted = False
            return JSONResponse({"error": "reroute", "detail": f"the route's model is {exc}"}, status_code=409)
        except Exception as exc:
            log.exception("request %s failed", request_id)
            raise internal(f"{type(exc).__name__}: {exc}") from None
        finally:
            log.debug("request %s answered %d", request_id, status)
            if in_flight is not None:
                in_flight.dec()
            elapsed = time.monotonic() - started
            if not counted:  # a re-route: the front-end sends the request again, and it is counted then
                pass
            elif route is not None:
                ok = status == 200
                registry.record_request(route, status=status, latency_s=elapsed,
                                        final_tokens=final_tokens if ok else [], gflops=gflops if ok else [])
                # Cached children: the label values are configured names, a bounded set.
                metrics.request_duration_of(*label_values).observe(elapsed)
                metrics.requests_of(*label_values, str(status)).inc()
                if n_images:
                    metrics.images_of(*label_values, str(status)).inc(n_images)
            else:  # rejected before routing (rare): no cached children for these label values
                metrics.request_duration.labels(*label_values).observe(elapsed)
                metrics.requests.labels(*label_values, str(status)).inc()

    @app.post("/v1/classify", summary="Classify one or more images", openapi_extra=CLASSIFY_OPENAPI,
              responses=CLASSIFY_ERRORS)
    async def classify(
        request: Request,
        model: str | None = Query(None, description="model name (default: the config's default model)"),
        variant: str | None = Query(None, description="variant name (default: the model's default variant)"),
        experiment: str | None = Query(None, description="A/B experiment name"),
        top_k: int = Query(DEFAULT_TOP_K, description="how many predictions per image (1..max_top_k)"),
    ) -> Any:
        # The parameters document the route (OpenAPI) and are validated by FastAPI when it routes here, which
        # it does only with its telemetry on: RequestIdMiddleware calls classify_request directly, past
        # FastAPI's per-parameter dependency solving, and classify_request reads the same parameters itself.
        return await classify_request(request)

    direct_routes["POST", "/v1/classify"] = classify_request

    async def channel_request(head: channel.Head, body: bytes) -> tuple[channel.Head, bytes]:
        """A request a front-end decoded, from the channel (server/channel.py): answered by classify_request
        as a request to `/internal/classify` (a Starlette Request over the frame, as the middleware would)."""
        headers = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in head["headers"]]
        request_id = request_id_of(headers)
        scope = {"type": "http", "method": "POST", "path": "/internal/classify", "raw_path": b"/internal/classify",
                 "query_string": head["query"].encode("latin-1"), "headers": headers, "client": None,
                 "server": None, "scheme": "http", "http_version": "1.1", "root_path": "",
                 "state": {"request_id": request_id}}
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> Message:
            return messages.pop() if messages else {"type": "http.disconnect"}

        try:
            response = await classify_request(Request(scope, receive), from_frontend=True)
        except ApiError as exc:
            response = _error_response(exc, request_id)
        except Exception:  # noqa: BLE001 - logged; without an answer the front-end's request would wait for ever
            response = _unexpected_error(scope, request_id)
        response.headers["X-Request-Id"] = request_id
        raw = [[name.decode("latin-1"), value.decode("latin-1")] for name, value in response.headers.raw]
        return {"status": response.status_code, "headers": raw}, bytes(response.body)

    if behind_frontends:
        @app.get("/internal/plan", include_in_schema=False)
        async def frontend_plan() -> dict[str, Any]:
            """What a front-end process needs to decode requests itself (server/frontend.py)."""
            return {
                "ready": service.ready.is_set(),
                "limits": limits.model_dump(),
                "default_model": config.default_model_name,
                "experiment_models": {e["name"]: e["model"] for e in registry.summaries() if e["status"] == "running"},
                "decoders": {name: decode_plan(service.transforms[name], info.input_size)
                             for name, info in service.models.items()} if service.ready.is_set() else {},
            }

    @app.get("/v1/models", summary="Served models and their variants")
    async def list_models() -> dict[str, Any]:
        return {
            "models": [info.describe(config) for info in service.models.values()],
            "default_model": config.default_model_name,
            "ready": service.ready.is_set(),
        }

    @app.get("/v1/experiments", summary="A/B experiments, running and stopped")
    async def list_experiments() -> dict[str, Any]:
        return {"experiments": registry.summaries()}

    @app.get("/v1/experiments/{name}", summary="Per-variant report of one A/B experiment",
             responses=error_responses((404, "unknown_experiment"), (422, "invalid_parameter")))
    async def experiment_report(name: str) -> dict[str, Any]:
        try:
            return registry.report(name)
        except ExperimentError as exc:
            raise as_api_error(exc) from None

    def admin_change(name: str, change: Callable[[], object]) -> dict[str, Any]:
        """Apply one runtime change (the registry logs it), update the weight gauge, answer the report."""
        try:
            change()
        except ExperimentError as exc:
            raise as_api_error(exc) from None
        sync_weights()
        return registry.report(name)

    @app.post("/v1/admin/experiments", status_code=201, summary="Start an experiment",
              responses=error_responses(*_ADMIN_ERRORS, (409, "experiment_exists: a running one has that name")))
    async def create_experiment(body: NewExperiment) -> dict[str, Any]:
        return admin_change(body.name, lambda: registry.create(body.name, body.config(), source="admin"))

    @app.put("/v1/admin/experiments/{name}/split", summary="Change an experiment's split",
             responses=error_responses(*_ADMIN_ERRORS))
    async def change_split(name: str, body: SplitChange) -> dict[str, Any]:
        return admin_change(name, lambda: registry.update_split(name, body.split, source="admin"))

    @app.delete("/v1/admin/experiments/{name}", summary="Stop an experiment",
                responses=error_responses(*_ADMIN_ERRORS))
    async def stop_experiment(name: str) -> dict[str, Any]:
        return admin_change(name, lambda: registry.stop(name, source="admin"))

    @app.get("/v1/admin/changes", summary="Log of experiment changes", responses=error_responses(*_ADMIN_ERRORS[:3]))
    async def experiment_changes() -> dict[str, Any]:
        return {"changes": [asdict(record) for record in registry.changes()]}

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

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse,
             responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}}})
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
