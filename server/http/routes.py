"""The engine's routes. Each handler finds what it needs in `request.app.state.engine` (server/http/app.py
puts it there); `POST /v1/classify` is answered by `classify()` (server/http/classify.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import JSONResponse, PlainTextResponse, Response

from server.decode.crops import decode_plan
from server.experiments.config import NewExperiment, SplitChange
from server.http import schemas
from server.http.classify import classify, http_classify_request
from server.http.explain import explain
from server.http.openapi import (
    ADMIN_ERRORS,
    CLASSIFY_ERRORS,
    CLASSIFY_OPENAPI,
    EXPLAIN_ERRORS,
    EXPLAIN_HEADERS,
    EXPLAIN_OPENAPI,
    answer,
    error_responses,
)

if TYPE_CHECKING:
    from server.http.classify import Engine

router = APIRouter()
frontend_router = APIRouter(include_in_schema=False)  # what front-end processes ask the engine


def _engine(request: Request) -> Engine:
    return request.app.state.engine


@router.post("/v1/classify", summary="Classify one or more images", openapi_extra=CLASSIFY_OPENAPI,
             responses={**answer(schemas.ClassifyAnswer | schemas.ClassifyAnswers,
                                 "one image: its answer; several files: {request_id, results}"),
                        **CLASSIFY_ERRORS})
async def classify_route(request: Request) -> Response:
    return await classify(
        _engine(request), http_classify_request(request, request.app.state.behind_frontends)
    )


EXPLAIN_RUNNING = "explain_running"  # app.state: the semaphore that runs explanations one at a time


@router.post("/v1/explain", summary="Which patches merged, as a picture (PNG); token counts in headers",
             response_model=None, openapi_extra=EXPLAIN_OPENAPI, responses={
                 200: {"description": "the input crop, then the groups after each block, side by side",
                       "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                       "headers": EXPLAIN_HEADERS},
                 **EXPLAIN_ERRORS})
async def explain_route(request: Request) -> Response:
    state = request.app.state
    if not hasattr(state, EXPLAIN_RUNNING):
        setattr(state, EXPLAIN_RUNNING, asyncio.Semaphore(1))
    return await explain(_engine(request), request, getattr(state, EXPLAIN_RUNNING))


@frontend_router.get("/internal/plan")
async def frontend_plan(request: Request) -> dict[str, Any]:
    """What a front-end process needs to decode requests itself (server/frontend/app.py)."""
    engine = _engine(request)
    service, ready = engine.service, engine.service.ready.is_set()
    running = [e for e in engine.registry.summaries() if e["status"] == "running"]
    return {
        "ready": ready,
        "limits": engine.config.limits.model_dump(),
        "default_model": engine.config.default_model_name,
        "experiment_models": {e["name"]: e["model"] for e in running},
        "decoders": {name: decode_plan(service.transforms[name], info.input_size)
                     for name, info in service.models.items()} if ready else {},
    }


@router.get("/v1/models", summary="Served models and their variants", response_model=None,
            responses=answer(schemas.ModelsAnswer))
async def list_models(request: Request) -> dict[str, Any]:
    engine = _engine(request)
    return {
        "models": [info.describe(engine.config) for info in engine.service.models.values()],
        "default_model": engine.config.default_model_name,
        "ready": engine.service.ready.is_set(),
    }


@router.get("/v1/experiments", summary="A/B experiments, running and stopped", response_model=None,
            responses=answer(schemas.ExperimentsAnswer))
async def list_experiments(request: Request) -> dict[str, Any]:
    return {"experiments": _engine(request).registry.summaries()}


@router.get("/v1/experiments/{name}", summary="Per-variant report of one A/B experiment",
            response_model=None, responses={**answer(schemas.ExperimentReport),
                                            **error_responses((404, "unknown_experiment"),
                                                              (422, "invalid_parameter"))})
async def experiment_report(name: str, request: Request) -> dict[str, Any]:
    return _engine(request).registry.report(name)


def sync_weights(engine: Engine) -> None:
    """`mame_experiment_weight` shows the splits in force; a stopped experiment's series disappear."""
    engine.metrics.experiment_weight.clear()
    for name, split in engine.registry.current_weights().items():
        for variant, weight in split.items():
            engine.metrics.experiment_weight.labels(name, variant).set(weight)


