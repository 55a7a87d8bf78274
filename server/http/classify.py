"""`POST /v1/classify`: one module-level function, `classify()`, answers a request whether it came over HTTP
or from a front-end process over the channel (its images then decoded already). Plain Python on the
request's path: it runs on the event loop, the one thread every request passes through (docs/api.md
has the contract)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from starlette.responses import JSONResponse, Response

from server.decode.budget import PixelBudget
from server.decode.imaging import open_all
from server.decode.lane import decode_in_lanes
from server.engine.batching import QueueFull, Reservation, SchedulerClosed, WorkItem
from server.experiments.labels import LABEL_TOP_K
from server.http.answers import json_response, query_int
from server.http.frontend_requests import (
    CropArenas,
    Reroute,
    frontend_crops,
    raise_frontend_error,
    shared_crops_at,
)
from server.http.openapi import DEFAULT_TOP_K
from server.wire.body import image_payloads, read_limited
from server.wire.errors import (
    ApiError,
    internal,
    invalid_parameter,
    not_ready,
    overloaded,
    timeout,
    too_large,
)
from server.wire.protocol import (
    FRONTEND_ADMIT,
    FRONTEND_CLIENT,
    FRONTEND_DECODING_ERROR,
    FRONTEND_IMAGES,
    FRONTEND_MODEL,
    FRONTEND_MULTIPART,
    FRONTEND_RESERVATION,
    FRONTEND_STARTED,
)
from server.wire.results import ImageResult, final_tokens, image_answer, request_answer, results_message

if TYPE_CHECKING:
    from PIL import Image
    from starlette.requests import Request

    from server.config import ServingConfig
    from server.engine.metrics import Metrics
    from server.engine.service import InferenceService
    from server.experiments.fleet import SplitSync
    from server.experiments.labels import RecentAnswers
    from server.experiments.registry import Assignment, ExperimentRegistry
    from server.http.shadow import Shadows

log = logging.getLogger("mame.server")


@dataclass(frozen=True)
class Engine:
    """What answering a request needs: the config, the inference service, the experiments, the metrics, the
    decoding threads, the front-ends' crop arenas and the shadow runs."""

    config: ServingConfig
    service: InferenceService
    registry: ExperimentRegistry
    metrics: Metrics
    pool: ThreadPoolExecutor
    arenas: CropArenas = field(default_factory=CropArenas)
    shadows: Shadows | None = None
    # pixels decoded at once in this process (limits.max_decoding_pixels)
    pixels: PixelBudget = field(default_factory=lambda: PixelBudget(40_000_000))
    # the lane of large images (LARGE_IMAGE_PIXELS and more): None, they decode in `pool` too
    large_pool: ThreadPoolExecutor | None = None
    # front-ends' requests admitted before their decoding: token -> (route, places held)
    admitted: dict[str, tuple[Assignment, Reservation]] = field(default_factory=dict)
    explaining: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(1))  # one at a time
    splits: SplitSync | None = None  # the fleet's split store, when one is configured
    answers: RecentAnswers | None = None  # for labels posted later (None: labels.max_answers is 0)
    judge_url: str | None = None


@dataclass(frozen=True, slots=True)
class FrontendResults:
    """The answer to a request a front-end process decoded: its results (server/wire/results.py), which the
    front-end renders as the JSON answer. 200, application/json."""

    message: bytes


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs twice as much, per request
class ClassifyRequest:
    """One classify request, as either road brings it. `receive`: the HTTP body (ASGI), read here with its
    limits; None for a request a front-end decoded, whose crops are in its arena or in `crops`."""

    request_id: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    client_host: str | None
    started: float  # time.monotonic(); the request's deadline runs from here
    receive: Callable[[], Awaitable[dict]] | None = None
    crops: bytes = b""


def http_classify_request(request: Request, behind_frontends: bool) -> ClassifyRequest:
    """A classify request as it came over HTTP. Behind front-ends only they can connect (a private Unix
    socket), so their `x-mame-*` headers (client address, start time) are trusted."""
    headers = request.headers
    if behind_frontends:
        client_host = headers.get(FRONTEND_CLIENT)
        given_start = headers.get(FRONTEND_STARTED)
    else:
        client_host, given_start = request.client.host if request.client else None, None
    # CLOCK_MONOTONIC is one clock for every process of the host: the front-end's start counts.
    started = float(given_start) if given_start else time.monotonic()
    return ClassifyRequest(request.state.request_id, request.query_params, headers, client_host, started,
                           receive=request.receive)


