"""The 200 answers of the `/v1` routes as pydantic models, for the OpenAPI description only: the routes
build their JSON themselves and nothing validates an answer against these on the request path (the
engine's CPU per request is a budget). `tests/test_openapi_contract.py` runs schemathesis against a real
server, so these models and the answers cannot drift apart unnoticed."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

Assignment = Literal["default", "assigned", "override"]


class Prediction(BaseModel):
    label: str
    index: int = Field(ge=0)
    score: float = Field(ge=0, le=1, description="softmax probability, 6 decimals")


class Tokens(BaseModel):
    input: int = Field(ge=1, description="tokens entering the first block (patches + class/register tokens)")
    per_block: list[int] = Field(description="real tokens after each block")
    final: int = Field(ge=1)
    reduction: float = Field(description="1 - final / input")


class Timings(BaseModel):
    queue: float = Field(ge=0)
    inference: float = Field(ge=0)
    total: float = Field(ge=0)


class ClassifyAnswer(BaseModel):
    """One image's answer (a request with one image; each entry of `results`)."""

    request_id: str
    model: str
    variant: str
    experiment: str | None
    assignment: Assignment
    weights: str = Field(description="hub | file:<path> | random-init")
    predictions: list[Prediction] = Field(min_length=1, description="top_k, best first")
    tokens: Tokens
    gflops: float = Field(ge=0)
    batch_size: int = Field(ge=1, description="images in the batch this image ran in")
    device: str
    timings_ms: Timings


class ClassifyAnswers(BaseModel):
    """A multipart request with several files: one answer per file, in order."""

    request_id: str
    results: list[ClassifyAnswer] = Field(min_length=2)


class VariantSettings(BaseModel):
    method: Literal["none", "mame", "tome"]
    tau: float | list[float]
    blocks: int | None
    r: int
    stride: int
    prop_attn: bool


class Batching(BaseModel):
    max_batch_size: int
    max_wait_ms: float
    max_queue: int


class ModelDescription(BaseModel):
    name: str
    arch: str
    weights: str
    device: str
    dtype: str
    input_size: list[int] = Field(min_length=3, max_length=3)
    default_variant: str
    variants: dict[str, VariantSettings]
    batching: Batching


class ModelsAnswer(BaseModel):
    models: list[ModelDescription] = Field(description="empty while the models load")
    default_model: str
    ready: bool


class Shadow(BaseModel):
    variant: str
    rate: float = Field(ge=0, le=1)


class ExperimentSummary(BaseModel):
    name: str
    model: str
    status: Literal["running", "stopped"]
    split: dict[str, float]
    sticky: str
    shadow: Shadow | None


class ExperimentsAnswer(BaseModel):
    experiments: list[ExperimentSummary]


class Latency(BaseModel):
    p50: float | None
    p95: float | None
    samples: int
    window: int


class ShadowFigures(BaseModel):
    comparisons: int
    agreements: int
    agreement: float | None
    mean_top1_prob_abs_diff: float | None


class VariantReport(BaseModel):
    weight: float
    requests: int
    errors: int = Field(description="answers with status >= 500")
    overrides: int
    status_counts: dict[str, int]
    latency_ms: Latency
    images: int
    images_per_s: float
    mean_final_tokens: float | None
    mean_gflops: float | None
    shadow: ShadowFigures
    labels: LabelFigures
    intervals: dict[str, Any] = Field(
        description="at the report's confidence, from this replica's whole-life counts: error_rate, "
        "shadow_agreement, top1_accuracy, top5_accuracy ({estimate, low, high}; Wilson), "
        "p50/p95/p99_latency_s (order statistics of the latency buckets); against the control: "
        "error_rate_diff (Newcombe), p50/p95/p99_latency_ratio, final_tokens_saved, gflops_saved. An "
        "unbounded end is null")


class LabelFigures(BaseModel):
    images: int = Field(description="labelled images (POST /v1/labels)")
    top1_correct: int
    top5_correct: int
    top1_accuracy: float | None
    top5_accuracy: float | None


class LabelsAnswer(BaseModel):
    request_id: str
    model: str
    variant: str
    experiment: str | None
    images: int = Field(ge=1)
    top1_correct: int = Field(ge=0)
    top5_correct: int = Field(ge=0)


class ExperimentReport(ExperimentSummary):
    running_s: float
    confidence: float
    fleet: dict[str, Any] | None = Field(
        description="the judge's last evaluation of the fleet (with --judge-url; null without one, or when "
        "it does not answer)")
    version: int = Field(description="the split's version: one higher with every change (the split store's)")
    control: str | None = Field(description="the variant the others are compared with")
    ranges: list[tuple[float, float, str]] = Field(description="[start, end, variant] in [0, 1)")
    variants: dict[str, VariantReport]


class Change(BaseModel):
    time: float = Field(description="seconds since the epoch")
    action: Literal["create", "update", "stop", "rollback", "ramp"]
    experiment: str
    source: str = Field(description="config, admin, or store/<who> for a change read from the split store "
                        "(store/judge, store/admin, store/operator)")
    split_before: dict[str, float] | None
    split_after: dict[str, float] | None
    reason: str
    version: int = Field(description="the experiment's split version after the change")


class ChangesAnswer(BaseModel):
    changes: list[Change]


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "loading", "stalled", "failed", "unresponsive"]
    detail: str | None = Field(None, description="why, when stalled or failed")
