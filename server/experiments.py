"""A/B experiments over the variants of one model: config, sticky assignment, runtime control, reports.

Pure pieces, no HTTP: the app calls them (see docs/ab_testing.md for where).

Assignment works on bucket ranges. A key is hashed with the experiment name to an integer point in
[0, SCALE); the split is a list of disjoint ranges that cover [0, SCALE), each owned by one variant.
Changing the weights does not re-hash: `rebalance` moves range from shrinking variants to growing ones
only, so the share of keys that changes variant is the least possible (the total variation distance
between the old and new splits). Integer bounds keep that arithmetic exact.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import random
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from server.errors import ApiError

log = logging.getLogger(__name__)

SCALE = 2**64  # size of the hash space: bucket points are integers in [0, SCALE)
WEIGHT_SUM_TOLERANCE = 1e-6
ADMIN_TOKEN_ENV = "MAME_ADMIN_TOKEN"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # fullmatch: "$" would let a final "\n" in
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP token (RFC 9110)

AssignmentKind = Literal["assigned", "override", "default"]


# --------------------------------------------------------------------------------------------- config


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


class ExperimentConfig(BaseModel):
    """One experiment of the serving config's `experiments:` key (the name is the key)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str = Field(min_length=1)
    split: Split
    sticky: str | None = None
    shadow: ShadowConfig | None = None

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

    name: str = Field(json_schema_extra={"pattern": f"^{_NAME_RE.pattern}$"})  # what check_experiment_name checks

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


# ----------------------------------------------------------------------------------------- assignment


@dataclass(frozen=True)
class BucketRange:
    """Points start <= p < end of the hash space belong to `variant`."""

    start: int
    end: int
    variant: str

    @property
    def size(self) -> int:
        return self.end - self.start


