"""The FastAPI application of the engine: wiring only (the service, the experiments, the metrics, the routes,
the middleware, and the channel on which front-end processes send the requests they decoded)."""

from __future__ import annotations

import asyncio
import functools
import gc
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import torch
from fastapi import FastAPI

from server.decode.budget import PixelBudget
from server.decode.lane import large_image_pool
from server.experiments.fleet import FleetOptions, SplitSync
from server.experiments.labels import RecentAnswers
from server.experiments.registry import ExperimentRegistry, ModelVariants
from server.http import middleware
from server.http.answers import error_response, unexpected_error
from server.http.classify import ClassifyRequest, Engine, FrontendResults, classify_decoded
from server.http.docs_page import add_docs_page
from server.http.explain import explain
from server.http.heartbeat import LoopHeartbeat
from server.http.oip import add_oip_routes
from server.http.openapi import with_top_k_bound
from server.http.routes import frontend_router, router, sync_weights
from server.http.shadow import Shadows
from server.wire import channel
from server.wire.admin import admin_token_from_env
from server.wire.errors import ApiError
from server.wire.protocol import FRONTEND_CLIENT, FRONTEND_STARTED, request_id_of

if TYPE_CHECKING:
    from starlette.responses import Response

    from server.config import ServingConfig
    from server.engine.service import InferenceService


def build_registry(config: ServingConfig) -> ExperimentRegistry:
    """The experiment registry of a server, holding the config's experiments (logged as source "config")."""
    models = {
        name: ModelVariants(frozenset(m.variants), m.default_variant_name)
        for name, m in config.models.items()
    }
    return ExperimentRegistry(models, config.default_model_name, config.experiments)


def recent_answers(config: ServingConfig) -> RecentAnswers | None:
    labels = config.labels
    return RecentAnswers(labels.max_answers, labels.ttl_s) if labels.max_answers else None


def build_engine(config: ServingConfig, service: InferenceService, preprocess_threads: int,
                 large_image_threads: int = 1, fleet: FleetOptions | None = None) -> Engine:
    registry, metrics = build_registry(config), service.metrics
    fleet = fleet or FleetOptions()
    splits = None
    if fleet.split_store is not None:
        splits = SplitSync(registry, fleet.split_store, writer=fleet.split_store_write, poll_s=fleet.poll_s)
        splits.poll()  # before serving: a restart keeps the fleet's split
    # One torch thread per preprocessing thread: their tensors are small, and nested OpenMP pools in many
    # threads oversubscribe the cores.
    pool = ThreadPoolExecutor(preprocess_threads, thread_name_prefix="preprocess",
                              initializer=torch.set_num_threads, initargs=(1,))
    # Large images (a second of a core each at 36 Mpx) in a lane of their own, at a lower CPU priority:
    # however many arrive, they leave the other threads to small images and the cores to the event loop
    # and the forward passes first.
    large_pool = large_image_pool(large_image_threads, config.limits.large_image_nice,
                                  initializer=lambda: torch.set_num_threads(1))
    engine = Engine(config, service, registry, metrics, pool, shadows=Shadows(service, registry, metrics),
                    pixels=PixelBudget(config.limits.max_decoding_pixels), large_pool=large_pool,
                    splits=splits, judge_url=fleet.judge_url, answers=recent_answers(config))
    if splits is not None:
        splits.on_change = lambda: sync_weights(engine)
    sync_weights(engine)
    return engine


EXPLAIN_PATH = "/v1/explain"  # a channel request's "path": classify's when absent


_explaining: set[asyncio.Task] = set()  # explanations answering a front-end (the loop keeps weak references)


def channel_request(engine: Engine, head: channel.Head, body: bytes, reply: channel.Reply) -> None:
    """A request a front-end decoded, from the channel (server/wire/channel.py), answered through `reply` by
    classify_decoded() (or explain(), for the path /v1/explain). A classification's answer is its results:
    the head says "results", and the front-end renders them (server/wire/results.py)."""
    path, headers = head.get("path", "/v1/classify"), head.get("headers")
    # The front-end gives every request a valid id (the client's, or a new one)
    request_id = (headers.get("x-request-id") if isinstance(headers, dict) else None) or request_id_of([])

    def answer(response: Response | FrontendResults | ApiError | BaseException) -> None:
        reply(*_channel_answer(response, request_id, path))

    try:
        given_start = headers.get(FRONTEND_STARTED)
        request = ClassifyRequest(request_id, head["query"], headers,
                                  headers.get(FRONTEND_CLIENT),
                                  float(given_start) if given_start else time.monotonic(), receive=None,
                                  crops=body)
        if path != EXPLAIN_PATH:
            classify_decoded(engine, request, answer)
            return
        task = asyncio.get_running_loop().create_task(explain(engine, request))
    except Exception as exc:  # noqa: BLE001 - answered
        answer(exc)
        return
    _explaining.add(task)
    task.add_done_callback(_explaining.discard)
    task.add_done_callback(lambda done: answer(_outcome_of(done)))


