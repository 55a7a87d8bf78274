"""The config of an A/B experiment (in the serving config, or sent to the admin API): its model, split,
sticky key and shadow, and the judge's keys (control, level, guardrails, ramp, on_fail: the schema of
`abtest.guardrails`, so the server and `mame-judge` read one config alike), validated by pydantic; and
experiment names."""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from abtest.guardrails import JudgedExperiment, JudgeKeys

WEIGHT_SUM_TOLERANCE = 1e-6
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # fullmatch: "$" would let a final "\n" in
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP token (RFC 9110)


def validate_split(split: Mapping[str, float]) -> dict[str, float]:
    """Check a split {variant: weight}; return it as a plain dict. Raises ValueError saying what is wrong."""
    if not split:
        raise ValueError("split is empty: name at least one variant with a weight")
    for variant, weight in split.items():
        if not isinstance(variant, str) or not variant:
            raise ValueError(f"split has an empty variant name: {variant!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"weight of variant {variant!r} must be a finite number, got {weight!r}")
        if weight < 0:
            raise ValueError(f"weight of variant {variant!r} is negative ({weight}); weights must be >= 0")
    for variant, weight in split.items():  # a share of the traffic (and 1e308s would overflow the sum)
        if weight > 1 + WEIGHT_SUM_TOLERANCE:
            raise ValueError(f"weight of variant {variant!r} is {weight:g}; a weight is a share of 1")
    total = math.fsum(split.values())
    if abs(total - 1.0) > WEIGHT_SUM_TOLERANCE:
        raise ValueError(
            f"split weights sum to {total:.9g}, not 1 (tolerance {WEIGHT_SUM_TOLERANCE:g}): "
            + ", ".join(f"{v}={w:g}" for v, w in split.items())
        )
    return {variant: float(weight) for variant, weight in split.items()}


def _split_field(value: Any) -> dict[str, float]:
    if not isinstance(value, Mapping):
        # a ValueError, not a TypeError: pydantic turns only ValueError into a validation error
        raise ValueError(f"split must be a mapping {{variant: weight}}, got {type(value).__name__}")  # noqa: TRY004
    return validate_split(value)


# A split {variant: weight}, checked by validate_split; the schema (OpenAPI) says the same: at least one
# variant, each a share of 1.
Split = Annotated[dict[str, float], BeforeValidator(_split_field), Field(json_schema_extra={
    "minProperties": 1, "additionalProperties": {"type": "number", "minimum": 0, "maximum": 1}})]


def parse_sticky(sticky: str) -> tuple[Literal["header", "query", "client"], str]:
    """`header:<Name>` | `query:<param>` | `client` -> (kind, name). Raises ValueError on anything else."""
    if sticky == "client":
        return "client", ""
    kind, sep, name = sticky.partition(":")
    if not sep or kind not in ("header", "query"):
        raise ValueError(f"sticky must be 'header:<Name>', 'query:<param>' or 'client', got {sticky!r}")
    if not name:
        raise ValueError(f"sticky {sticky!r} names no {kind}")
    if kind == "header" and not _HEADER_NAME_RE.fullmatch(name):
        raise ValueError(f"sticky {sticky!r}: {name!r} is not a valid HTTP header name")
    if kind == "header" and name.lower().startswith("x-mame-"):
        raise ValueError(f"sticky {sticky!r}: x-mame-* headers are reserved for the server's own processes")
    return kind, name  # type: ignore[return-value]


class ShadowConfig(BaseModel):
    """Run a fraction `rate` of an experiment's requests also on the reference `variant`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    variant: str = Field(min_length=1)
    rate: float = Field(ge=0.0, le=1.0)


class ExperimentConfig(JudgeKeys):
    """One experiment of the serving config's `experiments:` key (the name is the key). The judge's keys
    (control, level, guardrails, ramp, on_fail: docs/ab_testing.md) and their checks are abtest's."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str = Field(min_length=1)
    split: Split
    sticky: str | None = None
    shadow: ShadowConfig | None = None

    @model_validator(mode="after")
    def _check_judged(self) -> ExperimentConfig:
        if self.control is not None and self.control not in self.split:
            raise ValueError(f"control {self.control!r} is not in the split {sorted(self.split)}")
        if self.guardrails or self.ramp is not None:
            # the checks across keys (a shadow for an agreement guardrail, a ramp within 100 %, ...)
            try:
                JudgedExperiment.model_validate(self.model_dump())
            except ValidationError as exc:  # its message, not a nested error report
                raise ValueError("; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())) \
                    from None
        return self

    @property
    def control_variant(self) -> str | None:
        """The variant the others are compared with: `control`, else the shadow's reference."""
        return self.control or (self.shadow.variant if self.shadow else None)

    @field_validator("sticky")
    @classmethod
    def _check_sticky(cls, value: str | None) -> str | None:
        if value is not None:
            parse_sticky(value)
        return value

    def check_variants(self, known: Collection[str]) -> None:
        """Raise ValueError if the split or the shadow names a variant the model does not have."""
        unknown = [v for v in self.split if v not in known]
        if unknown:
            raise ValueError(
                f"split names unknown variant(s) {unknown} of model {self.model!r}; known: {sorted(known)}"
            )
        if self.shadow is not None and self.shadow.variant not in known:
            raise ValueError(
                f"shadow variant {self.shadow.variant!r} is not a variant of model {self.model!r}; "
                f"known: {sorted(known)}"
            )


class NewExperiment(ExperimentConfig):
    """Body of the admin call that creates an experiment: its name and its config."""

    # what check_experiment_name checks
    name: str = Field(json_schema_extra={"pattern": f"^{_NAME_RE.pattern}$"})

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return check_experiment_name(value)

    def config(self) -> ExperimentConfig:
        return ExperimentConfig(**self.model_dump(exclude={"name"}))


class SplitChange(BaseModel):
    """Body of the admin call that changes a running experiment's split."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    split: Split


def check_experiment_name(name: str) -> str:
    """Names appear in URLs and metric labels: 1-64 of [A-Za-z0-9._-], starting alphanumeric."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"experiment name {name!r} is invalid: use 1-64 characters of A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return name