def bucket_point(experiment: str, key: str) -> int:
    """Stable point in [0, SCALE) for a key: blake2b of experiment and key (the same on every host/run)."""
    digest = hashlib.blake2b(f"{experiment}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def random_point(rng: random.Random) -> int:
    """A uniformly random point, for requests without a key."""
    return rng.getrandbits(64)


def integer_shares(weights: Mapping[str, float]) -> dict[str, int]:
    """Weights (validated, summing to ~1) -> sizes in hash units that sum to exactly SCALE."""
    checked = validate_split(weights)
    total = math.fsum(checked.values())
    shares = {v: int(w / total * SCALE) for v, w in checked.items()}
    # Flooring loses a few units; give them to the largest variant (a relative error of ~1e-16).
    largest = max(shares, key=lambda v: shares[v])
    shares[largest] += SCALE - sum(shares.values())
    return shares


def _merged(ranges: Iterable[BucketRange]) -> tuple[BucketRange, ...]:
    """Sort by start and join touching ranges of the same variant."""
    out: list[BucketRange] = []
    for r in sorted(ranges, key=lambda r: r.start):
        if r.size <= 0:
            continue
        if out and out[-1].variant == r.variant and out[-1].end == r.start:
            out[-1] = BucketRange(out[-1].start, r.end, r.variant)
        else:
            out.append(r)
    return tuple(out)


def initial_ranges(weights: Mapping[str, float]) -> tuple[BucketRange, ...]:
    """A fresh split: one contiguous range per variant, in the split's order."""
    ranges, start = [], 0
    for variant, size in integer_shares(weights).items():
        ranges.append(BucketRange(start, start + size, variant))
        start += size
    return _merged(ranges)


def rebalance(old: Sequence[BucketRange], new_weights: Mapping[str, float]) -> tuple[BucketRange, ...]:
    """New ranges for new weights that move the fewest keys.

    Every variant keeps its old ranges, from the lowest point up, as far as its new share allows; what a
    shrinking (or removed) variant frees is handed, lowest point first, to the growing ones in the order
    of `new_weights`. So a growing variant keeps every old key, and keys only move from shrinking to
    growing variants. A variant may end up owning several intervals.
    """
    check_ranges(old)
    target = integer_shares(new_weights)
    allowance = dict(target)
    kept: list[BucketRange] = []
    freed: list[tuple[int, int]] = []
    for r in sorted(old, key=lambda r: r.start):
        keep = min(r.size, allowance.get(r.variant, 0))
        if keep:
            kept.append(BucketRange(r.start, r.start + keep, r.variant))
            allowance[r.variant] -= keep
        if keep < r.size:
            freed.append((r.start + keep, r.end))
    # allowance now holds what each growing variant still needs; exactly the freed total (integers).
    for variant, need in allowance.items():
        while need:
            start, end = freed.pop(0)
            take = min(need, end - start)
            kept.append(BucketRange(start, start + take, variant))
            need -= take
            if start + take < end:
                freed.insert(0, (start + take, end))
    assert not freed, "freed range left over: shares do not sum to SCALE"
    return _merged(kept)


def check_ranges(ranges: Sequence[BucketRange]) -> None:
    """Raise ValueError unless the ranges are disjoint, non-empty and cover [0, SCALE) exactly."""
    position = 0
    for r in sorted(ranges, key=lambda r: r.start):
        if r.start != position or r.end <= r.start:
            raise ValueError(f"bucket ranges do not tile [0, SCALE): gap or overlap at {r}")
        position = r.end
    if position != SCALE:
        raise ValueError("bucket ranges do not reach the end of the hash space")


def variant_at(ranges: Sequence[BucketRange], point: int) -> str:
    """The variant owning `point`; `ranges` sorted and tiling [0, SCALE) (a few ranges: a scan is fine)."""
    for r in ranges:
        if point < r.end:
            return r.variant
    raise ValueError(f"point {point} is outside the hash space")


def range_shares(ranges: Iterable[BucketRange]) -> dict[str, float]:
    """Fraction of the hash space each variant owns."""
    shares: dict[str, int] = {}
    for r in ranges:
        shares[r.variant] = shares.get(r.variant, 0) + r.size
    return {v: s / SCALE for v, s in shares.items()}


def key_for_request(
    sticky: str | None,
    headers: Mapping[str, str],
    query: Mapping[str, str],
    client_host: str | None,
) -> str | None:
    """The stickiness key of a request, or None (then the variant is drawn at random).

    Header names are matched case-insensitively; empty values count as absent.
    """
    if sticky is None:
        return None
    kind, name = parse_sticky(sticky)
    if kind == "client":
        value = client_host
    elif kind == "query":
        value = query.get(name)
    else:
        wanted = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == wanted), None)
    if value is None or not value.strip():
        return None
    return value.strip()


# --------------------------------------------------------------------------------------------- shadow


def should_shadow(rate: float, rng: random.Random) -> bool:
    """Bernoulli(rate): run this request on the reference variant too?"""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"shadow rate must be in [0, 1], got {rate}")
    return rng.random() < rate


@dataclass(frozen=True)
class Top1:
    """A variant's top prediction for one image: class index and its softmax probability."""

    index: int
    prob: float


@dataclass(frozen=True)
class ShadowComparison:
    agree: bool
    prob_abs_diff: float  # |p_variant(its top-1) - p_reference(its top-1)|


def compare_top1(primary: Top1, reference: Top1) -> ShadowComparison:
    """Agreement of the served variant with the reference on one image (no labels needed)."""
    for name, top in (("primary", primary), ("reference", reference)):
        if not 0.0 <= top.prob <= 1.0 or top.index < 0:
            raise ValueError(f"{name} top-1 must have index >= 0 and prob in [0, 1], got {top}")
    return ShadowComparison(primary.index == reference.index, abs(primary.prob - reference.prob))


