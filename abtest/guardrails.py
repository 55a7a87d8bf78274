"""The guardrail and ramp schema of an experiment in the serving config, as the judge reads it.

    experiments:
      tau-ab:
        model: vit-b16
        split: {baseline: 0.99, mame-0.8: 0.01}
        sticky: header:X-User-Id
        shadow: {variant: baseline, rate: 0.05}
        control: baseline              # optional; default: the shadow reference variant
        level: 0.05                    # optional: false-alarm probability of each guardrail's test
        guardrails:
          - {metric: shadow_agreement, min: 0.98}
          - {metric: p95_latency_ratio, max: 1.1}
          - {metric: error_rate_diff, max: 0.005}
        ramp: {steps: [0.01, 0.05, 0.25, 0.5], min_samples: 2000}
        on_fail: rollback              # or alert

Metrics: `shadow_agreement`, `top1_accuracy`, `top5_accuracy` (rates, min or max), `error_rate` (a rate,
usually max), `error_rate_diff` (variant minus control, max), `p<q>_latency_ratio` (a latency quantile over
the control's, max; e.g. p50, p95, p99). The other keys of an experiment belong to the server, which
validates them; this model ignores them.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from abtest.stats import parse_quantile_name

RATE_METRICS = ("shadow_agreement", "top1_accuracy", "top5_accuracy", "error_rate")
DIFF_METRICS = ("error_rate_diff",)
LATENCY_RATIO_RE = re.compile(r"(p\d+(?:\.\d+)?)_latency_ratio")
GuardrailKind = Literal["rate", "rate_difference", "quantile_ratio"]
# Keys this schema adds to an experiment of the serving config (the server must accept them).
JUDGE_KEYS = ("control", "level", "guardrails", "ramp", "on_fail")


class GuardrailConfig(BaseModel):
    """One guardrail: a metric with a lower (`min`) or upper (`max`) limit."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    metric: str
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _check(self) -> GuardrailConfig:
        if (self.min is None) == (self.max is None):
            raise ValueError(f"guardrail {self.metric}: give exactly one of min or max")
        limit = self.limit
        if self.metric in RATE_METRICS:
            if not 0 < limit < 1:
                raise ValueError(f"guardrail {self.metric}: a rate limit must be in (0, 1), got {limit}")
        elif self.metric in DIFF_METRICS:
            if self.max is None or not -1 < limit < 1:
                raise ValueError(f"guardrail {self.metric}: give max in (-1, 1) (e.g. 0.005), got {self}")
        elif LATENCY_RATIO_RE.fullmatch(self.metric):
            parse_quantile_name(self.metric.removesuffix("_latency_ratio"))
            if self.max is None or limit <= 0:
                raise ValueError(f"guardrail {self.metric}: give max > 0 (e.g. 1.1), got {self}")
        else:
            raise ValueError(
                f"unknown guardrail metric {self.metric!r}; known: {', '.join(RATE_METRICS + DIFF_METRICS)}, "
                "p<q>_latency_ratio (e.g. p95_latency_ratio)"
            )
        return self

    @property
    def limit(self) -> float:
        return self.min if self.min is not None else self.max  # type: ignore[return-value]

    @property
    def direction(self) -> Literal["min", "max"]:
        return "min" if self.min is not None else "max"

    @property
    def kind(self) -> GuardrailKind:
        if self.metric in RATE_METRICS:
            return "rate"
        return "rate_difference" if self.metric in DIFF_METRICS else "quantile_ratio"

    @property
    def quantile(self) -> float:
        return parse_quantile_name(self.metric.removesuffix("_latency_ratio"))

    def describe(self) -> str:
        return f"{self.metric} {'>=' if self.direction == 'min' else '<='} {self.limit:g}"


class RampConfig(BaseModel):
    """Traffic share of each treatment variant per step; a step advances after its guardrails pass with at
    least `min_samples` observations (per guardrail) gathered during that step."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    steps: list[float] = Field(min_length=1)
    min_samples: int = Field(default=1000, ge=1)

    @field_validator("steps")
    @classmethod
    def _increasing(cls, steps: list[float]) -> list[float]:
        if any(not 0 < s <= 1 for s in steps) or any(b <= a for a, b in itertools.pairwise(steps)):
            raise ValueError(f"ramp steps must increase strictly within (0, 1], got {steps}")
        return steps


class ShadowRef(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    variant: str


class JudgeKeys(BaseModel):
    """The keys of a serving-config experiment that only the judge acts on (JUDGE_KEYS); the server's
    ExperimentConfig declares them through this class too, so both read one schema."""

    model_config = ConfigDict(frozen=True)
    control: str | None = None
    level: float = Field(default=0.05, gt=0, lt=1)
    guardrails: list[GuardrailConfig] = Field(default_factory=list)
    ramp: RampConfig | None = None
    on_fail: Literal["rollback", "alert"] = "rollback"


class JudgedExperiment(JudgeKeys):
    """The parts of a serving-config experiment the judge uses."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    model: str
    split: dict[str, float]
    shadow: ShadowRef | None = None

    @model_validator(mode="after")
    def _check(self) -> JudgedExperiment:
        names = [g.metric for g in self.guardrails]
        if len(set(names)) != len(names):
            raise ValueError(f"a guardrail metric appears twice: {names}")
        if self.guardrails or self.ramp:
            if self.control_variant is None:
                raise ValueError("guardrails and ramps compare against a control: set control (or shadow)")
            if self.control_variant not in self.split:
                raise ValueError(f"control {self.control_variant!r} is not in the split {sorted(self.split)}")
        if self.ramp is not None:
            if not self.guardrails:
                raise ValueError("a ramp advances when guardrails pass: name at least one guardrail")
            treatments = len(self.treatments)
            if treatments * self.ramp.steps[-1] > 1 + 1e-9:
                raise ValueError(
                    f"{treatments} treatment variants at ramp step {self.ramp.steps[-1]} exceed 100 %"
                )
        if any(g.metric == "shadow_agreement" for g in self.guardrails) and self.shadow is None:
            raise ValueError("a shadow_agreement guardrail needs shadow: {variant: <reference>, rate: ...}")
        return self

    @property
    def control_variant(self) -> str | None:
        return self.control or (self.shadow.variant if self.shadow else None)

    @property
    def treatments(self) -> list[str]:
        return [v for v in self.split if v != self.control_variant]

    def ramp_split(self, step: int) -> dict[str, float]:
        """The split at ramp step `step`: each treatment gets the step's share, the control the rest."""
        assert self.ramp is not None
        share = self.ramp.steps[step]
        split = {v: share for v in self.treatments}
        split[self.control_variant] = max(0.0, 1 - share * len(self.treatments))  # type: ignore[index]
        return split


def judged_experiments(
    config: Mapping[str, Any], source: str = "<serving config>"
) -> dict[str, JudgedExperiment]:
    """The experiments of a serving config (a parsed mapping) that have guardrails or a ramp."""
    experiments = config.get("experiments") or {}
    if not isinstance(experiments, Mapping):
        raise ValueError(f"{source}: experiments must be a mapping")  # noqa: TRY004
    out = {}
    for name, entry in experiments.items():
        try:
            exp = JudgedExperiment.model_validate(entry)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ValueError(
                f"{source}: experiments.{name}{'.' + where if where else ''}: {first['msg']}"
            ) from None
        if exp.guardrails or exp.ramp:
            out[str(name)] = exp
    return out


def load_judged_experiments(path: str | Path) -> dict[str, JudgedExperiment]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise ValueError(f"cannot read serving config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: the serving config must be a YAML mapping")  # noqa: TRY004
    return judged_experiments(data, str(path))
