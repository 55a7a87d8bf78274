"""The engine's routes. Each handler finds what it needs in `request.app.state.engine` (server/http/app.py
puts it there); `POST /v1/classify` is answered by `classify()` (server/http/classify.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote

import httpx
from fastapi import APIRouter, Query, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, PlainTextResponse, Response

from server.decode.crops import decode_plan
from server.experiments.config import NewExperiment, SplitChange
from server.experiments.labels import LabelsBody, unknown_request
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

log = logging.getLogger("mame.server")
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


@router.post("/v1/explain", summary="Which patches merged, as a picture (PNG); token counts in headers",
             response_model=None, openapi_extra=EXPLAIN_OPENAPI, responses={
                 200: {"description": "the input crop, then the groups after each block, side by side",
                       "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                       "headers": EXPLAIN_HEADERS},
                 **EXPLAIN_ERRORS})
async def explain_route(request: Request) -> Response:
    return await explain(
        _engine(request), http_classify_request(request, request.app.state.behind_frontends)
    )


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
        # what it renders its answers with (server/wire/results.py)
        "answers": {name: [info.weights, info.labels]
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
async def experiment_report(
    name: str, request: Request,
    confidence: float = Query(0.95, gt=0, lt=1, description="of the intervals (e.g. 0.95, 0.99)"),
) -> dict[str, Any]:
    engine = _engine(request)
    report = engine.registry.report(name, confidence)
    report["fleet"] = await fleet_view(engine.judge_url, name) if engine.judge_url else None
    return report


FLEET_TIMEOUT_S = 1.0


async def fleet_view(judge_url: str, name: str) -> dict[str, Any] | None:
    """The judge's last evaluation of an experiment (fleet-wide intervals from Prometheus, guardrail states,
    ramp step, verdict); None when the judge does not answer in FLEET_TIMEOUT_S or has no evaluation."""
    url = f"{judge_url.rstrip('/')}/v1/experiments/{quote(name, safe='')}"
    try:
        async with httpx.AsyncClient(timeout=FLEET_TIMEOUT_S) as client:
            answer = await client.get(url)
        return answer.json() if answer.status_code == 200 else None
    except (httpx.HTTPError, ValueError) as exc:
        log.warning("judge at %s did not answer for experiment %s: %s", judge_url, name, exc)
        return None


LABELS_ERRORS = error_responses(
    (404, "unknown_request: no recent answer has that id"),
    (409, "already_labelled: the request has its labels already"),
    (422, "invalid_parameter: not one label per image, or a class index out of range"),
)


@router.post("/v1/labels", summary="The true labels of an answered request, by its request id",
             response_model=None,
             responses={**answer(schemas.LabelsAnswer), **LABELS_ERRORS})
async def post_labels(body: LabelsBody, request: Request) -> dict[str, Any]:
    engine = _engine(request)
    if engine.answers is None:
        raise unknown_request(body.request_id)  # labels.max_answers: 0 keeps no answers
    models = engine.service.models
    scored = engine.answers.score(body.request_id, body.labels, lambda model: len(models[model].labels))
    route, metrics = scored.route, engine.metrics
    labels = (route.model, route.variant, route.experiment or "")
    metrics.labelled_images.labels(*labels).inc(scored.images)
    metrics.label_top1_correct.labels(*labels).inc(scored.top1_correct)
    metrics.label_top5_correct.labels(*labels).inc(scored.top5_correct)
    engine.registry.record_labels(route, scored.images, scored.top1_correct, scored.top5_correct)
    return {"request_id": body.request_id, "model": route.model, "variant": route.variant,
            "experiment": route.experiment, "images": scored.images, "top1_correct": scored.top1_correct,
            "top5_correct": scored.top5_correct}


def sync_weights(engine: Engine) -> None:
    """`mame_experiment_weight` and `mame_experiment_split_version` show the splits in force; a stopped
    experiment's series disappear."""
    metrics = engine.metrics
    metrics.experiment_weight.clear()
    metrics.experiment_split_version.clear()
    for name, split in engine.registry.current_weights().items():
        for variant, weight in split.items():
            metrics.experiment_weight.labels(name, variant).set(weight)
    for name, version in engine.registry.current_versions().items():
        metrics.experiment_split_version.labels(name).set(version)


def _admin_change(request: Request, name: str, change: Callable[[Engine], object]) -> dict[str, Any]:
    """Apply one runtime change (the registry logs it), update the weight gauge, answer the report."""
    engine = _engine(request)
    change(engine)
    sync_weights(engine)
    return engine.registry.report(name)


async def _store_change(engine: Engine, name: str, split: dict[str, float] | None,
                        action: Literal["set", "stop"]) -> dict[str, Any]:
    """With a split store, an admin change goes there (every replica applies it, a restart keeps it); this
    replica applies the store's new state at once. Checked here first, so a bad split never reaches it."""
    assert engine.splits is not None
    if split is not None:
        engine.registry.check_split(name, split)
    await run_in_threadpool(engine.splits.change, name, split, action=action, source="admin")
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


STORE_ERROR = (503, "split_store_unavailable: the fleet's split store cannot be written")


@router.put("/v1/admin/experiments/{name}/split", summary="Change an experiment's split",
            response_model=None,
            responses={**answer(schemas.ExperimentReport), **error_responses(*ADMIN_ERRORS, STORE_ERROR)})
async def change_split(name: str, body: SplitChange, request: Request) -> dict[str, Any]:
    engine = _engine(request)
    if engine.splits is not None:
        return await _store_change(engine, name, dict(body.split), "set")
    return _admin_change(
        request, name, lambda engine: engine.registry.update_split(name, body.split, source="admin")
    )


@router.delete(
    "/v1/admin/experiments/{name}", summary="Stop an experiment", response_model=None,
    responses={**answer(schemas.ExperimentReport), **error_responses(*ADMIN_ERRORS, STORE_ERROR)},
)
async def stop_experiment(name: str, request: Request) -> dict[str, Any]:
    if _engine(request).splits is not None:
        return await _store_change(_engine(request), name, None, "stop")
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
