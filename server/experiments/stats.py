"""Per-variant figures of an experiment, and the comparison of a served answer with its shadow run."""

from __future__ import annotations

import bisect
import math
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from server.engine.metrics import LATENCY_BUCKETS


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
    labelled: int = 0
    top1_correct: int = 0
    top5_correct: int = 0
    # successful requests' latencies over the experiment's whole life, per bucket of LATENCY_BUCKETS (the
    # last: beyond them): the quantile intervals of the report, as the judge computes them from Prometheus
    latency_buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
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
        self.latency_buckets[bisect.bisect_left(LATENCY_BUCKETS, latency_s)] += 1
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

    def record_labels(self, images: int, top1_correct: int, top5_correct: int) -> None:
        self.labelled += images
        self.top1_correct += top1_correct
        self.top5_correct += top5_correct

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

    def judged_counts(self) -> dict[str, float]:
        """The counts the judge reads from Prometheus (abtest.judge.METRICS' series), from this replica alone.
        Errors are server errors but 503 (an admission refusal); the requests they are a share of exclude
        503 and client errors (4xx, 499) alike."""
        judged = sum(n for s, n in self.statuses.items() if not (400 <= s < 500 or s == 503))
        return {
            "requests": judged,
            "errors": sum(n for s, n in self.statuses.items() if s >= 500 and s != 503),
            "shadow_comparisons": self.shadow_comparisons,
            "shadow_agreements": self.shadow_agreements,
            "labelled": self.labelled,
            "top1_correct": self.top1_correct,
            "top5_correct": self.top5_correct,
            "final_tokens_sum": self.final_tokens_sum,
            "final_tokens_count": self.images,
            "gflops_sum": self.gflops_sum,
            "gflops_count": self.images,
        }

    def latency_le(self) -> dict[str, float]:
        """The whole-life latency buckets as Prometheus writes them: {le: cumulative count}."""
        out, total = {}, 0
        for bound, count in zip((*map(str, LATENCY_BUCKETS), "+Inf"), self.latency_buckets):
            total += count
            out[bound] = float(total)
        return out

    def report(self, now: float, started: float) -> dict[str, Any]:
        ordered = sorted(self.latencies_s)
        p50, p95 = percentile(ordered, 0.50), percentile(ordered, 0.95)
        # 503: turned away before any work (queue share full, shutting down), not a failure of the variant
        refusals = self.statuses.get(503, 0)
        errors = sum(n for status, n in self.statuses.items() if status >= 500) - refusals
        comparisons = self.shadow_comparisons
        return {
            "requests": self.requests,
            "errors": errors,
            "refusals": refusals,
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
            "labels": {
                "images": self.labelled,
                "top1_correct": self.top1_correct,
                "top5_correct": self.top5_correct,
                "top1_accuracy": self.top1_correct / self.labelled if self.labelled else None,
                "top5_accuracy": self.top5_correct / self.labelled if self.labelled else None,
            },
        }
