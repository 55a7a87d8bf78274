"""What the load generator saw, summarised per variant: pure functions, no I/O."""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

OK_STATUS = "200"
# The group of a failed request whose variant the server did not reveal (no --variant was given).
UNKNOWN_VARIANT = "(unknown)"
TOTAL = "(all)"
PERCENTILES = (50.0, 90.0, 99.0)
# A send lag this long is the client's doing (an event loop hiccup is a few ms): say so under the table.
CLIENT_LAG_NOTE_MS = 100.0


@dataclass(frozen=True)
class Outcome:
    """One request as the client saw it."""

    group: str  # variant named in the answer, else the one asked for, else UNKNOWN_VARIANT
    # HTTP status as text ("200", "503") or a client-side failure ("client_timeout", "pool_timeout", ...)
    status: str
    intended_at_s: float  # when it was meant to be sent, seconds after the run started
    latency_s: float  # from intended_at_s to the end of the answer (open loop: avoids coordinated omission)
    # How long it waited in the client (event loop, connection pool) before it got a connection.
    send_lag_s: float = 0.0
    queue_ms: float | None = None  # server-side, from the answer's timings_ms
    inference_ms: float | None = None
    final_tokens: float | None = None  # mean over the request's images
    images: int = 1  # images in the request (several: one multipart request answered as a list)

    @property
    def ok(self) -> bool:
        return self.status == OK_STATUS

    @property
    def done_at_s(self) -> float:
        return self.intended_at_s + self.latency_s


@dataclass(frozen=True)
class VariantReport:
    variant: str
    sent: int
    ok: int
    errors: dict[str, int]  # status -> count, every status except 200
    sent_rps: float  # requests sent per second of the sending window
    ok_rps: float  # successful answers per second of the whole run (achieved throughput)
    ok_images_per_s: float  # images of successful answers per second of the whole run
    latency_ms: dict[str, float | None]  # p50, p90, p99, max, mean over successful requests
    queue_ms_mean: float | None
    inference_ms_mean: float | None
    final_tokens_mean: float | None

    @property
    def error_rate(self) -> float:
        return (self.sent - self.ok) / self.sent if self.sent else 0.0


@dataclass(frozen=True)
class RunReport:
    mode: str  # "open" or "closed"
    offered_rps: float | None  # open loop: the configured arrival rate
    concurrency: int | None  # closed loop: the configured number of workers
    elapsed_s: float  # run start to the last answer
    send_window_s: float  # run start to the last send
    max_send_lag_ms: float
    variants: list[VariantReport]
    total: VariantReport
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentiles(values: Iterable[float], qs: Sequence[float]) -> list[float]:
    """Linear interpolation between closest ranks (numpy's default method); q in [0, 100]."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentiles of an empty sequence")
    result = []
    for q in qs:
        if not 0.0 <= q <= 100.0:
            raise ValueError(f"percentile {q} outside [0, 100]")
        position = (len(ordered) - 1) * q / 100.0
        low, high = math.floor(position), math.ceil(position)
        result.append(ordered[low] + (ordered[high] - ordered[low]) * (position - low))
    return result


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize_group(
    name: str, outcomes: Sequence[Outcome], elapsed_s: float, send_window_s: float
) -> VariantReport:
    ok = [o for o in outcomes if o.ok]
    errors = Counter(o.status for o in outcomes if not o.ok)
    latencies_ms = [o.latency_s * 1000.0 for o in ok]
    latency: dict[str, float | None] = {"p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    if latencies_ms:
        p50, p90, p99 = percentiles(latencies_ms, PERCENTILES)
        latency = {"p50": p50, "p90": p90, "p99": p99, "max": max(latencies_ms), "mean": _mean(latencies_ms)}
    return VariantReport(
        variant=name,
        sent=len(outcomes),
        ok=len(ok),
        errors=dict(sorted(errors.items())),
        sent_rps=len(outcomes) / send_window_s if send_window_s > 0 else 0.0,
        ok_rps=len(ok) / elapsed_s if elapsed_s > 0 else 0.0,
        ok_images_per_s=sum(o.images for o in ok) / elapsed_s if elapsed_s > 0 else 0.0,
        latency_ms=latency,
        queue_ms_mean=_mean([o.queue_ms for o in ok if o.queue_ms is not None]),
        inference_ms_mean=_mean([o.inference_ms for o in ok if o.inference_ms is not None]),
        final_tokens_mean=_mean([float(o.final_tokens) for o in ok if o.final_tokens is not None]),
    )


def summarize(
    outcomes: Sequence[Outcome],
    mode: str,
    offered_rps: float | None = None,
    concurrency: int | None = None,
    meta: dict[str, Any] | None = None,
) -> RunReport:
    """Per-variant and overall figures. Rates share one clock for every variant: the sending window
    (start to last send) for sent/s, the whole run (start to last answer) for ok/s."""
    elapsed_s = max((o.done_at_s for o in outcomes), default=0.0)
    # With a single send at t=0 there is no window to divide by; the run time is the honest stand-in.
    send_window_s = max((o.intended_at_s for o in outcomes), default=0.0) or elapsed_s
    groups: dict[str, list[Outcome]] = {}
    for outcome in outcomes:
        groups.setdefault(outcome.group, []).append(outcome)
    return RunReport(
        mode=mode,
        offered_rps=offered_rps,
        concurrency=concurrency,
        elapsed_s=elapsed_s,
        send_window_s=send_window_s,
        max_send_lag_ms=max((o.send_lag_s for o in outcomes), default=0.0) * 1000.0,
        variants=[summarize_group(name, groups[name], elapsed_s, send_window_s) for name in sorted(groups)],
        total=summarize_group(TOTAL, outcomes, elapsed_s, send_window_s),
        meta=dict(meta or {}),
    )


def _cell(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(report: RunReport) -> str:
    """A fixed-width table: one row per variant and a total row."""
    header = [
        "variant", "sent", "ok", "errors", "sent/s", "ok/s", "img/s",
        "p50 ms", "p90 ms", "p99 ms", "max ms", "queue ms", "infer ms", "tokens",
    ]
    rows = [header]
    for v in [*report.variants, report.total]:
        errors = " ".join(f"{status}:{count}" for status, count in v.errors.items()) or "0"
        rows.append(
            [
                v.variant,
                str(v.sent),
                str(v.ok),
                errors,
                _cell(v.sent_rps),
                _cell(v.ok_rps),
                _cell(v.ok_images_per_s),
                _cell(v.latency_ms["p50"]),
                _cell(v.latency_ms["p90"]),
                _cell(v.latency_ms["p99"]),
                _cell(v.latency_ms["max"]),
                _cell(v.queue_ms_mean),
                _cell(v.inference_ms_mean),
                _cell(v.final_tokens_mean),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    load = (f"open loop, {report.offered_rps:g} req/s offered" if report.mode == "open"
            else f"closed loop, concurrency {report.concurrency}")
    footer = (f"{load}; {report.elapsed_s:.1f} s; latency over successful requests"
              f"{' from the intended send time' if report.mode == 'open' else ''};"
              f" max client send lag {report.max_send_lag_ms:.1f} ms")
    if report.max_send_lag_ms >= CLIENT_LAG_NOTE_MS:
        footer += (
            f"\nnote: a request waited up to {report.max_send_lag_ms / 1000:.2f} s in this client before it"
            " got a connection (pool full: raise --max-connections; or the client is overloaded);"
            " that wait is in the latencies above, not in the server"
        )
    return "\n".join([*lines, footer])