# ---------------------------------------------------------------------------------------------- stats


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (an observed value) of ascending values; None when there are none."""
    if not 0.0 < q <= 1.0:
        raise ValueError(f"percentile q must be in (0, 1], got {q}")
    if not sorted_values:
        return None
    rank = math.ceil(q * len(sorted_values))
    return sorted_values[max(rank, 1) - 1]


@dataclass
class VariantStats:
    """Running figures of one variant in one experiment.

    Latency percentiles come from a sliding window of the last `latency_window` successful requests,
    not an all-time reservoir: an A/B report should show how a variant behaves now (after a split or
    load change), and Prometheus histograms already give any longer range. Images/s counts images in
    one-second bins over the last `rate_window_s` seconds, so memory stays bounded at any rate.
    """

    latency_window: int = 2048
    rate_window_s: float = 60.0
    requests: int = 0
    overrides: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    images: int = 0
    final_tokens_sum: float = 0.0
    gflops_sum: float = 0.0
    shadow_comparisons: int = 0
    shadow_agreements: int = 0
    shadow_prob_abs_diff_sum: float = 0.0
    latencies_s: deque[float] = field(init=False)
    image_bins: deque[list[float]] = field(init=False)  # [second, images] pairs, oldest first

    def __post_init__(self) -> None:
        self.latencies_s = deque(maxlen=self.latency_window)
        self.image_bins = deque()

    def record(
        self,
        *,
        status: int,
        latency_s: float,
        now: float,
        override: bool = False,
        final_tokens: Sequence[float] = (),
        gflops: Sequence[float] = (),
    ) -> None:
        if latency_s < 0 or not math.isfinite(latency_s):
            raise ValueError(f"latency must be a finite number >= 0, got {latency_s}")
        if len(final_tokens) != len(gflops):
            raise ValueError(f"{len(final_tokens)} token counts but {len(gflops)} GFLOPs figures")
        self.requests += 1
        self.overrides += override
        self.statuses[status] += 1
        if not 200 <= status < 300:
            return
        self.latencies_s.append(latency_s)
        n = len(final_tokens)
        self.final_tokens_sum += math.fsum(final_tokens)
        self.gflops_sum += math.fsum(gflops)
        self.images += n
        second = math.floor(now)
        if self.image_bins and self.image_bins[-1][0] == second:
            self.image_bins[-1][1] += n
        else:
            self.image_bins.append([second, n])
        self._expire(now)

    def record_shadow(self, comparison: ShadowComparison) -> None:
        self.shadow_comparisons += 1
        self.shadow_agreements += comparison.agree
        self.shadow_prob_abs_diff_sum += comparison.prob_abs_diff

    def _expire(self, now: float) -> None:
        while self.image_bins and self.image_bins[0][0] <= now - self.rate_window_s - 1:
            self.image_bins.popleft()

    def images_per_s(self, now: float, started: float) -> float:
        """Images per second over the window (or since `started`, when that is shorter)."""
        self._expire(now)
        window_start = now - self.rate_window_s
        count = sum(n for second, n in self.image_bins if second + 1 > window_start)
        span = min(self.rate_window_s, now - started)
        return count / span if span > 0 else 0.0

    def report(self, now: float, started: float) -> dict[str, Any]:
        ordered = sorted(self.latencies_s)
        p50, p95 = percentile(ordered, 0.50), percentile(ordered, 0.95)
        errors = sum(n for status, n in self.statuses.items() if status >= 500)
        comparisons = self.shadow_comparisons
        return {
            "requests": self.requests,
            "errors": errors,
            "overrides": self.overrides,
            "status_counts": {str(s): n for s, n in sorted(self.statuses.items())},
            "latency_ms": {
                "p50": None if p50 is None else p50 * 1e3,
                "p95": None if p95 is None else p95 * 1e3,
                "samples": len(ordered),
                "window": self.latency_window,
            },
            "images": self.images,
            "images_per_s": self.images_per_s(now, started),
            "mean_final_tokens": self.final_tokens_sum / self.images if self.images else None,
            "mean_gflops": self.gflops_sum / self.images if self.images else None,
            "shadow": {
                "comparisons": comparisons,
                "agreements": self.shadow_agreements,
                "agreement": self.shadow_agreements / comparisons if comparisons else None,
                "mean_top1_prob_abs_diff": self.shadow_prob_abs_diff_sum / comparisons
                if comparisons
                else None,
            },
        }


# ------------------------------------------------------------------------------------------- registry


class ExperimentError(Exception):
    """A refused experiment operation; `code` and `status` are the HTTP error of docs/CONTRACT.md."""

    code = "invalid_parameter"
    status = 422


class UnknownExperiment(ExperimentError):
    code, status = "unknown_experiment", 404


class UnknownModel(ExperimentError):
    code, status = "unknown_model", 404


class UnknownVariant(ExperimentError):
    code, status = "unknown_variant", 404


class ExperimentExists(ExperimentError):
    code, status = "experiment_exists", 409


@dataclass(frozen=True)
class ModelVariants:
    """What the registry needs to know of a served model."""

    variants: frozenset[str]
    default_variant: str


@dataclass(frozen=True)
class Assignment:
    """Where one request goes, and why."""

    model: str
    variant: str
    experiment: str | None
    assignment: AssignmentKind
    shadow_variant: str | None = None  # run on this reference variant too (off the latency path)


@dataclass(frozen=True)
class ChangeRecord:
    time: float  # wall clock, seconds since the epoch
    action: Literal["create", "update", "stop"]
    experiment: str
    source: str  # "config", "admin", ...
    split_before: dict[str, float] | None
    split_after: dict[str, float] | None


@dataclass
class _Experiment:
    name: str
    config: ExperimentConfig
    ranges: tuple[BucketRange, ...]
    started: float  # monotonic clock
    stopped: float | None = None
    stats: dict[str, VariantStats] = field(default_factory=dict)

    def stats_of(self, variant: str) -> VariantStats:
        if variant not in self.stats:
            self.stats[variant] = VariantStats()
        return self.stats[variant]


class ExperimentRegistry:
    """The live experiments of a server: thread-safe (one lock around small critical sections).

    Routing rule: an explicit variant wins (recorded as an override), else the request's experiment
    (named, or the model's default experiment: the earliest-created running one on that model)
    assigns a variant, else the model's default variant serves it.
    """

    def __init__(
        self,
        models: Mapping[str, ModelVariants],
        default_model: str,
        experiments: Mapping[str, ExperimentConfig] | None = None,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        history: int = 1000,
    ) -> None:
        if default_model not in models:
            raise ValueError(f"default model {default_model!r} is not among the models {sorted(models)}")
        self._models = dict(models)
        self._default_model = default_model
        self._rng = rng or random.Random()
        self._clock = clock
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._experiments: dict[str, _Experiment] = {}
        self._changes: deque[ChangeRecord] = deque(maxlen=history)
        for name, config in (experiments or {}).items():
            self.create(name, config, source="config")

    # ---- control

    def _validated(self, name: str, config: ExperimentConfig) -> ExperimentConfig:
        try:
            check_experiment_name(name)
        except ValueError as e:
            raise ExperimentError(str(e)) from None
        if config.model not in self._models:
            raise UnknownModel(
                f"experiment {name!r}: unknown model {config.model!r}; known: {sorted(self._models)}"
            )
        try:
            config.check_variants(self._models[config.model].variants)
        except ValueError as e:
            raise UnknownVariant(f"experiment {name!r}: {e}") from None
        return config

    def create(self, name: str, config: ExperimentConfig, *, source: str = "admin") -> ChangeRecord:
        """Start an experiment. A stopped experiment's name may be reused (its report is replaced)."""
        self._validated(name, config)
        with self._lock:
            current = self._experiments.get(name)
            if current is not None and current.stopped is None:
                raise ExperimentExists(f"experiment {name!r} is already running; change its split or stop it")
            self._experiments.pop(name, None)  # re-insert: dict order is creation order (default experiment)
            self._experiments[name] = _Experiment(name, config, initial_ranges(config.split), self._clock())
            return self._log("create", name, source, None, dict(config.split))

    def update_split(self, name: str, split: Mapping[str, float], *, source: str = "admin") -> ChangeRecord:
        """Change the weights of a running experiment, moving the fewest keys (see `rebalance`)."""
        with self._lock:
            exp = self._running(name)
            try:
                config = ExperimentConfig(**{**exp.config.model_dump(), "split": dict(split)})
            except ValueError as e:  # pydantic's ValidationError is a ValueError
                raise ExperimentError(f"experiment {name!r}: {e}") from None
            self._validated(name, config)
            before = dict(exp.config.split)
            exp.ranges = rebalance(exp.ranges, config.split)
            exp.config = config
            return self._log("update", name, source, before, dict(config.split))

    def stop(self, name: str, *, source: str = "admin") -> ChangeRecord:
        """Stop assigning; the report stays readable until the name is reused."""
        with self._lock:
            exp = self._running(name)
            exp.stopped = self._clock()
            return self._log("stop", name, source, dict(exp.config.split), None)

    def _running(self, name: str) -> _Experiment:
        exp = self._experiments.get(name)
        if exp is None or exp.stopped is not None:
            state = "is stopped" if exp is not None else "does not exist"
            raise UnknownExperiment(f"experiment {name!r} {state}")
        return exp

    def _log(self, action: Any, name: str, source: str, before: Any, after: Any) -> ChangeRecord:
        record = ChangeRecord(self._wall_clock(), action, name, source, before, after)
        self._changes.append(record)
        log.info("experiment %s %s by %s: split %s -> %s", name, action, source, before, after)
        return record

    # ---- routing

    def choose(
        self,
        *,
        model: str | None = None,
        experiment: str | None = None,
        variant: str | None = None,
        headers: Mapping[str, str] | None = None,
        query: Mapping[str, str] | None = None,
        client_host: str | None = None,
    ) -> Assignment:
        """Model and variant of a request: its query parameters model, experiment, variant, and the parts
        the experiment's `sticky` setting reads the key from (headers, query, client address)."""
        with self._lock:
            if experiment is not None:
                exp = self._running(experiment)
                if model is not None and model != exp.config.model:
                    raise ExperimentError(
                        f"experiment {experiment!r} runs on model {exp.config.model!r}, not {model!r}"
                    )
                model = exp.config.model
            else:
                model = self._default_model if model is None else model
                if model not in self._models:
                    raise UnknownModel(f"unknown model {model!r}; known: {sorted(self._models)}")
                exp = self._default_experiment(model)
            known = self._models[model]
            if variant is not None:
                if variant not in known.variants:
                    raise UnknownVariant(
                        f"model {model!r} has no variant {variant!r}; known: {sorted(known.variants)}"
                    )
                return Assignment(model, variant, exp.name if exp else None, "override")
            if exp is None:
                return Assignment(model, known.default_variant, None, "default")
            key = key_for_request(exp.config.sticky, headers or {}, query or {}, client_host)
            point = bucket_point(exp.name, key) if key is not None else random_point(self._rng)
            chosen = variant_at(exp.ranges, point)
            shadow = exp.config.shadow
            shadow_variant = None
            if shadow is not None and shadow.variant != chosen and should_shadow(shadow.rate, self._rng):
                shadow_variant = shadow.variant
            return Assignment(model, chosen, exp.name, "assigned", shadow_variant)

    def _default_experiment(self, model: str) -> _Experiment | None:
        # dicts keep insertion order: the first running one on the model is the earliest created
        return next(
            (e for e in self._experiments.values() if e.stopped is None and e.config.model == model), None
        )

    # ---- observations

    def record_request(
        self,
        assignment: Assignment,
        *,
        status: int,
        latency_s: float,
        final_tokens: Sequence[float] = (),
        gflops: Sequence[float] = (),
    ) -> None:
        """Count one answered request (per image figures for successful ones); no-op outside experiments."""
        if assignment.experiment is None:
            return
        with self._lock:
            exp = self._experiments.get(assignment.experiment)
            if exp is None:  # an assignment not made by this registry: nothing to attribute it to
                return
            exp.stats_of(assignment.variant).record(
                status=status,
                latency_s=latency_s,
                now=self._clock(),
                override=assignment.assignment == "override",
                final_tokens=final_tokens,
                gflops=gflops,
            )

    def record_shadow(self, assignment: Assignment, comparison: ShadowComparison) -> None:
        if assignment.experiment is None:
            return
        with self._lock:
            exp = self._experiments.get(assignment.experiment)
            if exp is not None:
                exp.stats_of(assignment.variant).record_shadow(comparison)

    # ---- views

    def model_of(self, name: str) -> str | None:
        """The model of experiment `name` (running or stopped), None when there is none of that name."""
        with self._lock:
            exp = self._experiments.get(name)
            return exp.config.model if exp is not None else None

    def current_weights(self) -> dict[str, dict[str, float]]:
        """{experiment: {variant: weight}} of the running experiments (the `mame_experiment_weight` gauge)."""
        with self._lock:
            return {n: dict(e.config.split) for n, e in self._experiments.items() if e.stopped is None}

    def summaries(self) -> list[dict[str, Any]]:
        """The body of `GET /v1/experiments`: every experiment, running or stopped, without figures."""
        with self._lock:
            return [
                {
                    "name": e.name,
                    "model": e.config.model,
                    "status": "running" if e.stopped is None else "stopped",
                    "split": dict(e.config.split),
                    "sticky": e.config.sticky,
                    "shadow": e.config.shadow.model_dump() if e.config.shadow else None,
                }
                for e in self._experiments.values()
            ]

    def changes(self) -> list[ChangeRecord]:
        with self._lock:
            return list(self._changes)

    def ranges(self, name: str) -> tuple[BucketRange, ...]:
        with self._lock:
            exp = self._experiments.get(name)
            if exp is None:
                raise UnknownExperiment(f"experiment {name!r} does not exist")
            return exp.ranges

    def report(self, name: str) -> dict[str, Any]:
        """The body of `GET /v1/experiments/{name}`."""
        with self._lock:
            exp = self._experiments.get(name)
            if exp is None:
                raise UnknownExperiment(f"experiment {name!r} does not exist")
            now = exp.stopped if exp.stopped is not None else self._clock()
            variants = list(exp.config.split) + sorted(v for v in exp.stats if v not in exp.config.split)
            empty = VariantStats()
            shadow = exp.config.shadow
            return {
                "name": exp.name,
                "model": exp.config.model,
                "status": "running" if exp.stopped is None else "stopped",
                "running_s": now - exp.started,
                "split": dict(exp.config.split),
                "sticky": exp.config.sticky,
                "shadow": shadow.model_dump() if shadow else None,
                "ranges": [[r.start / SCALE, r.end / SCALE, r.variant] for r in exp.ranges],
                "variants": {
                    v: {
                        "weight": exp.config.split.get(v, 0.0),
                        **exp.stats.get(v, empty).report(now, exp.started),
                    }
                    for v in variants
                },
            }


# ------------------------------------------------------------------------------------------ admin auth


def admin_token_from_env(environ: Mapping[str, str] = os.environ) -> str | None:
    """The admin bearer token, or None (admin disabled) when the variable is unset or blank."""
    token = environ.get(ADMIN_TOKEN_ENV, "").strip()
    return token or None


@dataclass(frozen=True)
class AdminDenied:
    """Why an admin request is refused: the HTTP status, the contract's error code, headers to send."""

    status: int
    error: str
    detail: str
    headers: dict[str, str] = field(default_factory=dict)

    def as_api_error(self) -> ApiError:
        return ApiError(self.status, self.error, self.detail, self.headers)


def check_admin(authorization: str | None, token: str | None) -> AdminDenied | None:
    """None when `Authorization: Bearer <token>` matches; else the refusal.

    No token configured -> 404 (the admin endpoints do not exist); no or malformed header -> 401;
    a wrong token -> 403. Tokens are compared in constant time, on their SHA-256 digests (so the token's
    length does not leak either).
    """
    if token is None:
        return AdminDenied(
            404, "admin_disabled", f"admin endpoints are disabled: {ADMIN_TOKEN_ENV} is not set"
        )
    challenge = {"WWW-Authenticate": 'Bearer realm="mame-admin"'}
    if authorization is None or not authorization.strip():
        return AdminDenied(401, "unauthorized", "missing Authorization: Bearer <token> header", challenge)
    scheme, _, given = authorization.strip().partition(" ")
    given = given.strip()
    if scheme.lower() != "bearer" or not given or " " in given:
        return AdminDenied(
            401,
            "unauthorized",
            "malformed Authorization header: expected 'Bearer <token>'",
            {"WWW-Authenticate": 'Bearer realm="mame-admin", error="invalid_request"'},
        )
    if not hmac.compare_digest(
        hashlib.sha256(given.encode()).digest(), hashlib.sha256(token.encode()).digest()
    ):
        return AdminDenied(403, "forbidden", "wrong admin token")
    return None