@dataclass(slots=True)
class _Outcome:
    """What the request's metrics and A/B figures record once it is answered."""

    labels: tuple[str, str, str] | None = None  # model, variant, experiment: set once routed
    status: int = 500
    route: Assignment | None = None
    n_images: int = 0
    counted: bool = True
    final_tokens: list[int] = field(default_factory=list)
    gflops: list[float] = field(default_factory=list)
    in_flight: Any = None
    reservation: Reservation | None = None  # queue places held while the images decode
    shared_at: list[tuple[str, int]] | None = None  # where a front-end left the crops (shared_crops_at)


async def classify(engine: Engine, request: ClassifyRequest) -> Response | FrontendResults:
    """The answer (a front-end's request answered: its results), or an ApiError (answered by the caller as the
    contract says)."""
    outcome = _Outcome()
    log.debug("request %s accepted", request.request_id)
    try:
        routed = _routed(engine, request, outcome)
        if isinstance(routed, Response):
            return routed
        route, top_k, deadline = routed
        images, multipart = await _images(engine, request, route, outcome, deadline)
        items = _submit(engine, route, images, _computed_k(engine, top_k), deadline, outcome)
        results = await _results(engine, items, deadline)
        return _finish(engine, request, outcome, route, images, results, top_k, multipart)
    except Exception as exc:  # noqa: BLE001 - the answer to an error, or the ApiError to answer
        answer = _failed(request, outcome, exc)
        if isinstance(answer, ApiError):
            raise answer from None
        return answer
    finally:
        _settle(engine, request, outcome)


Answered = Callable[[Response | FrontendResults | ApiError], None]


def classify_decoded(engine: Engine, request: ClassifyRequest, reply: Answered) -> None:
    """classify() for a request a front-end decoded, whose crops need no awaiting: its answer (or the ApiError
    to answer) goes to `reply`, once, when its images' results are in. No task: on the one event loop every
    request passes through, a task per request cost more than the rest of this path."""
    outcome = _Outcome()
    log.debug("request %s accepted", request.request_id)

    def settled(response: Response | FrontendResults | ApiError) -> None:
        _settle(engine, request, outcome)
        reply(response)

    try:
        routed = _routed(engine, request, outcome)
        if not isinstance(routed, Response):
            route, top_k, deadline = routed
            images, multipart = _decoded_images(engine, request, route, outcome)
            items = _submit(engine, route, images, _computed_k(engine, top_k), deadline, outcome)
    except Exception as exc:  # noqa: BLE001 - answered
        settled(_failed(request, outcome, exc))
        return
    if isinstance(routed, Response):  # a front-end's admission request: answered now
        settled(routed)
        return

    def answer(results: list[ImageResult] | BaseException) -> None:
        try:
            if isinstance(results, BaseException):
                raise results
            response = _finish(engine, request, outcome, route, images, results, top_k, multipart)
        except Exception as exc:  # noqa: BLE001 - answered
            response = _failed(request, outcome, exc)
        settled(response)

    _when_answered(engine, items, deadline, answer)


def _computed_k(engine: Engine, top_k: int) -> int:
    """The top 5 at least, for labels posted later (the answer shows top_k)."""
    return max(top_k, LABEL_TOP_K) if engine.answers is not None else top_k


def _failed(request: ClassifyRequest, outcome: _Outcome, exc: Exception) -> Response | ApiError:
    """The answer to a request that failed with `exc`: the ApiError to answer, or a reroute (409)."""
    if isinstance(exc, ApiError):
        outcome.status = exc.status
        return exc
    if isinstance(exc, Reroute):
        outcome.counted = False  # the front-end sends the request again, and it is counted then
        return JSONResponse({"error": "reroute", "detail": f"the route's model is {exc}"}, status_code=409)
    log.error("request %s failed", request.request_id, exc_info=exc)
    return internal(f"{type(exc).__name__}: {exc}")


def _settle(engine: Engine, request: ClassifyRequest, outcome: _Outcome) -> None:
    """What every answered request leaves: its unused queue places given back, its metrics counted."""
    log.debug("request %s answered %d", request.request_id, outcome.status)
    if outcome.reservation is not None:  # not submitted (an error, a timeout): the places go back
        engine.service.scheduler.release(outcome.reservation)
    if outcome.in_flight is not None:
        outcome.in_flight.dec()
    if outcome.counted:
        if outcome.labels is None:  # refused before routing
            outcome.labels = _asked_labels(engine, request.query)
        _count(engine, outcome, time.monotonic() - request.started)


