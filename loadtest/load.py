"""mame-load: an asynchronous load generator for the MaMe inference server.

Open loop (Poisson arrivals at a set rate) or closed loop (a set concurrency), always bounded by a
request count and a duration. Prints a per-variant report; --sweep steps the rate up per variant.
`--protocol v2` sends the images as Open Inference Protocol infer requests (docs/oip.md) instead.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import math
import os
import random
import struct
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from loadtest.images import ImagePayload, load_images
from loadtest.report import UNKNOWN_VARIANT, Outcome, RunReport, format_table, percentiles, summarize
from loadtest.sweep import (
    SweepLimits,
    SweepPoint,
    format_saturation,
    plot_sweep,
    saturation,
    stop_reason,
    sweep_rates,
    sweep_to_dict,
)

CLASSIFY_PATH = "/v1/classify"
PROTOCOLS = ("v1", "v2")


@dataclass(frozen=True)
class Target:
    url: str
    model: str | None = None
    variants: tuple[str, ...] = ()  # empty: let the server choose (experiment or default variant)
    experiment: str | None = None
    users: int = 1000  # distinct user keys drawn for experiment assignment
    user_header: str = "X-User-Id"
    top_k: int | None = None
    images_per_request: int = 1  # several: one multipart request, answered as a list
    protocol: str = "v1"  # v2: Open Inference Protocol infer requests (the images as one BYTES tensor)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.protocol == "v2" and not self.model:
            raise ValueError("--protocol v2 names the model in the path: give --model")


@dataclass(frozen=True)
class LoadPlan:
    mode: str  # "open" or "closed"
    max_requests: int
    duration_s: float
    rate_rps: float | None = None  # open loop
    concurrency: int | None = None  # closed loop
    timeout_s: float = 30.0
    max_connections: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("open", "closed"):
            raise ValueError(f"mode must be 'open' or 'closed', got {self.mode!r}")
        if self.max_requests < 1:
            raise ValueError(f"request count must be at least 1, got {self.max_requests}")
        if not self.duration_s > 0:
            raise ValueError(f"duration must be positive, got {self.duration_s} s")
        if self.mode == "open" and not (self.rate_rps is not None and self.rate_rps > 0):
            raise ValueError(f"open loop needs a positive rate, got {self.rate_rps}")
        if self.mode == "closed" and not (self.concurrency is not None and self.concurrency >= 1):
            raise ValueError(f"closed loop needs a concurrency of at least 1, got {self.concurrency}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout must be positive, got {self.timeout_s} s")
        if self.max_connections < 1:  # 0 would leave every request waiting for a connection
            raise ValueError(f"--max-connections must be at least 1, got {self.max_connections}")


@dataclass(frozen=True)
class RequestSpec:
    variant: str | None
    user_key: str | None
    images: tuple[ImagePayload, ...]


def poisson_offsets(
    rate_rps: float, max_requests: int, duration_s: float, rng: random.Random
) -> Iterator[float]:
    """Send times (seconds after start) of a Poisson process at `rate_rps`: exponential gaps, the first
    at t=0; stops at `max_requests` times or at `duration_s`, whichever comes first."""
    if rate_rps <= 0:
        raise ValueError(f"rate must be positive, got {rate_rps}")
    t = 0.0
    for _ in range(max_requests):
        if t >= duration_s:
            return
        yield t
        t += rng.expovariate(rate_rps)


def request_specs(
    target: Target, images: Sequence[ImagePayload], rng: random.Random
) -> Iterator[RequestSpec]:
    """Endless requests: variants drawn uniformly (so each variant's arrivals stay Poisson), a random
    user key when an experiment assigns variants, images in turn (`images_per_request` of them each)."""
    per_request = target.images_per_request
    for index in itertools.count():
        variant = rng.choice(target.variants) if target.variants else None
        user_key = f"user-{rng.randrange(target.users)}" if target.experiment else None
        first = index * per_request
        yield RequestSpec(
            variant, user_key, tuple(images[(first + i) % len(images)] for i in range(per_request))
        )


def oip_request(target: Target, spec: RequestSpec) -> tuple[str, bytes, dict[str, str]]:
    """(path, body, headers) of an Open Inference Protocol infer request for `spec`'s images: their files
    as one BYTES tensor in binary data, the answer in JSON (top-k strings and final tokens)."""
    assert target.model is not None
    path = f"/v2/models/{target.model}" + (f"/versions/{spec.variant}" if spec.variant else "") + "/infer"
    data = b"".join(struct.pack("<I", len(image.data)) + image.data for image in spec.images)
    head: dict[str, Any] = {
        "inputs": [{"name": "images", "datatype": "BYTES", "shape": [len(spec.images)],
                    "parameters": {"binary_data_size": len(data)}}],
        "outputs": [{"name": "probabilities", "parameters": {"classification": target.top_k or 5}},
                    {"name": "final_tokens"}],
    }
    if target.experiment:
        head["parameters"] = {"experiment": target.experiment}
    encoded = json.dumps(head).encode()
    headers = {"Content-Type": "application/octet-stream",
               "Inference-Header-Content-Length": str(len(encoded))}
    return path, encoded + data, headers


def read_oip_answer(status_code: int, body: Any, requested_variant: str | None) -> dict[str, Any]:
    """Outcome fields from an infer answer: the group is its model_version (the variant that served). The
    protocol's answer has no server timings: queue and inference stay empty."""
    fallback = requested_variant or UNKNOWN_VARIANT
    if status_code != 200:
        return {"group": fallback, "status": str(status_code)}
    try:
        finals = next(o["data"] for o in body["outputs"] if o["name"] == "final_tokens")
        return {"group": str(body["model_version"]), "status": "200",
                "final_tokens": sum(int(f) for f in finals) / len(finals), "images": len(finals)}
    except (AttributeError, TypeError, KeyError, ValueError, StopIteration, ZeroDivisionError):
        return {"group": fallback, "status": "invalid_answer"}


def read_answer(status_code: int, body: Any, requested_variant: str | None) -> dict[str, Any]:
    """Outcome fields from an HTTP answer (docs/api.md): the group is the variant the server names. An
    answer to several images ({"results": [...]}) gives their mean queue, inference and final tokens."""
    fallback = requested_variant or UNKNOWN_VARIANT
    if status_code != 200:
        return {"group": fallback, "status": str(status_code)}
    try:
        answers = body.get("results", [body])
        return {
            "group": str(answers[0]["variant"]),
            "status": "200",
            "queue_ms": sum(float(a["timings_ms"]["queue"]) for a in answers) / len(answers),
            "inference_ms": sum(float(a["timings_ms"]["inference"]) for a in answers) / len(answers),
            "final_tokens": sum(int(a["tokens"]["final"]) for a in answers) / len(answers),
            "images": len(answers),
        }
    except (AttributeError, TypeError, KeyError, ValueError, IndexError, ZeroDivisionError):
        return {"group": fallback, "status": "invalid_answer"}


@dataclass
class Progress:
    """Counters shared by the request tasks and the progress line."""

    sent: int = 0
    ok: int = 0
    failed: int = 0
    recent_ms: deque[float] = field(default_factory=lambda: deque(maxlen=2000))

    @property
    def in_flight(self) -> int:
        return self.sent - self.ok - self.failed

    def line(self, elapsed_s: float) -> str:
        p50 = p99 = "-"
        if self.recent_ms:
            low, high = percentiles(self.recent_ms, (50.0, 99.0))
            p50, p99 = f"{low:.0f}", f"{high:.0f}"
        done = self.ok + self.failed
        rate = done / elapsed_s if elapsed_s > 0 else 0.0
        return (f"[{elapsed_s:6.1f}s] sent {self.sent}  ok {self.ok}  errors {self.failed}  "
                f"in flight {self.in_flight}  {rate:.1f} answers/s  p50 {p50} ms  p99 {p99} ms")


async def send_one(
    client: httpx.AsyncClient,
    target: Target,
    spec: RequestSpec,
    intended: float,
    start: float,
    progress: Progress,
    timeout_s: float,
) -> Outcome:
    """One request; latency runs from `intended` (the schedule), so a late send still counts. The send
    lag runs from `intended` until the request gets a connection (httpcore's first trace event:
    connecting, or sending on a kept-alive connection), so it holds the event loop's delay and the
    wait for a free connection in the client's pool; that wait is bounded by `timeout_s`."""
    params: dict[str, str] = {}
    if target.model:
        params["model"] = target.model
    if spec.variant:
        params["variant"] = spec.variant
    if target.experiment:
        params["experiment"] = target.experiment
    if target.top_k is not None:
        params["top_k"] = str(target.top_k)
    headers: dict[str, str] = {}
    if spec.user_key is not None:
        headers[target.user_header] = spec.user_key
    loop = asyncio.get_running_loop()
    on_wire: list[float] = []

    async def trace(event: str, info: dict[str, Any]) -> None:
        if not on_wire and not pool_wait.expired():  # expired: the timeout is already cancelling us
            on_wire.append(loop.time())
            # From here httpx's connect/write/read timeouts bound the request.
            pool_wait.reschedule(None)

    progress.sent += 1
    try:
        # httpx's own pool timeout restarts whenever another request takes the freed connection
        # first, so a full pool could hold a request far longer than --timeout: bound it here.
        async with asyncio.timeout(timeout_s) as pool_wait:
            if target.protocol == "v2":
                path, content, oip_headers = oip_request(target, spec)
                response = await client.post(path, content=content, headers={**headers, **oip_headers},
                                             extensions={"trace": trace})
            elif len(spec.images) == 1:
                image = spec.images[0]
                response = await client.post(CLASSIFY_PATH, params=params, content=image.data,
                                             headers={**headers, "Content-Type": image.content_type},
                                             extensions={"trace": trace})
            else:
                files = [("file", (image.name, image.data, image.content_type)) for image in spec.images]
                response = await client.post(CLASSIFY_PATH, params=params, headers=headers, files=files,
                                             extensions={"trace": trace})
        try:
            body = response.json() if response.status_code == 200 else None
        except ValueError:
            body = None
        read = read_oip_answer if target.protocol == "v2" else read_answer
        fields = read(response.status_code, body, spec.variant)
    except (TimeoutError, httpx.PoolTimeout):
        fields = {"group": spec.variant or UNKNOWN_VARIANT, "status": "pool_timeout"}
    except httpx.TimeoutException:
        fields = {"group": spec.variant or UNKNOWN_VARIANT, "status": "client_timeout"}
    except httpx.TransportError:
        fields = {"group": spec.variant or UNKNOWN_VARIANT, "status": "connection_error"}
    done = loop.time()
    latency = done - intended
    # A request that never got a connection lagged for all of its life.
    send_lag = max(0.0, (on_wire[0] if on_wire else done) - intended)
    outcome = Outcome(intended_at_s=intended - start, latency_s=latency, send_lag_s=send_lag, **fields)
    if outcome.ok:
        progress.ok += 1
        progress.recent_ms.append(latency * 1000.0)
    else:
        progress.failed += 1
    return outcome


async def _open_loop(client, target, plan, specs, start, progress) -> list[Outcome]:
    loop = asyncio.get_running_loop()
    rng = random.Random(plan.seed)
    tasks = []
    for offset in poisson_offsets(plan.rate_rps, plan.max_requests, plan.duration_s, rng):
        delay = start + offset - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(
            asyncio.create_task(
                send_one(client, target, next(specs), start + offset, start, progress, plan.timeout_s)
            )
        )
    return list(await asyncio.gather(*tasks))


async def _closed_loop(client, target, plan, specs, start, progress) -> list[Outcome]:
    loop = asyncio.get_running_loop()
    deadline = start + plan.duration_s
    counter = itertools.count()
    outcomes: list[Outcome] = []

    async def worker() -> None:
        while loop.time() < deadline and next(counter) < plan.max_requests:
            outcomes.append(await send_one(client, target, next(specs), loop.time(), start, progress,
                                            plan.timeout_s))

    await asyncio.gather(*(worker() for _ in range(plan.concurrency)))
    return outcomes


async def _print_progress(progress: Progress, start: float, every_s: float) -> None:
    loop = asyncio.get_running_loop()
    live = sys.stderr.isatty()
    while True:
        await asyncio.sleep(every_s)
        line = progress.line(loop.time() - start)
        sys.stderr.write(f"\r{line}\033[K" if live else line + "\n")
        sys.stderr.flush()


async def run_load(
    target: Target, plan: LoadPlan, images: Sequence[ImagePayload], show_progress: bool = True
) -> list[Outcome]:
    """Send the plan's requests and return what happened to each of them."""
    if not images:
        raise ValueError("no images to send")
    limits = httpx.Limits(
        max_connections=plan.max_connections, max_keepalive_connections=plan.max_connections
    )
    specs = request_specs(target, images, random.Random(plan.seed + 1))
    progress = Progress()
    async with httpx.AsyncClient(base_url=target.url, timeout=plan.timeout_s, limits=limits) as client:
        start = asyncio.get_running_loop().time()
        printer = None
        if show_progress:
            every = 0.5 if sys.stderr.isatty() else 2.0
            printer = asyncio.create_task(_print_progress(progress, start, every))
        try:
            if plan.mode == "open":
                outcomes = await _open_loop(client, target, plan, specs, start, progress)
            else:
                outcomes = await _closed_loop(client, target, plan, specs, start, progress)
        finally:
            if printer is not None:
                printer.cancel()
                sys.stderr.write(("\r" if sys.stderr.isatty() else "")
                                 + progress.line(asyncio.get_running_loop().time() - start) + "\n")
    return outcomes


def wait_ready(url: str, timeout_s: float) -> None:
    """Poll /readyz until it answers 200; a clear error when it never does."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while True:
        try:
            response = httpx.get(url.rstrip("/") + "/readyz", timeout=5.0)
            if response.status_code == 200:
                return
            last = f"HTTP {response.status_code}"
        except httpx.HTTPError as error:
            last = f"{type(error).__name__}: {error}"
        if time.monotonic() >= deadline:
            raise RuntimeError(f"{url} was not ready after {timeout_s:g} s ({last})")
        time.sleep(0.5)


def settings(target: Target, plan: LoadPlan, images: Sequence[ImagePayload]) -> dict[str, Any]:
    """Every setting that shapes the load, for the JSON report: all of Target and LoadPlan."""
    return {**dataclasses.asdict(target), **dataclasses.asdict(plan), "images": len(images)}


def run_report(
    target: Target, plan: LoadPlan, images: Sequence[ImagePayload], show_progress: bool
) -> RunReport:
    outcomes = asyncio.run(run_load(target, plan, images, show_progress))
    return summarize(outcomes, plan.mode, plan.rate_rps if plan.mode == "open" else None,
                     plan.concurrency if plan.mode == "closed" else None, settings(target, plan, images))


def run_sweep(
    target: Target, plan: LoadPlan, images: Sequence[ImagePayload], rates: Sequence[float],
    limits: SweepLimits, show_progress: bool,
) -> list[SweepPoint]:
    """Each variant alone, one rate at a time: every variant runs a rate before any runs the next
    (so a slow drift in the machine's other load hits all variants alike); a variant leaves the
    sweep at its first step past a limit. Every step replays the same arrival times (same seed)."""
    points: list[SweepPoint] = []
    active = list(target.variants)
    for rate in rates:
        for variant in list(active):
            single = dataclasses.replace(target, variants=(variant,), experiment=None)
            # Enough requests for the whole step at this rate; --requests still caps it.
            step_plan = LoadPlan("open", min(plan.max_requests, math.ceil(rate * plan.duration_s * 2) + 10),
                                 plan.duration_s, rate_rps=rate, timeout_s=plan.timeout_s,
                                 max_connections=plan.max_connections, seed=plan.seed)
            step = run_report(single, step_plan, images, show_progress).total
            reason = stop_reason(step, limits)
            points.append(SweepPoint(variant, rate, step, reason))
            p99 = step.latency_ms["p99"]
            print(f"sweep {variant} @ {rate:.1f} req/s: ok {step.ok_rps:.1f}/s, "
                  f"p99 {'-' if p99 is None else f'{p99:.0f}'} ms, errors {step.sent - step.ok}"
                  f"{'  -> stop: ' + reason if reason else ''}", file=sys.stderr)
            if reason:
                active.remove(variant)
        if not active:
            break
    return points


def _needs(args: argparse.Namespace) -> list[tuple[tuple[str, ...], str, bool]]:
    """Flags that only act with another one: (their dests, what they need, whether it is given)."""
    return [
        (
            ("sweep_factor", "sweep_steps", "max_p99_ms", "max_error_rate", "min_goodput", "plot"),
            "--sweep",
            args.sweep,
        ),
        (("users", "user_header"), "--experiment", bool(args.experiment)),
        (("concurrency",), "--mode closed", args.mode == "closed"),
        (("rate",), "--mode open", args.mode == "open"),
    ]


def _refuse_ignored_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """A flag set away from its default that this run would not use is refused, not ignored: the
    user meant something that would not happen, and finding out after the run costs the run."""
    for dests, needed, present in _needs(args):
        for dest in dests:
            if not present and getattr(args, dest) != parser.get_default(dest):
                raise ValueError(f"--{dest.replace('_', '-')} only applies with {needed}")
    if args.sweep and args.experiment:
        raise ValueError("--sweep runs each --variant alone; it cannot use --experiment")


def _check_output(path: Path, flag: str) -> None:
    """Fail before the run, not after it: make the folder and check that the file can be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{flag} {path}: cannot create its folder ({error.strerror})") from None
    if path.is_dir() or not os.access(path if path.exists() else path.parent, os.W_OK):
        raise ValueError(f"{flag} {path}: cannot write this file")


def _variants(values: list[str] | None) -> tuple[str, ...]:
    names = [name.strip() for value in values or [] for name in value.split(",")]
    if any(not name for name in names):
        raise ValueError(f"empty variant name in {values}")
    return tuple(dict.fromkeys(names))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mame-load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (default: %(default)s)")
    p.add_argument("--model", help="model name (default: the server's default model; "
                   "--protocol v2 needs it)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="v1",
                   help="v1: POST /v1/classify; v2: Open Inference Protocol infer (default: %(default)s)")
    p.add_argument("--variant", action="append", metavar="NAME[,NAME...]",
                   help="variant(s) to request, drawn uniformly per request; repeat or comma-separate")
    p.add_argument("--experiment", help="experiment name: the server assigns variants by user key")
    p.add_argument(
        "--users", type=int, default=1000, help="distinct user keys for an experiment (default: %(default)s)"
    )
    p.add_argument(
        "--user-header", default="X-User-Id", help="header carrying the user key (default: %(default)s)"
    )
    p.add_argument("--images", type=Path, help="directory of images (default: bundled samples)")
    p.add_argument("--top-k", type=int, help="top_k query parameter")
    p.add_argument("--images-per-request", type=int, default=1,
                   help="images per request (several: one multipart request, answered as a list; the report "
                   "adds images/s)")
    p.add_argument(
        "--mode",
        choices=("open", "closed"),
        default="open",
        help="open: Poisson arrivals at --rate; closed: --concurrency workers (default: %(default)s)",
    )
    p.add_argument("--rate", type=float, default=10.0, help="open loop arrivals per second; sweep start rate")
    p.add_argument("--concurrency", type=int, default=8, help="closed loop workers (default: %(default)s)")
    p.add_argument("--requests", type=int, default=1000, help="most requests to send (per sweep step)")
    p.add_argument("--duration", type=float, default=30.0, help="most seconds of sending (per sweep step)")
    p.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds for each wait of a request: a pooled connection, connecting, sending, each read",
    )
    p.add_argument("--max-connections", type=int, default=1000,
                   help="client connection pool size (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed for arrivals, variants and users")
    p.add_argument("--wait-ready", type=float, default=0.0, metavar="SECONDS",
                   help="first wait up to this long for GET /readyz to answer 200")
    p.add_argument("--json", type=Path, help="also write the report (or the sweep) as JSON to this file")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    s = p.add_argument_group("sweep")
    s.add_argument("--sweep", action="store_true", help="step the open-loop rate up for each --variant")
    s.add_argument(
        "--sweep-factor", type=float, default=1.5, help="rate multiplier per step (default: %(default)s)"
    )
    s.add_argument(
        "--sweep-steps", type=int, default=12, help="most steps per variant (default: %(default)s)"
    )
    s.add_argument("--max-p99-ms", type=float, default=1000.0, help="stop limit on p99 latency")
    s.add_argument("--max-error-rate", type=float, default=0.01, help="stop limit on the error fraction")
    s.add_argument("--min-goodput", type=float, default=0.9,
                   help="stop when ok/s falls below this fraction of the sent rate (default: %(default)s)")
    s.add_argument(
        "--plot", type=Path, default=Path("sweep.png"), help="sweep plot PNG (default: %(default)s)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        target = Target(args.url, args.model, _variants(args.variant), args.experiment, args.users,
                        args.user_header, args.top_k, args.images_per_request, args.protocol)
        if not 1 <= args.images_per_request <= 32:
            raise ValueError(f"--images-per-request must be in 1..32 (the server's default limit), "
                             f"got {args.images_per_request}")
        if args.users < 1:
            raise ValueError(f"--users must be at least 1, got {args.users}")
        if args.top_k is not None and not 1 <= args.top_k <= 20:
            raise ValueError(f"--top-k must be in 1..20, got {args.top_k}")
        plan = LoadPlan(args.mode, args.requests, args.duration, args.rate if args.mode == "open" else None,
                        args.concurrency if args.mode == "closed" else None, args.timeout,
                        args.max_connections, args.seed)
        if args.sweep:
            if args.mode != "open":
                raise ValueError("--sweep steps the open-loop rate; it cannot run with --mode closed")
            if not target.variants:
                raise ValueError("--sweep runs each variant alone: name them with --variant")
            limits = SweepLimits(args.max_p99_ms, args.max_error_rate, args.min_goodput)
            rates = sweep_rates(args.rate, args.sweep_factor, args.sweep_steps)
        _refuse_ignored_flags(args, parser)
        if args.json:
            _check_output(args.json, "--json")
        if args.sweep:
            _check_output(args.plot, "--plot")
        images = load_images(args.images)
    except ValueError as error:
        parser.error(str(error))
    if args.wait_ready > 0:
        try:
            wait_ready(args.url, args.wait_ready)
        except RuntimeError as error:
            # The server is down or not ready: the same exit status as a run where nothing succeeded.
            print(f"mame-load: {error}", file=sys.stderr)
            return 1

    if args.sweep:
        points = run_sweep(target, plan, images, rates, limits, not args.quiet)
        print(format_saturation(saturation(points)))
        # The JSON first: a long sweep's figures must survive a plot that fails.
        if args.json:
            sweep = {
                "settings": {**settings(target, plan, images), "rates": rates},
                **sweep_to_dict(points, limits),
            }
            args.json.write_text(json.dumps(sweep, indent=2))
        plot_sweep(points, args.plot, f"{args.model or 'default model'}: latency vs throughput (open loop)")
        print(f"plot: {args.plot}")
        return 0 if any(p.step.ok for p in points) else 1

    report = run_report(target, plan, images, not args.quiet)
    print(format_table(report))
    if args.json:
        args.json.write_text(json.dumps(report.to_dict(), indent=2))
    # Nothing succeeded: most likely a wrong URL or a down server; let scripts notice.
    return 0 if report.total.ok else 1


if __name__ == "__main__":
    sys.exit(main())
