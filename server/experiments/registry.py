"""The registry of a server's A/B experiments: routes each request (model, variant, experiment, assignment),
creates, re-splits and stops experiments at run time, and reports on them. No HTTP: the app calls it (see
docs/ab_testing.md for where)."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from abtest.judge import ExperimentData, finite, variant_report
from server.experiments.buckets import (
    SCALE,
    BucketRange,
    bucket_point,
    check_ranges,
    initial_ranges,
    key_for_request,
    random_point,
    rebalance,
    should_shadow,
    variant_at,
)
from server.experiments.config import ExperimentConfig, check_experiment_name
from server.experiments.stats import ShadowComparison, VariantStats
from server.wire.errors import ApiError, echo

log = logging.getLogger(__name__)

AssignmentKind = Literal["assigned", "override", "default"]


class ExperimentError(ApiError):
    """A refused experiment operation, answered as the HTTP error (docs/api.md) its class names."""

    code = "invalid_parameter"
    status = 422

    def __init__(self, detail: str) -> None:
        super().__init__(type(self).status, type(self).code, detail)


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


ChangeAction = Literal["create", "update", "stop", "rollback", "ramp"]


@dataclass(frozen=True)
class ChangeRecord:
    time: float  # wall clock, seconds since the epoch
    action: ChangeAction
    experiment: str
    source: str  # "config", "admin", "store/judge" (a change read from the split store, and who made it)...
    split_before: dict[str, float] | None
    split_after: dict[str, float] | None
    reason: str = ""
    version: int = 0  # the experiment's split version after the change (the split store's, when it has one)


@dataclass
class _Experiment:
    name: str
    config: ExperimentConfig
    ranges: tuple[BucketRange, ...]
    started: float  # monotonic clock
    stopped: float | None = None
    version: int = 1  # one higher with every change; the split store's version once it sets the split
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
            exp = self._experiments[name] = _Experiment(
                name, config, initial_ranges(config.split), self._clock()
            )
            return self._log("create", exp, source, None, dict(config.split))

    def update_split(self, name: str, split: Mapping[str, float], *, source: str = "admin") -> ChangeRecord:
        """Change the weights of a running experiment, moving the fewest keys (see `rebalance`)."""
        with self._lock:
            exp = self._running(name)
            config = self._with_split(exp, split)
            before = dict(exp.config.split)
            exp.ranges = rebalance(exp.ranges, config.split)
            exp.config = config
            exp.version += 1
            return self._log("update", exp, source, before, dict(config.split))

    def check_split(self, name: str, split: Mapping[str, float]) -> None:
        """Raise the ExperimentError `update_split` would for this split, changing nothing."""
        with self._lock:
            self._with_split(self._running(name), split)

    def set_ranges(
        self,
        name: str,
        split: Mapping[str, float],
        ranges: Sequence[tuple[int, int, str]],
        *,
        version: int,
        action: ChangeAction = "update",
        source: str = "store",
        reason: str = "",
    ) -> ChangeRecord | None:
        """Take a split and its bucket ranges as they are (from the fleet's split store, whose writer computed
        them: a replica never rebalances them itself, so every replica assigns a key alike). A stopped
        experiment starts again (its report restarts). None when `version` is the one in force already."""
        new_ranges = tuple(BucketRange(int(start), int(end), variant) for start, end, variant in ranges)
        try:
            check_ranges(new_ranges)
        except ValueError as e:
            raise ExperimentError(f"experiment {name!r}: {e}") from None
        owners = {r.variant for r in new_ranges}
        if owners - {v for v, w in split.items() if w > 0}:
            raise ExperimentError(f"experiment {name!r}: ranges of {sorted(owners)} do not match the split")
        with self._lock:
            exp = self._experiments.get(name)
            if exp is None:
                raise UnknownExperiment(f"experiment {echo(name)} does not exist")
            config = self._with_split(exp, split)
            if exp.stopped is None and exp.version == version and exp.ranges == new_ranges:
                return None
            before = dict(exp.config.split) if exp.stopped is None else None
            if exp.stopped is not None:
                self._experiments.pop(name)
                exp = self._experiments[name] = _Experiment(name, config, new_ranges, self._clock())
                action = "create"
            exp.config, exp.ranges, exp.version = config, new_ranges, version
            return self._log(action, exp, source, before, dict(config.split), reason)

    def _with_split(self, exp: _Experiment, split: Mapping[str, float]) -> ExperimentConfig:
        try:
            config = ExperimentConfig(**{**exp.config.model_dump(), "split": dict(split)})
        except ValueError as e:  # pydantic's ValidationError is a ValueError
            raise ExperimentError(f"experiment {exp.name!r}: {e}") from None
        return self._validated(exp.name, config)

    def stop(self, name: str, *, source: str = "admin", reason: str = "",
             version: int | None = None) -> ChangeRecord:
        """Stop assigning; the report stays readable until the name is reused. `version`: the store's."""
        with self._lock:
            exp = self._running(name)
            exp.stopped = self._clock()
            exp.version = exp.version + 1 if version is None else version
            return self._log("stop", exp, source, dict(exp.config.split), None, reason)

    def version(self, name: str) -> tuple[int, bool]:
        """(split version, running) of an experiment; UnknownExperiment when there is none of that name."""
        with self._lock:
            exp = self._experiments.get(name)
            if exp is None:
                raise UnknownExperiment(f"experiment {echo(name)} does not exist")
            return exp.version, exp.stopped is None

    def _running(self, name: str) -> _Experiment:
        exp = self._experiments.get(name)
        if exp is None or exp.stopped is not None:
            state = "is stopped" if exp is not None else "does not exist"
            raise UnknownExperiment(f"experiment {echo(name)} {state}")
        return exp

    def _log(self, action: Any, exp: _Experiment, source: str, before: Any, after: Any,
             reason: str = "") -> ChangeRecord:
        record = ChangeRecord(self._wall_clock(), action, exp.name, source, before, after, reason,
                              exp.version)
        self._changes.append(record)
        log.info("experiment %s %s by %s: split %s -> %s (version %d)%s", exp.name, action, source, before,
                 after, exp.version, f": {reason}" if reason else "")
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
                        f"experiment {echo(experiment)} runs on model {exp.config.model!r}, not {echo(model)}"
                    )
                model = exp.config.model
            else:
                model = self._default_model if model is None else model
                if model not in self._models:
                    raise UnknownModel(f"unknown model {echo(model)}; known: {sorted(self._models)}")
                exp = self._default_experiment(model)
            known = self._models[model]
            if variant is not None:
                if variant not in known.variants:
                    raise UnknownVariant(
                        f"model {model!r} has no variant {echo(variant)}; known: {sorted(known.variants)}"
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

    def record_labels(self, assignment: Assignment, images: int, top1_correct: int,
                      top5_correct: int) -> None:
        """Count labelled images of an answered request (POST /v1/labels); no-op outside experiments."""
        if assignment.experiment is None:
            return
        with self._lock:
            exp = self._experiments.get(assignment.experiment)
            if exp is not None:
                exp.stats_of(assignment.variant).record_labels(images, top1_correct, top5_correct)

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

    def current_versions(self) -> dict[str, int]:
        """{experiment: split version} of the running experiments (`mame_experiment_split_version`)."""
        with self._lock:
            return {n: e.version for n, e in self._experiments.items() if e.stopped is None}

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
                raise UnknownExperiment(f"experiment {echo(name)} does not exist")
            return exp.ranges

    def report(self, name: str, confidence: float = 0.95) -> dict[str, Any]:
        """The body of `GET /v1/experiments/{name}`: the figures, and each variant's intervals at
        `confidence` computed from this replica's counts as the judge computes the fleet's from Prometheus
        (abtest.judge.variant_report), against the control when there is one."""
        body, data = self._report(name)
        control = body["control"]
        for variant, figures in body["variants"].items():
            intervals = variant_report(data, variant, control or variant, confidence)
            figures["intervals"] = finite(intervals)
        body["confidence"] = confidence
        return body

    def _report(self, name: str) -> tuple[dict[str, Any], ExperimentData]:
        with self._lock:
            exp = self._experiments.get(name)
            if exp is None:
                raise UnknownExperiment(f"experiment {echo(name)} does not exist")
            now = exp.stopped if exp.stopped is not None else self._clock()
            variants = list(exp.config.split) + sorted(v for v in exp.stats if v not in exp.config.split)
            empty = VariantStats()
            shadow = exp.config.shadow
            data = ExperimentData()
            for v in variants:
                stats = exp.stats.get(v, empty)
                for series, value in stats.judged_counts().items():
                    data.counts.setdefault(series, {})[v] = value
                data.latency[v] = stats.latency_le()
            return {
                "name": exp.name,
                "model": exp.config.model,
                "status": "running" if exp.stopped is None else "stopped",
                "running_s": now - exp.started,
                "split": dict(exp.config.split),
                "version": exp.version,
                "control": exp.config.control_variant,
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
            }, data
