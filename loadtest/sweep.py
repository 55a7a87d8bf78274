"""Latency-throughput sweep: the stop rule, the saturation table and the plot."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loadtest.report import VariantReport


@dataclass(frozen=True)
class SweepLimits:
    max_p99_ms: float = 1000.0
    max_error_rate: float = 0.01
    # Achieved ok/s below this fraction of the sent rate means the server stopped keeping up.
    min_goodput_ratio: float = 0.9

    def __post_init__(self) -> None:
        if self.max_p99_ms <= 0:
            raise ValueError(f"max p99 must be positive, got {self.max_p99_ms} ms")
        if not 0.0 <= self.max_error_rate < 1.0:
            raise ValueError(f"max error rate must be in [0, 1), got {self.max_error_rate}")
        if not 0.0 < self.min_goodput_ratio <= 1.0:
            raise ValueError(f"min goodput ratio must be in (0, 1], got {self.min_goodput_ratio}")


@dataclass(frozen=True)
class SweepPoint:
    variant: str
    offered_rps: float
    step: VariantReport
    stop: str | None  # why the sweep stopped after this step, None while within limits


def stop_reason(step: VariantReport, limits: SweepLimits) -> str | None:
    """Why this step crossed a limit, or None when it stayed within all of them."""
    if step.sent == 0:
        return "no request was sent"
    if step.error_rate > limits.max_error_rate:
        return f"error rate {step.error_rate:.1%} > {limits.max_error_rate:.1%}"
    p99 = step.latency_ms["p99"]
    if p99 is not None and p99 > limits.max_p99_ms:
        return f"p99 {p99:.0f} ms > {limits.max_p99_ms:g} ms"
    if step.ok_rps < limits.min_goodput_ratio * step.sent_rps:
        return f"ok {step.ok_rps:.1f}/s < {limits.min_goodput_ratio:.0%} of sent {step.sent_rps:.1f}/s"
    return None


def sweep_rates(start_rps: float, factor: float, steps: int) -> list[float]:
    """Geometric rate ladder: start, start*factor, ... (steps values)."""
    if start_rps <= 0:
        raise ValueError(f"start rate must be positive, got {start_rps}")
    if factor <= 1.0:
        raise ValueError(f"sweep factor must be > 1, got {factor}")
    if steps < 1:
        raise ValueError(f"sweep needs at least one step, got {steps}")
    return [start_rps * factor**i for i in range(steps)]


@dataclass(frozen=True)
class Saturation:
    variant: str
    max_rate_within_limits: float | None  # highest offered rate whose step stayed within the limits
    ok_rps_at_max: float | None
    p99_ms_at_max: float | None
    peak_ok_rps: float  # best achieved throughput over every step, also the ones past a limit
    stopped_by: str  # the limit that ended the sweep, or "rate ladder exhausted"


def saturation(points: Sequence[SweepPoint]) -> list[Saturation]:
    """One row per variant, in the order the variants were swept."""
    variants = list(dict.fromkeys(p.variant for p in points))
    rows = []
    for variant in variants:
        mine = [p for p in points if p.variant == variant]
        within = [p for p in mine if p.stop is None]
        best = max(within, key=lambda p: p.offered_rps) if within else None
        rows.append(Saturation(
            variant=variant,
            max_rate_within_limits=best.offered_rps if best else None,
            ok_rps_at_max=best.step.ok_rps if best else None,
            p99_ms_at_max=best.step.latency_ms["p99"] if best else None,
            peak_ok_rps=max(p.step.ok_rps for p in mine),
            stopped_by=next((p.stop for p in mine if p.stop), "rate ladder exhausted"),
        ))
    return rows


def format_saturation(rows: Sequence[Saturation]) -> str:
    """A Markdown table (reads as plain text too)."""
    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    lines = [
        "| variant | max rate within limits (req/s) | ok/s there | p99 there (ms) | peak ok/s | stopped by |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r.variant} | {cell(r.max_rate_within_limits)} | {cell(r.ok_rps_at_max)} | "
                     f"{cell(r.p99_ms_at_max)} | {cell(r.peak_ok_rps)} | {r.stopped_by} |")
    return "\n".join(lines)


def sweep_to_dict(points: Sequence[SweepPoint], limits: SweepLimits) -> dict[str, Any]:
    return {
        "limits": asdict(limits),
        "points": [asdict(p) for p in points],
        "saturation": [asdict(r) for r in saturation(points)],
    }


def plot_sweep(points: Sequence[SweepPoint], path: Path, title: str) -> None:
    """Latency (p50 dashed, p99 solid) against achieved throughput, one colour per variant."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for index, variant in enumerate(dict.fromkeys(p.variant for p in points)):
        mine = [p for p in points if p.variant == variant and p.step.ok > 0]
        if not mine:
            continue
        color = f"C{index}"
        x = [p.step.ok_rps for p in mine]
        ax.plot(x, [p.step.latency_ms["p99"] for p in mine], "o-", color=color, label=f"{variant} p99")
        ax.plot(x, [p.step.latency_ms["p50"] for p in mine], "s--", color=color, alpha=0.6,
                label=f"{variant} p50")
    ax.set_yscale("log")
    ax.set_xlabel("achieved throughput (successful requests/s)")
    ax.set_ylabel("latency (ms, log scale)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