def _asked_labels(engine: Engine, query: Mapping[str, str]) -> tuple[str, str, str]:
    """The label values of a request refused before routing: what it asked for, as if named (its experiment's
    model, or the default). Client-chosen names become label values only when they exist (bounded series)."""
    model, experiment = query.get("model"), query.get("experiment")
    experiment_model = engine.registry.model_of(experiment) if experiment is not None else None
    if model is None:
        model_label = (experiment_model or "") if experiment is not None else engine.config.default_model_name
    else:
        model_label = model if model in engine.config.models else ""
    return model_label, "", experiment if experiment_model is not None else ""


def _routed(engine: Engine, request: ClassifyRequest,
            outcome: _Outcome) -> tuple[Assignment, int, float] | Response:
    """The request checked and routed: its route, top_k and deadline; or, for a front-end's admission request,
    the answer to it."""
    params, limits = request.query, engine.config.limits
    deadline = request.started + limits.request_timeout_s
    # First, as FastAPI's parameter validation would: a bad value is a 422 (counted like any answer).
    top_k = query_int(params.get("top_k"), "top_k", DEFAULT_TOP_K)
    if not engine.service.ready.is_set():
        raise not_ready("models are still loading and warming up")
    if not 1 <= top_k <= limits.max_top_k:
        raise invalid_parameter(f"top_k must be between 1 and {limits.max_top_k}, got {top_k}")
    admitted = engine.admitted.pop(request.headers.get(FRONTEND_RESERVATION, ""), None) \
        if request.receive is None else None
    if admitted is not None:  # a front-end's request, routed and given its places before it decoded
        route, outcome.reservation = admitted
    else:
        route = engine.registry.choose(
            model=params.get("model"), experiment=params.get("experiment"), variant=params.get("variant"),
            headers=request.headers, query=params, client_host=request.client_host)
    outcome.route = route
    outcome.labels = (route.model, route.variant, route.experiment or "")
    outcome.in_flight = engine.metrics.in_flight_of(route.model, route.variant)
    outcome.in_flight.inc()
    if request.receive is None and request.headers.get(FRONTEND_ADMIT) == "1":
        return _admit(engine, request, route, outcome, deadline)
    return route, top_k, deadline


def _finish(engine: Engine, request: ClassifyRequest, outcome: _Outcome, route: Assignment,
            images: list[torch.Tensor], results: list[ImageResult], top_k: int,
            multipart: bool) -> Response | FrontendResults:
    """The answer to a request whose images have their results; its figures recorded."""
    total_s = time.monotonic() - request.started
    _observe(engine, outcome, results)
    if engine.answers is not None:  # a reference to each image's top-5: a dict insert, no copy
        engine.answers.remember(request.request_id, route, [r.indices for r in results])
    if route.shadow_variant is not None and engine.shadows is not None:
        # Crops in a front-end's arena are its to reuse once this request is answered: copied.
        engine.shadows.start(route, [image.clone() for image in images] if request.receive is None
                             else list(images), list(results))
    outcome.status = 200
    as_list = multipart and len(results) > 1
    if request.receive is None:  # a front-end's request: the front-end renders the answer
        return FrontendResults(results_message(route, request.request_id, results, total_s, top_k, as_list))
    info = engine.service.models[route.model]
    answers = [
        image_answer(route, info.weights, info.labels, request.request_id, r, total_s, top_k) for r in results
    ]
    return json_response(request_answer(request.request_id, answers, as_list))


def _admit(engine: Engine, request: ClassifyRequest, route: Assignment, outcome: _Outcome,
           deadline: float) -> Response:
    """A front-end asks, before decoding, whether the queue takes the request's images: their places are
    reserved for it (202 naming the reservation, not counted: the request comes again, decoded), or it is
    refused here (counted, answered as the request's answer). Unclaimed places go back at the deadline."""
    outcome.n_images = int(request.headers[FRONTEND_IMAGES])
    if request.headers.get(FRONTEND_MODEL) != route.model:
        raise Reroute(route.model)
    outcome.reservation = _reserve(engine, route, outcome.n_images)
    token = request.request_id + f"-{id(outcome.reservation):x}"
    engine.admitted[token] = (route, outcome.reservation)
    asyncio.get_running_loop().call_later(deadline - time.monotonic() + 1.0, _expire, engine, token)
    outcome.reservation, outcome.counted = None, False
    return JSONResponse({"reservation": token}, status_code=202)