def _admin_change(request: Request, name: str, change: Callable[[Engine], object]) -> dict[str, Any]:
    """Apply one runtime change (the registry logs it), update the weight gauge, answer the report."""
    engine = _engine(request)
    change(engine)
    sync_weights(engine)
    return engine.registry.report(name)


@router.post(
    "/v1/admin/experiments",
    status_code=201,
    summary="Start an experiment",
    response_model=None,
    responses={**answer(schemas.ExperimentReport, "the new experiment's report", 201),
               **error_responses(*ADMIN_ERRORS, (409, "experiment_exists: a running one has that name"))},
)
async def create_experiment(body: NewExperiment, request: Request) -> dict[str, Any]:
    return _admin_change(request, body.name,
                         lambda engine: engine.registry.create(body.name, body.config(), source="admin"))


@router.put("/v1/admin/experiments/{name}/split", summary="Change an experiment's split",
            response_model=None,
            responses={**answer(schemas.ExperimentReport), **error_responses(*ADMIN_ERRORS)})
async def change_split(name: str, body: SplitChange, request: Request) -> dict[str, Any]:
    return _admin_change(
        request, name, lambda engine: engine.registry.update_split(name, body.split, source="admin")
    )


@router.delete(
    "/v1/admin/experiments/{name}", summary="Stop an experiment", response_model=None,
    responses={**answer(schemas.ExperimentReport), **error_responses(*ADMIN_ERRORS)},
)
async def stop_experiment(name: str, request: Request) -> dict[str, Any]:
    return _admin_change(request, name, lambda engine: engine.registry.stop(name, source="admin"))


@router.get(
    "/v1/admin/changes", summary="Log of experiment changes", response_model=None,
    responses={**answer(schemas.ChangesAnswer), **error_responses(*ADMIN_ERRORS[:3])},
)
async def experiment_changes(request: Request) -> dict[str, Any]:
    return {"changes": [asdict(record) for record in _engine(request).registry.changes()]}


def _unresponsive(request: Request) -> JSONResponse | None:
    """503 `unresponsive` while the event loop is not live (server/http/heartbeat.py)."""
    why = request.app.state.heartbeat.stalled()
    return None if why is None else JSONResponse({"status": "unresponsive", "detail": why}, status_code=503)


@router.get("/healthz", summary="Liveness: the process answers and its event loop runs", response_model=None,
            responses={**answer(schemas.Health),
                       503: {"model": schemas.Readiness,
                             "description": "the event loop did not run for health.loop_stall_s"}})
async def healthz(request: Request) -> Response:
    return _unresponsive(request) or JSONResponse({"status": "ok"})


@router.get("/readyz", summary="Readiness: models loaded and warmed up, no device stalled",
            response_model=None, responses={**answer(schemas.Readiness, "ready"),
                       503: {"model": schemas.Readiness,
                             "description": "loading, stalled, failed or unresponsive (why in detail)"}})
async def readyz(request: Request) -> JSONResponse:
    service = _engine(request).service
    if (unresponsive := _unresponsive(request)) is not None:
        return unresponsive
    if service.stalled:
        return JSONResponse({"status": "stalled", "detail": "; ".join(service.stalled.values())},
                            status_code=503)
    if service.failed is not None:
        return JSONResponse({"status": "failed", "detail": str(service.failed)}, status_code=503)
    if not service.ready.is_set():
        return JSONResponse({"status": "loading"}, status_code=503)
    return JSONResponse({"status": "ready"})


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse,
            responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}}})
async def prometheus_metrics(request: Request) -> Response:
    return Response(generate_latest(_engine(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)
