"""Simulations where the truth is known: false rollbacks and time to roll back of the agreement guardrail.

    python -m abtest.simulate [--runs 500] [--comparisons 20000] [--level 0.05] [--threshold 0.98]

Each run draws shadow comparisons (agree or not) with a known true agreement and judges the guardrail
"agreement >= threshold" after every comparison, stopping at the first failing verdict (a rollback). For
contrast it also watches a fixed-sample Wilson interval after every comparison, the way a dashboard is
read, which is not valid under continuous monitoring. Vectorised over runs with numpy.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

from abtest.sequential import DEFAULT_PRIOR_STRENGTH, FAILING, rate_states

CHUNK = 2000  # comparisons judged per vectorised step (runs x CHUNK arrays)


@dataclass(frozen=True)
class Outcome:
    """Per run: the comparison at which the guardrail first failed (0 = never within the horizon)."""

    true_rate: float
    stopped_at: np.ndarray

    @property
    def rollback_rate(self) -> float:
        return float(np.mean(self.stopped_at > 0))

    def median_to_rollback(self) -> float:
        """Median comparisons to roll back over all runs (a run never rolled back counts as infinite)."""
        at = np.where(self.stopped_at > 0, self.stopped_at, np.inf).astype(float)
        return float(np.median(at))


def first_failure(
    true_rate: float,
    runs: int,
    comparisons: int,
    judge: Callable[[np.ndarray, np.ndarray], np.ndarray],
    rng: np.random.Generator,
) -> Outcome:
    """Draw `runs` streams of Bernoulli(true_rate) comparisons; `judge(successes, trials)` -> True where it
    fails. Returns where each run first failed."""
    stopped = np.zeros(runs, dtype=np.int64)
    successes = np.zeros(runs, dtype=np.int64)
    for start in range(0, comparisons, CHUNK):
        width = min(CHUNK, comparisons - start)
        draws = rng.random((runs, width)) < true_rate
        s = successes[:, None] + np.cumsum(draws, axis=1)
        n = np.arange(start + 1, start + width + 1)[None, :]
        failing = judge(s, np.broadcast_to(n, s.shape)) & (stopped == 0)[:, None]
        hit = failing.any(axis=1)
        stopped[hit] = start + 1 + failing[hit].argmax(axis=1)
        successes = s[:, -1]
    return Outcome(true_rate, stopped)


def sequential_judge(threshold: float, level: float, prior_strength: float = DEFAULT_PRIOR_STRENGTH):
    def judge(s: np.ndarray, n: np.ndarray) -> np.ndarray:
        return rate_states(s, n, threshold, "min", level, prior_strength) == FAILING

    return judge


def peeking_wilson_judge(threshold: float, level: float):
    """Fails when a fixed-sample two-sided Wilson interval at 1 - level lies below the threshold."""
    z = float(sps.norm.ppf(1 - level / 2))

    def judge(s: np.ndarray, n: np.ndarray) -> np.ndarray:
        p = s / n
        center = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        return center + half < threshold

    return judge


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m abtest.simulate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=500)
    ap.add_argument("--comparisons", type=int, default=20_000)
    ap.add_argument("--level", type=float, default=0.05)
    ap.add_argument("--threshold", type=float, default=0.98, help="guardrail: agreement >= threshold")
    ap.add_argument(
        "--shortfall", type=float, default=0.03, help="the bad variant's agreement is this far below"
    )
    ap.add_argument("--prior-strength", type=float, default=DEFAULT_PRIOR_STRENGTH)
    ap.add_argument("--seed", type=int, default=17)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    judge = sequential_judge(args.threshold, args.level, args.prior_strength)
    print(
        f"guardrail agreement >= {args.threshold}, level {args.level}, {args.runs} runs x up to "
        f"{args.comparisons} comparisons, judged after every comparison (seed {args.seed})"
    )
    at = first_failure(args.threshold, args.runs, args.comparisons, judge, rng)
    above = first_failure(min(1.0, args.threshold + 0.01), args.runs, args.comparisons, judge, rng)
    bad_rate = args.threshold - args.shortfall
    bad = first_failure(bad_rate, args.runs, args.comparisons, judge, rng)
    peek = first_failure(
        args.threshold, args.runs, args.comparisons, peeking_wilson_judge(args.threshold, args.level), rng
    )
    print(
        f"false rollbacks, true agreement {at.true_rate:.4g} (at the guardrail): {at.rollback_rate:.3f}"
        f"   (must be <= {args.level})"
    )
    print(f"false rollbacks, true agreement {above.true_rate:.4g} (above it): {above.rollback_rate:.3f}")
    median = bad.median_to_rollback()
    stopped = bad.stopped_at[bad.stopped_at > 0]
    print(
        f"bad variant, true agreement {bad_rate:.4g}: rolled back in {bad.rollback_rate:.3f} of runs; "
        f"comparisons to roll back: median {median:.0f}, 90th percentile "
        f"{np.percentile(np.where(bad.stopped_at > 0, bad.stopped_at, np.inf), 90):.0f}"
        f" (min {stopped.min() if stopped.size else math.nan}, target median <= 5000)"
    )
    print(
        f"for contrast, a fixed {1 - args.level:.0%} Wilson interval watched after every comparison: "
        f"false rollbacks at the guardrail {peek.rollback_rate:.3f}"
    )
    print(f"{time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