def _expire(engine: Engine, token: str) -> None:
    """Places reserved for a front-end's request that never came back (the front-end died)."""
    admitted = engine.admitted.pop(token, None)
    if admitted is not None:
        engine.service.scheduler.release(admitted[1])


async def _images(engine: Engine, request: ClassifyRequest, route: Assignment, outcome: _Outcome,
                  deadline: float) -> tuple[list[torch.Tensor], bool]:
    """The request's uint8 crops, and whether it was multipart (several images answer as a list)."""
    if request.receive is None:
        return _decoded_images(engine, request, route, outcome)
    limits, headers = engine.config.limits, request.headers
    body = await read_limited(request.receive, headers.get("content-length", ""), limits.max_body_bytes,
                              max(0.0, deadline - time.monotonic()))
    payloads, multipart = image_payloads(headers.get("content-type", ""), body, limits.max_images_per_request)
    outcome.n_images = len(payloads)
    return await decode_admitted(engine, route, outcome, [data for _, data in payloads], deadline), multipart


def _decoded_images(engine: Engine, request: ClassifyRequest, route: Assignment,
                    outcome: _Outcome) -> tuple[list[torch.Tensor], bool]:
    """The crops of a request a front-end decoded (in its arena, or in the body), and whether it was
    multipart; the front-end's decoding error, if it met one."""
    headers = request.headers
    outcome.n_images = int(headers[FRONTEND_IMAGES])
    decoding_error = headers.get(FRONTEND_DECODING_ERROR) == "1"
    if not decoding_error:
        raise_frontend_error(headers)  # errors before admission first: they do not depend on the model
    if headers.get(FRONTEND_MODEL) != route.model:
        raise Reroute(route.model)
    if decoding_error:  # refused as it would have been before decoding (503 when the queue is full)
        if outcome.reservation is None:
            outcome.reservation = _reserve(engine, route, outcome.n_images)
        raise_frontend_error(headers)
    if outcome.reservation is None:  # not admitted before: the queue's room is checked on submitting
        _check_size(engine, route, outcome.n_images)
    # where the front-end left the crops: read once, for their views here and for the device process
    outcome.shared_at = shared_crops_at(headers)
    input_size = engine.service.models[route.model].input_size
    crops = frontend_crops(headers, request.crops, input_size, engine.arenas, outcome.shared_at)
    return crops, headers[FRONTEND_MULTIPART] == "1"


async def decode_admitted(engine: Engine, route: Assignment, outcome: _Outcome, encoded: list[bytes],
                          deadline: float) -> list[torch.Tensor]:
    """Admission before work: the images' headers (pixel limits), then the queue's places (held in
    `outcome.reservation`); decoding comes last, within the pixels decoded at once and the deadline."""
    opened = open_images(engine, route.model, encoded)
    outcome.reservation = _reserve(engine, route, outcome.n_images)
    return await decode_opened(engine, route.model, opened, deadline)


def open_images(engine: Engine, model: str, encoded: list[bytes]) -> list[Image.Image]:
    """The images' headers read, within the pixel limits (O(header) work; a JPEG's draft set)."""
    limits = engine.config.limits
    return open_all(encoded, limits.max_pixels, limits.max_request_pixels,
                    engine.service.transforms[model].resize_edge)


async def decode_opened(engine: Engine, model: str, opened: list[Image.Image],
                        deadline: float) -> list[torch.Tensor]:
    """The model's crops of opened images, within the pixels decoded at once and the deadline, large images
    in their own lane."""
    try:
        return await decode_in_lanes(engine.service.preprocess_opened, [(model, image) for image in opened],
                                     engine.pixels, engine.pool, engine.large_pool,
                                     deadline - time.monotonic())
    except TimeoutError:
        raise _deadline_passed(engine) from None


def _reserve(engine: Engine, route: Assignment, n_images: int) -> Reservation:
    """The request's places in its variant's share of the queue, or 413 (more than the variant can ever
    hold: a 503 would be retried for ever) or 503 `overloaded` (the share is full now)."""
    _check_size(engine, route, n_images)
    try:
        return engine.service.scheduler.reserve(route.model, route.variant, n_images)
    except QueueFull as exc:
        raise overloaded(str(exc)) from None
    except SchedulerClosed as exc:
        raise overloaded(str(exc), retry_after_s=5) from None