def _outcome_of(task: asyncio.Task) -> Any:
    """A finished task's result, or the exception it ended with."""
    if task.cancelled():
        return asyncio.CancelledError()
    return task.exception() or task.result()


def _channel_answer(response: Response | FrontendResults | ApiError | BaseException, request_id: str,
                    path: str) -> tuple[channel.Head, bytes]:
    """The channel's answer (head, body) to a front-end's request."""
    if isinstance(response, FrontendResults):  # "results": the front-end renders the answer
        headers_out = [["content-type", "application/json"], ["x-request-id", request_id]]
        return {"status": 200, "results": True, "headers": headers_out}, response.message
    if isinstance(response, ApiError):
        response = error_response(response, request_id)
    elif isinstance(response, BaseException):  # logged; without an answer the request would wait for ever
        response = unexpected_error("POST", f"{path} (decoded by a front-end)", request_id, response)
    answer_headers = [[name.decode("latin-1"), value.decode("latin-1")]
                      for name, value in response.raw_headers if name != b"x-request-id"]
    answer_headers.append(["x-request-id", request_id])
    return {"status": response.status_code, "headers": answer_headers}, bytes(response.body)


# Net new objects that start a collection of the youngest generation while serving (CPython's default: 700).
# An answered request leaves no cyclic garbage, so such a collection frees nothing; at 700, what the requests
# of one batch hold at once started one every few milliseconds, and their survivors the older generations'.
SERVING_GC_THRESHOLD = 10_000


def collector_for_serving() -> None:
    """What is alive now (imported modules: torch, timm, FastAPI, pydantic; ~400k objects) lives as long as
    the process. Frozen, the cyclic collector stops walking it: a full collection holds the GIL (every
    thread, the event loop included, stalls) for a time that grows with the objects it walks. Then the
    youngest generation is collected every SERVING_GC_THRESHOLD net new objects (docs/benchmarks.md)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(SERVING_GC_THRESHOLD, *gc.get_threshold()[1:])


def create_app(config: ServingConfig, service: InferenceService, *, preprocess_threads: int = 4,
               large_image_threads: int = 1, on_fatal: Callable[[BaseException], None] | None = None,
               frontend_channel: str | None = None, fleet: FleetOptions | None = None) -> FastAPI:
    """The engine's application around `service` (which it starts and stops with its lifespan).
    `frontend_channel`: the path of a Unix socket on which it takes the requests that HTTP front-end
    processes (server/frontend/) have decoded; the app then serves the front-ends on a private Unix socket
    and trusts their `x-mame-*` headers (client address, start time). `fleet`: the split store and the judge
    (docs/ab_testing.md)."""
    engine = build_engine(config, service, preprocess_threads, large_image_threads, fleet)
    metrics = service.metrics
    heartbeat = LoopHeartbeat(config.health.loop_stall_s, observe_lag=metrics.event_loop_lag.observe)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        collector_for_serving()
        heartbeat.start()
        service.start(on_failure=on_fatal)
        if engine.splits is not None:
            engine.splits.start()
        channel_server = None
        if frontend_channel is not None:
            channel_server = await channel.serve(frontend_channel, functools.partial(channel_request, engine))
        yield
        # uvicorn has stopped accepting and answered every open request before we get here (and the
        # front-ends have stopped: each answered what it accepted).
        if channel_server is not None:
            channel_server.close()
        if engine.splits is not None:
            engine.splits.stop()
        await asyncio.get_running_loop().run_in_executor(None, service.stop)
        heartbeat.stop()
        engine.pool.shutdown(wait=True)
        if engine.large_pool is not None:
            engine.large_pool.shutdown(wait=True)
        gc.unfreeze()

    app = FastAPI(title="MaMe inference server", version="0.1.0", lifespan=lifespan,
                  summary="Image classification with timm ViTs accelerated by MaMe token merging",
                  docs_url=None, redoc_url=None)  # /docs: add_docs_page, with no other host
    app.state.engine = engine
    app.state.heartbeat = heartbeat
    app.state.behind_frontends = frontend_channel is not None
    app.state.service = service
    app.state.metrics = metrics
    app.state.experiments = engine.registry
    middleware.install(app, admin_token=admin_token_from_env(), drop_reserved=frontend_channel is None,
                       body_timeout_s=config.limits.request_timeout_s)
    app.include_router(router)
    add_oip_routes(app, engine)  # /v2: the Open Inference Protocol (docs/oip.md)
    add_docs_page(app)
    openapi = app.openapi

    def contract() -> dict:  # FastAPI caches it in app.openapi_schema
        return with_top_k_bound(openapi(), config.limits.max_top_k)

    app.openapi = contract
    if frontend_channel is not None:
        app.include_router(frontend_router)
    return app
