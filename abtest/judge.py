"""`mame-judge`: judges experiments from the fleet's Prometheus series and acts through the split store.

Every `--interval` seconds, for each experiment of the serving config with guardrails or a ramp:
1. instant queries to Prometheus' HTTP API sum the experiment's counters and histogram buckets by variant
   over the experiment's window (`increase(...[<since start>s])`), so every replica's traffic counts;
2. each guardrail of each treatment variant is decided by an always-valid sequential test
   (`abtest.sequential`): passing, failing or inconclusive, at the experiment's level;
3. a failing guardrail returns that variant's share to the control through the split store (or, with
   `on_fail: alert`, only alerts); a ramp advances one step when every guardrail passes and each has at
   least `ramp.min_samples` observations gathered during the current step;
4. its /metrics (prometheus_client) show every guardrail's state and interval, rollbacks, alerts and the
   ramp step; `/v1/experiments[/{name}]` on the same port gives the last evaluation with its intervals.

It runs beside the servers, never on their request path: a slow or failing Prometheus delays a decision,
nothing else. The metric names it reads are in METRICS, the one table to change when they are renamed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from abtest import sequential, stats
from abtest.guardrails import GuardrailConfig, JudgedExperiment, load_judged_experiments
from abtest.split_store import (
    ExperimentSplit,
    SplitState,
    SplitStore,
    SplitStoreError,
    open_store,
    with_change,
)

log = logging.getLogger("abtest.judge")

# The server's series the judge reads: (metric name, extra label matchers). The one place to change when
# the names change. Errors are the variant's server errors, not admission refusals (503: queue full or not
# ready) nor client errors (4xx, 499); the request count they are a share of excludes the same.
METRICS: dict[str, tuple[str, str]] = {
    "shadow_comparisons": ("mame_shadow_comparisons_total", ""),
    "shadow_agreements": ("mame_shadow_agreements_total", ""),
    "errors": ("mame_requests_total", 'status=~"5..", status!="503"'),
    "requests": ("mame_requests_total", 'status!~"4..|503"'),
    # successful answers only: a fast 503 or error would make a variant's latency look better than it is
    "latency_bucket": ("mame_successful_request_duration_seconds_bucket", ""),
    "final_tokens_sum": ("mame_final_tokens_sum", ""),
    "final_tokens_count": ("mame_final_tokens_count", ""),
    "gflops_sum": ("mame_gflops_sum", ""),
    "gflops_count": ("mame_gflops_count", ""),
    # Labelled images (a client posts the true labels by request id: POST /v1/labels).
    "labelled": ("mame_labelled_images_total", ""),
    "top1_correct": ("mame_label_top1_correct_total", ""),
    "top5_correct": ("mame_label_top5_correct_total", ""),
}
# What each guardrail metric counts: (successes, trials) series.
RATE_SERIES = {
    "shadow_agreement": ("shadow_agreements", "shadow_comparisons"),
    "top1_accuracy": ("top1_correct", "labelled"),
    "top5_accuracy": ("top5_correct", "labelled"),
    "error_rate": ("errors", "requests"),
    "error_rate_diff": ("errors", "requests"),
}


class PrometheusError(Exception):
    """Prometheus could not answer a query; the message has its error."""


def label_value(value: str) -> str:
    """A PromQL string literal (its escapes are Go's, which JSON's cover for these characters)."""
    return json.dumps(value)


def promql(series: str, experiment: str, window_s: int, by: str = "variant", extra: str = "") -> str:
    """`sum by (<by>) (increase(<metric>{experiment="<name>", ...}[<window>s]))` for a METRICS entry."""
    metric, matchers = METRICS[series]
    labels = ", ".join(m for m in (f"experiment={label_value(experiment)}", matchers, extra) if m)
    return f"sum by ({by}) (increase({metric}{{{labels}}}[{max(int(window_s), 1)}s]))"


def parse_vector(
    answer: Mapping[str, Any], by: tuple[str, ...] = ("variant",)
) -> dict[tuple[str, ...], float]:
    """An instant-query answer of Prometheus' HTTP API -> {label values: value}. PrometheusError on an
    error answer or one that is not a vector."""
    if answer.get("status") != "success":
        raise PrometheusError(f"{answer.get('errorType', 'error')}: {answer.get('error', answer)}")
    data = answer.get("data") or {}
    if data.get("resultType") != "vector":
        raise PrometheusError(f"expected a vector answer, got {data.get('resultType')!r}")
    out: dict[tuple[str, ...], float] = {}
    for item in data.get("result", []):
        value = float(item["value"][1])
        if math.isfinite(value):
            out[tuple(item["metric"].get(label, "") for label in by)] = value
    return out


class PrometheusClient:
    """Instant queries over Prometheus' HTTP API (`GET /api/v1/query`)."""

    def __init__(self, url: str, timeout_s: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.http = httpx.Client(timeout=timeout_s)

    def query(self, expr: str, at: float | None = None) -> dict[str, Any]:
        params = {"query": expr} | ({"time": f"{at:.3f}"} if at is not None else {})
        try:
            response = self.http.get(f"{self.url}/api/v1/query", params=params)
        except httpx.HTTPError as exc:
            raise PrometheusError(f"cannot reach Prometheus at {self.url}: {exc}") from None
        try:
            answer = response.json()
        except ValueError:
            raise PrometheusError(f"Prometheus answered {response.status_code} without JSON") from None
        if response.status_code != 200 and answer.get("status") != "error":
            raise PrometheusError(f"Prometheus answered {response.status_code}")
        return answer


# ---------------------------------------------------------------------------------------------- data


@dataclass
class ExperimentData:
    """An experiment's fleet-wide figures per variant, from Prometheus (plain numbers: easy to record)."""

    counts: dict[str, dict[str, float]] = field(default_factory=dict)  # series -> variant -> value
    latency: dict[str, dict[str, float]] = field(default_factory=dict)  # variant -> {le: cumulative count}

    def count(self, series: str, variant: str) -> float:
        return max(0.0, self.counts.get(series, {}).get(variant, 0.0))

    def histogram(self, variant: str) -> stats.BucketCounts | None:
        buckets = self.latency.get(variant)
        return stats.buckets_from_le(buckets) if buckets and "+Inf" in buckets else None


def queries(name: str, exp: JudgedExperiment, window_s: int) -> dict[str, str]:
    """The PromQL of every figure of one experiment over its window."""
    out = {}
    for series in METRICS:
        if series == "latency_bucket":
            out[series] = promql(series, name, window_s, by="variant, le")
        elif series.startswith("shadow_") and exp.shadow is not None:
            out[series] = promql(series, name, window_s, extra=f"reference={label_value(exp.shadow.variant)}")
        else:
            out[series] = promql(series, name, window_s)
    return out


def data_from_answers(answers: Mapping[str, Mapping[str, Any]]) -> ExperimentData:
    """ExperimentData from the answers to `queries(...)`, keyed alike."""
    data = ExperimentData()
    for series, answer in answers.items():
        if series == "latency_bucket":
            for (variant, le), value in parse_vector(answer, ("variant", "le")).items():
                data.latency.setdefault(variant, {})[le] = value
        else:
            data.counts[series] = {v: value for (v,), value in parse_vector(answer).items()}
    return data


def fetch(
    client: PrometheusClient, name: str, exp: JudgedExperiment, window_s: int, at: float | None = None
) -> ExperimentData:
    return data_from_answers({s: client.query(q, at) for s, q in queries(name, exp, window_s).items()})


# ------------------------------------------------------------------------------------------ decisions


def samples(guardrail: GuardrailConfig, data: ExperimentData, variant: str) -> float:
    """The variant's observations behind a guardrail (comparisons, requests, labelled images)."""
    if guardrail.kind == "quantile_ratio":
        hist = data.histogram(variant)
        return hist.total if hist else 0.0
    return data.count(RATE_SERIES[guardrail.metric][1], variant)


def decide(
    guardrail: GuardrailConfig, data: ExperimentData, variant: str, control: str, level: float
) -> sequential.Decision:
    """One guardrail of one variant against the control, by its always-valid test."""
    if guardrail.kind == "quantile_ratio":
        v, c = data.histogram(variant), data.histogram(control)
        if v is None or c is None or v.total <= 0 or c.total <= 0:
            return sequential.Decision("inconclusive", None, 0.0, math.inf, level, v.total if v else 0.0)
        return sequential.quantile_ratio_decision(guardrail.quantile, v, c, guardrail.limit, level)
    hits, trials = RATE_SERIES[guardrail.metric]
    x, n = data.count(hits, variant), data.count(trials, variant)
    x = min(x, n)  # extrapolated increase() of two counters can cross by a fraction
    if guardrail.kind == "rate_difference":
        xc, nc = data.count(hits, control), data.count(trials, control)
        return sequential.rate_difference_decision(x, n, min(xc, nc), nc, guardrail.limit, level)
    return sequential.rate_decision(x, n, guardrail.limit, guardrail.direction, level)


def variant_report(data: ExperimentData, variant: str, control: str, confidence: float) -> dict[str, Any]:
    """Fixed-sample intervals of one variant (vs the control) for the report and dashboard."""

    def rate(hits: str, trials: str, v: str) -> stats.Interval:
        n = data.count(trials, v)
        return stats.wilson_interval(min(data.count(hits, v), n), n, confidence)

    out: dict[str, Any] = {
        "requests": data.count("requests", variant),
        "errors": data.count("errors", variant),
        "error_rate": rate("errors", "requests", variant).as_dict(),
        "shadow_agreement": rate("shadow_agreements", "shadow_comparisons", variant).as_dict(),
        "top1_accuracy": rate("top1_correct", "labelled", variant).as_dict(),
        "top5_accuracy": rate("top5_correct", "labelled", variant).as_dict(),
    }
    hist = data.histogram(variant)
    for q in (0.5, 0.95, 0.99):
        out[f"{stats.quantile_name(q)}_latency_s"] = (
            stats.quantile_interval(q, hist, confidence).as_dict() if hist and hist.total > 0 else None
        )
    if variant != control:
        nc, nv = data.count("requests", control), data.count("requests", variant)
        out["error_rate_diff"] = stats.rate_difference_interval(
            min(data.count("errors", variant), nv), nv, min(data.count("errors", control), nc), nc, confidence
        ).as_dict()
        ctrl = data.histogram(control)
        for q in (0.5, 0.95, 0.99):
            out[f"{stats.quantile_name(q)}_latency_ratio"] = (
                stats.quantile_ratio_interval(q, hist, ctrl, confidence).as_dict()
                if hist and ctrl and hist.total > 0 and ctrl.total > 0
                else None
            )
        for what in ("final_tokens", "gflops"):
            out[f"{what}_saved"] = stats.relative_saving(
                data.count(f"{what}_sum", variant),
                data.count(f"{what}_count", variant),
                data.count(f"{what}_sum", control),
                data.count(f"{what}_count", control),
            )
    return out


@dataclass(frozen=True)
class Verdict:
    """What the judge does with an experiment after one evaluation."""

    action: str  # "none" | "rollback" | "alert" | "ramp"
    split: dict[str, float] | None = None  # the new split (rollback, ramp)
    ramp_step: int | None = None
    reason: str = ""
    failing: tuple[tuple[str, str], ...] = ()  # (variant, guardrail metric)


def _failure_text(exp: JudgedExperiment, variant: str, metric: str, d: sequential.Decision) -> str:
    guardrail = next(g for g in exp.guardrails if g.metric == metric)
    estimate = "n/a" if d.estimate is None else f"{d.estimate:.4g}"
    return (
        f"{variant}: {metric} {estimate} (always-valid interval {d.low:.4g}..{d.high:.4g}, level "
        f"{exp.level:g}, {d.samples:.0f} samples) fails {guardrail.describe()}"
    )


def plan(
    exp: JudgedExperiment,
    entry: ExperimentSplit,
    decisions: Mapping[tuple[str, str], sequential.Decision],
    step_samples: Mapping[tuple[str, str], float],
) -> Verdict:
    """The action for one evaluation: roll back (or alert on) failing variants, else maybe advance the ramp.

    `decisions` and `step_samples` are keyed by (variant, guardrail metric); step_samples counts only the
    observations gathered since the current ramp step began.
    """
    control = exp.control_variant
    failing = tuple(sorted(k for k, d in decisions.items() if d.state == "failing"))
    if failing:
        reason = "; ".join(_failure_text(exp, v, m, decisions[(v, m)]) for v, m in failing)
        if exp.on_fail == "alert":
            return Verdict("alert", reason=reason, failing=failing)
        split = dict(entry.split)
        for variant in {v for v, _ in failing}:
            split[control] = split.get(control, 0.0) + split.get(variant, 0.0)  # type: ignore[index]
            split[variant] = 0.0
        return Verdict("rollback", split=split, ramp_step=None, reason=reason, failing=failing)
    ramp, step = exp.ramp, entry.ramp_step
    if ramp is None or step is None or step + 1 >= len(ramp.steps):
        return Verdict("none")
    live = [v for v in exp.treatments if entry.split.get(v, 0.0) > 0]
    needed = [(v, g.metric) for v in live for g in exp.guardrails]
    if not needed or any(decisions.get(k) is None or decisions[k].state != "passing" for k in needed):
        return Verdict("none")
    short = [(k, step_samples.get(k, 0.0)) for k in needed if step_samples.get(k, 0.0) < ramp.min_samples]
    if short:
        return Verdict(
            "none",
            reason=f"guardrails pass; waiting for {ramp.min_samples} samples in this step: "
            + ", ".join(f"{v}/{m} {n:.0f}" for (v, m), n in short),
        )
    split = exp.ramp_split(step + 1)
    return Verdict(
        "ramp",
        split=split,
        ramp_step=step + 1,
        reason=f"guardrails pass with >= {ramp.min_samples} samples at step {ramp.steps[step]:g}; "
        f"ramping to {ramp.steps[step + 1]:g}",
    )


# --------------------------------------------------------------------------------------------- service


class JudgeMetrics:
    """The judge's own series, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        keys = ("experiment", "variant", "guardrail")
        # one series per state, 1 for the current one (the OpenMetrics StateSet shape, with a plain label)
        self.state = Gauge(
            "mame_judge_guardrail_state",
            "Guardrail state by its sequential test (1: current)",
            (*keys, "state"),
            registry=r,
        )
        self.value = Gauge(
            "mame_judge_guardrail_value",
            "Guardrail estimate and its always-valid interval",
            (*keys, "bound"),
            registry=r,
        )
        self.samples = Gauge(
            "mame_judge_guardrail_samples", "Observations behind a guardrail", keys, registry=r
        )
        self.rollbacks = Counter(
            "mame_judge_rollbacks",
            "Variants returned to the control on a failing guardrail",
            keys,
            registry=r,
        )
        self.alerts = Counter(
            "mame_judge_alerts", "Guardrails turned failing under on_fail: alert", keys, registry=r
        )
        self.ramp_step = Gauge(
            "mame_judge_ramp_step", "Ramp step index (-1: no ramp or ended)", ("experiment",), registry=r
        )
        self.ramp_final_step = Gauge(
            "mame_judge_ramp_final_step", "Index of the ramp's last step", ("experiment",), registry=r
        )
        self.ramp_share = Gauge(
            "mame_judge_ramp_share",
            "Traffic share of each treatment at the ramp step",
            ("experiment",),
            registry=r,
        )
        self.weight = Gauge(
            "mame_judge_split_weight", "Split in the shared store", ("experiment", "variant"), registry=r
        )
        self.errors = Counter(
            "mame_judge_evaluation_errors",
            "Evaluations that failed (Prometheus, store)",
            ("experiment",),
            registry=r,
        )
        self.last = Gauge(
            "mame_judge_last_evaluation_timestamp_seconds",
            "Wall clock of the last evaluation",
            ("experiment",),
            registry=r,
        )


class Judge:
    def __init__(
        self,
        config_path: str | Path,
        store: SplitStore,
        prometheus: PrometheusClient,
        *,
        confidence: float = 0.95,
        clock: Any = time.time,
    ) -> None:
        self.config_path = Path(config_path)
        self.store = store
        self.prometheus = prometheus
        self.confidence = stats.check_confidence(confidence)
        self.clock = clock
        self.metrics = JudgeMetrics()
        self.reports: dict[str, dict[str, Any]] = {}
        self._alerted: set[tuple[str, str, str]] = set()  # (experiment, variant, guardrail) failing now
        self._lock = threading.Lock()

    def ensure_entries(self, experiments: Mapping[str, JudgedExperiment]) -> SplitState:
        """Put a missing experiment into the store: its config split, or its first ramp step."""

        def add_missing(state: SplitState) -> SplitState:
            for name, exp in experiments.items():
                if name not in state.experiments:
                    split = exp.ramp_split(0) if exp.ramp else exp.split
                    state = with_change(
                        state,
                        name,
                        split,
                        action="set",
                        source="judge",
                        reason="initial split from the serving config",
                        ramp_step=0 if exp.ramp else None,
                        now=self.clock(),
                    )
            return state

        current = self.store.read()
        return (
            current if all(n in current.experiments for n in experiments) else self.store.update(add_missing)
        )

    def evaluate_all(self) -> None:
        experiments = load_judged_experiments(self.config_path)
        state = self.ensure_entries(experiments)
        for name, exp in experiments.items():
            entry = state.experiments[name]
            if entry.changes and entry.changes[-1].action == "stop":  # stopped (the admin API): not judged
                continue
            try:
                self.evaluate(name, exp, entry)
            except (PrometheusError, SplitStoreError) as exc:
                self.metrics.errors.labels(name).inc()
                log.error("experiment %s: not judged this time: %s", name, exc)

    def evaluate(self, name: str, exp: JudgedExperiment, entry: ExperimentSplit) -> Verdict:
        now = self.clock()
        data = fetch(self.prometheus, name, exp, math.ceil(now - entry.started), now)
        # only a ramp needs the current step's own sample
        step_data = (
            fetch(self.prometheus, name, exp, math.ceil(now - entry.step_started), now) if exp.ramp else data
        )
        control = exp.control_variant
        assert control is not None
        judged = [v for v in exp.treatments if entry.split.get(v, 0.0) > 0]
        decisions, step_samples = {}, {}
        for variant in judged:
            for g in exp.guardrails:
                decisions[(variant, g.metric)] = decide(g, data, variant, control, exp.level)
                step_samples[(variant, g.metric)] = samples(g, step_data, variant)
        verdict = plan(exp, entry, decisions, step_samples)
        self._publish(name, exp, entry, decisions, verdict)
        current = self._apply(name, exp, entry, verdict) if verdict.action in ("rollback", "ramp") else entry
        for key, d in decisions.items():  # a guardrail that stops failing may alert again later
            if d.state != "failing":
                self._alerted.discard((name, *key))
        if verdict.action == "alert":
            for variant, metric in verdict.failing:
                if (name, variant, metric) not in self._alerted:
                    self._alerted.add((name, variant, metric))
                    self.metrics.alerts.labels(name, variant, metric).inc()
                    log.warning("experiment %s: guardrail failing (on_fail: alert): %s", name, verdict.reason)
        with self._lock:
            self.reports[name] = {
                "experiment": name,
                "time": now,
                "control": control,
                "level": exp.level,
                "confidence": self.confidence,
                "split": current.split,
                "ramp_step": current.ramp_step,
                "version": current.version,
                "window_s": now - entry.started,
                "verdict": verdict.action,
                "reason": verdict.reason,
                "guardrails": {
                    v: {m: d.as_dict() for (vv, m), d in decisions.items() if vv == v} for v in judged
                },
                "variants": {v: variant_report(data, v, control, self.confidence) for v in exp.split},
            }
        self.metrics.last.labels(name).set(now)
        return verdict

    def _apply(
        self, name: str, exp: JudgedExperiment, entry: ExperimentSplit, verdict: Verdict
    ) -> ExperimentSplit:
        """Write the verdict's split unless the entry changed since it was read; the entry now in force."""
        action = "rollback" if verdict.action == "rollback" else "ramp"
        applied = False

        def change(state: SplitState) -> SplitState:
            nonlocal applied
            current = state.experiments.get(name)
            if current is not None and current.version != entry.version:
                log.warning(
                    "experiment %s changed in the store meanwhile (version %d -> %d); re-judging next time",
                    name,
                    entry.version,
                    current.version,
                )
                return state
            applied = True
            return with_change(
                state,
                name,
                verdict.split or {},
                action=action,
                source="judge",  # type: ignore[arg-type]
                reason=verdict.reason,
                ramp_step=verdict.ramp_step,
                now=self.clock(),
            )

        new = self.store.update(change)
        if not applied:
            return new.experiments[name]
        if action == "rollback":
            for variant, metric in verdict.failing:
                self.metrics.rollbacks.labels(name, variant, metric).inc()
            log.warning(
                "experiment %s: ROLLBACK to the control: split %s -> %s: %s",
                name,
                entry.split,
                verdict.split,
                verdict.reason,
            )
        else:
            log.info(
                "experiment %s: ramp step %s -> %s: split %s -> %s (%s)",
                name,
                entry.ramp_step,
                verdict.ramp_step,
                entry.split,
                verdict.split,
                verdict.reason,
            )
        self._publish_split(name, new.experiments[name], exp.control_variant)
        return new.experiments[name]

    def _publish(
        self,
        name: str,
        exp: JudgedExperiment,
        entry: ExperimentSplit,
        decisions: Mapping[tuple[str, str], sequential.Decision],
        verdict: Verdict,
    ) -> None:
        for (variant, metric), d in decisions.items():
            for state in sequential.STATES:
                self.metrics.state.labels(name, variant, metric, state).set(state == d.state)
            self.metrics.samples.labels(name, variant, metric).set(d.samples)
            for bound, value in (("estimate", d.estimate), ("low", d.low), ("high", d.high)):
                self.metrics.value.labels(name, variant, metric, bound).set(
                    math.nan if value is None else value
                )
        self._publish_split(name, entry, exp.control_variant)
        if exp.ramp is not None:
            self.metrics.ramp_final_step.labels(name).set(len(exp.ramp.steps) - 1)

    def _publish_split(self, name: str, entry: ExperimentSplit, control: str | None) -> None:
        for variant, weight in entry.split.items():
            self.metrics.weight.labels(name, variant).set(weight)
        self.metrics.ramp_step.labels(name).set(-1 if entry.ramp_step is None else entry.ramp_step)
        share = max((w for v, w in entry.split.items() if v != control), default=0.0)
        self.metrics.ramp_share.labels(name).set(share if entry.ramp_step is not None else 0.0)

    def report(self, name: str | None = None) -> Any:
        with self._lock:
            return dict(self.reports) if name is None else self.reports.get(name)


def serve(judge: Judge, host: str, port: int) -> ThreadingHTTPServer:
    """/metrics (the judge's series), /v1/experiments[/{name}] (its last evaluations), /healthz."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0].rstrip("/")
            if path == "/metrics":
                self._send(200, generate_latest(judge.metrics.registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._json(200, {"status": "ok"})
            elif path == "/v1/experiments":
                self._json(200, {"experiments": judge.report()})
            elif path.startswith("/v1/experiments/"):
                report = judge.report(path.removeprefix("/v1/experiments/"))
                self._json(200 if report else 404, report or {"error": "unknown_experiment"})
            else:
                self._json(404, {"error": "not_found"})

        def _json(self, status: int, body: Any) -> None:
            self._send(
                status,
                json.dumps(body, default=str, allow_nan=False, cls=_FiniteEncoder).encode(),
                "application/json",
            )

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="judge-http", daemon=True).start()
    return server


class _FiniteEncoder(json.JSONEncoder):
    """JSON has no Infinity: an unbounded interval end is written as null."""

    def iterencode(self, o: Any, _one_shot: bool = False) -> Any:
        return super().iterencode(finite(o), _one_shot)


def finite(o: Any) -> Any:
    """`o` with every infinite or NaN float made None (JSON has no Infinity: an unbounded interval end)."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [finite(v) for v in o]
    return o


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="mame-judge",
        description="Judge A/B experiments from Prometheus: "
        "guardrails, rollbacks and ramps through the shared split store.",
    )
    ap.add_argument(
        "--config", required=True, help="the serving config (its experiments' guardrails and ramps)"
    )
    ap.add_argument("--prometheus", default="http://localhost:9090", help="Prometheus base URL")
    ap.add_argument("--store", required=True, help="split store: file:PATH or configmap:NAMESPACE/NAME[:KEY]")
    ap.add_argument("--interval", type=float, default=15.0, help="seconds between evaluations")
    ap.add_argument("--confidence", type=float, default=0.95, help="of the report's fixed-sample intervals")
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=9180, help="/metrics and /v1/experiments; 0: no HTTP")
    ap.add_argument("--once", action="store_true", help="evaluate once, print the reports, exit")
    ap.add_argument("--log-level", default="info")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        load_judged_experiments(args.config)
        store = open_store(args.store)
    except (ValueError, SplitStoreError) as exc:
        raise SystemExit(f"mame-judge: {exc}") from None
    judge = Judge(args.config, store, PrometheusClient(args.prometheus), confidence=args.confidence)
    if args.once:
        judge.evaluate_all()
        print(json.dumps(finite(judge.report()), indent=2, default=str))
        return
    if args.port:
        serve(judge, args.host, args.port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.is_set():
        started = time.monotonic()
        try:
            judge.evaluate_all()
        except (ValueError, SplitStoreError) as exc:  # a bad config or store: keep running, say why
            log.error("evaluation skipped: %s", exc)
        stop.wait(max(0.0, args.interval - (time.monotonic() - started)))


if __name__ == "__main__":
    main()