def _check_size(engine: Engine, route: Assignment, n_images: int) -> None:
    """413 for more images than the variant can ever queue: a 503 would be retried for ever."""
    limit = engine.service.scheduler.capacity(route.model, route.variant)
    if n_images > limit:
        raise too_large(f"{n_images} images in one request; variant {route.variant!r} of model "
                        f"{route.model!r} queues at most {limit} (its batching.max_queue less the other "
                        "variants' shares)")


def _deadline_passed(engine: Engine) -> ApiError:
    return timeout(f"no answer within the request timeout of {engine.config.limits.request_timeout_s} s")


def _submit(engine: Engine, route: Assignment, images: list[torch.Tensor], top_k: int, deadline: float,
            outcome: _Outcome) -> list[WorkItem]:
    """The request's images queued (in the places reserved for them, if any), or 503 `overloaded`."""
    try:
        items = engine.service.submit(route.model, route.variant, list(images), top_k, deadline,
                                      outcome.reservation, outcome.shared_at)
    except QueueFull as exc:
        raise overloaded(str(exc)) from None
    except SchedulerClosed as exc:
        raise overloaded(str(exc), retry_after_s=5) from None
    outcome.reservation = None  # the places are the queued items' now
    return items


async def _results(engine: Engine, items: list[WorkItem], deadline: float) -> list[ImageResult]:
    """The queued images' results, or their error (504 at the deadline), as `_when_answered` gives them."""
    answered = asyncio.get_running_loop().create_future()
    # the request may have stopped waiting (cancelled): then no one takes the answer
    _when_answered(engine, items, deadline,
                   lambda outcome: None if answered.done() else answered.set_result(outcome))
    outcome = await answered
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def _when_answered(engine: Engine, items: list[WorkItem], deadline: float,
                   then: Callable[[list[ImageResult] | BaseException], None]) -> None:
    """`then(results)` once every queued image has its result, or `then(error)`: the first image's error in
    their order (504 at the deadline). One callback per image's future, none per request: the deadline fails
    the futures through one timer handle (cheaper than asyncio.timeout and a task)."""
    if not items:
        then([])
        return
    expiry = items[0].loop.call_later(deadline - time.monotonic(), _expire_items, items)
    waiting = len(items)

    def one_done(_: asyncio.Future) -> None:
        nonlocal waiting
        waiting -= 1
        if waiting:
            return
        expiry.cancel()
        errors = [internal("the image's inference was cancelled") if item.future.cancelled()
                  else item.future.exception() for item in items]  # every one retrieved
        error = next((e for e in errors if e is not None), None)
        if isinstance(error, TimeoutError):
            engine.service.scheduler.discard(items)
            error = _deadline_passed(engine)
        then([item.future.result() for item in items] if error is None else error)

    for item in items:
        item.future.add_done_callback(one_done)


def _expire_items(items: list[WorkItem]) -> None:
    for item in items:
        if not item.future.done():
            item.future.set_exception(TimeoutError())


def _observe(engine: Engine, outcome: _Outcome, results: list[ImageResult]) -> None:
    metrics = engine.metrics
    queue_wait = metrics.queue_wait_of(*outcome.labels)
    final_tokens_seen = metrics.final_tokens_of(*outcome.labels)
    gflops = metrics.gflops_of(*outcome.labels)
    for result in results:
        final = final_tokens(result)
        queue_wait.observe(result.queue_s)
        final_tokens_seen.observe(final)
        gflops.observe(result.gflops)
        outcome.final_tokens.append(final)
        outcome.gflops.append(result.gflops)


def _count(engine: Engine, outcome: _Outcome, elapsed: float) -> None:
    metrics, labels, status = engine.metrics, outcome.labels, str(outcome.status)
    if outcome.route is None:  # refused before routing (rare): no cached children for these label values
        metrics.request_duration.labels(*labels).observe(elapsed)
        metrics.requests.labels(*labels, status).inc()
        return
    ok = outcome.status == 200
    engine.registry.record_request(outcome.route, status=outcome.status, latency_s=elapsed,
                                   final_tokens=outcome.final_tokens if ok else [],
                                   gflops=outcome.gflops if ok else [])
    # Cached children: the label values are configured names, a bounded set.
    metrics.request_duration_of(*labels).observe(elapsed)
    if ok:
        metrics.successful_request_duration_of(*labels).observe(elapsed)
    metrics.requests_of(*labels, status).inc()
    if outcome.n_images:
        metrics.images_of(*labels, status).inc(outcome.n_images)
