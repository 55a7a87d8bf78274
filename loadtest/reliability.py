"""The reliability benchmark: a real `python -m server` with a tiny ViT on loopback, under floods and faults.

    python -m loadtest.reliability                      # about two minutes, every part
    python -m loadtest.reliability --only faults --faults 10

It prints, side by side: memory (RSS of the server and its children) warm, at the peak and after a flood of
PNGs at the pixel limit with a trickle of small requests (the trickle's p99 against its latency alone, its
504s, and a lone image at the pixel limit); the 503 rate of a trickle to one variant while another variant
is flooded; seconds from a device stall to `/readyz` 503 and to being ready again; and accepted requests
left without an answer over device-process kills and SIGTERMs under load, per layout. Figures only, no
pass/fail: docs/loadtest.md says what each means, docs/benchmarks.md holds measured ones.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import re
import signal
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
from PIL import Image

from loadtest.launch import REPO_ROOT, running_server

_server_root = REPO_ROOT  # the checkout whose server runs (--root)


def serve(config: dict, args: list[str]):
    return running_server(config, args=args, root=_server_root)

TINY_MODEL = {
    "arch": "vit_tiny_patch16_224",
    "model_kwargs": {"img_size": 64, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 2},
    "weights": "random",
    "device": "cpu",
    "dtype": "float32",
    "variants": {"a": {"method": "none"}, "b": {"method": "mame", "tau": 0.9, "blocks": 3}},
    "batching": {"max_batch_size": 16, "max_wait_ms": 10, "max_queue": 64},
}
# A full batch of 32 takes seconds on one core, one image tens of milliseconds: past a watchdog of 0.8 s,
# a real stall of the forward thread in the one-process layout (nothing else can stop a thread).
SLOW_BATCH_KWARGS = {"img_size": 64, "patch_size": 2, "embed_dim": 64, "depth": 4, "num_heads": 2}
LAYOUTS = {"single": ["--layout", "single"], "frontends": ["--layout", "frontends", "--http-processes", "1"]}


def serving_config(model: dict | None = None, **top: object) -> dict:
    return {"models": {"tiny": copy.deepcopy(model or TINY_MODEL)}, **top}


def png(side: int, color: tuple[int, int, int] = (90, 140, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), color).save(buffer, "PNG")
    return buffer.getvalue()


def small_png() -> bytes:
    image = Image.effect_noise((96, 96), 60).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def rss_mib(pid: int) -> float:
    process = psutil.Process(pid)
    total = process.memory_info().rss
    for child in process.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) >= 2 else (values[0] if values else 0.0)


def trickle(url: str, data: bytes, until: Callable[[], bool], interval_s: float, params: dict | None = None
            ) -> list[tuple[int, float]]:
    """(status, seconds) of requests sent one at a time every interval_s until `until()`."""
    outcomes = []
    with httpx.Client(timeout=60) as client:
        while not until():
            started = time.monotonic()
            status = client.post(f"{url}/v1/classify", content=data, params=params or {},
                                 headers={"content-type": "image/png"}).status_code
            outcomes.append((status, time.monotonic() - started))
            time.sleep(max(0.0, interval_s - (time.monotonic() - started)))
    return outcomes


def flood(url: str, data: bytes, clients: int, seconds: float, params: dict | None = None) -> list[int]:
    """Statuses of `clients` threads posting `data` back to back for `seconds`."""
    end = time.monotonic() + seconds

    def one() -> list[int]:
        statuses = []
        with httpx.Client(timeout=60) as client:
            while time.monotonic() < end:
                try:
                    statuses.append(client.post(f"{url}/v1/classify", content=data, params=params or {},
                                                headers={"content-type": "image/png"}).status_code)
                except httpx.TransportError:
                    statuses.append(0)
        return statuses

    with ThreadPoolExecutor(clients) as pool:
        return [status for statuses in pool.map(lambda _: one(), range(clients)) for status in statuses]


def memory_under_flood(layout: str, max_pixels: int, clients: int, seconds: float) -> dict:
    side = int(max_pixels ** 0.5)
    big, small = png(side), small_png()
    config = serving_config(limits={"max_pixels": max_pixels, "request_timeout_s": 10})
    with serve(config, LAYOUTS[layout]) as server:
        alone_end = time.monotonic() + seconds  # as long as the flood: as many samples for either p99
        alone = trickle(server.url, small, lambda: time.monotonic() > alone_end, 0.1)
        warm = rss_mib(server.proc.pid)
        peak, flooding = warm, True

        def sample() -> None:
            nonlocal peak
            while flooding:
                peak = max(peak, rss_mib(server.proc.pid))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample)
        sampler.start()
        with ThreadPoolExecutor(1) as pool:
            flooded = pool.submit(flood, server.url, big, clients, seconds)
            under = trickle(server.url, small, flooded.done, 0.1)
            statuses = flooded.result()
        flooding = False
        sampler.join()
        time.sleep(2)
        after = rss_mib(server.proc.pid)
        lone = httpx.post(f"{server.url}/v1/classify", content=big, headers={"content-type": "image/png"},
                          timeout=60).status_code
    under_ok = [s for status, s in under if status == 200]
    return {
        "layout": layout, "image_px": side * side, "png_bytes": len(big), "flood_requests": len(statuses),
        "flood_statuses": dict(sorted(_counts(statuses).items())),
        "rss_warm_mib": round(warm), "rss_peak_mib": round(peak), "rss_after_mib": round(after),
        "trickle_alone_p99_ms": round(p99([s for _, s in alone]) * 1000, 1),
        "trickle_under_flood_p99_ms": round(p99(under_ok) * 1000, 1),
        "trickle_ratio": round(p99(under_ok) / max(1e-9, p99([s for _, s in alone])), 2),
        "trickle_statuses": dict(sorted(_counts([status for status, _ in under]).items())),
        "lone_image_at_limit": lone,
    }


def variant_fairness(layout: str, clients: int, seconds: float) -> dict:
    small = small_png()
    model = copy.deepcopy(TINY_MODEL)
    model["batching"] = {"max_batch_size": 4, "max_wait_ms": 10, "max_queue": 8}
    with serve(serving_config(model), LAYOUTS[layout]) as server, ThreadPoolExecutor(1) as pool:
        flooded = pool.submit(flood, server.url, small, clients, seconds, {"variant": "a"})
        quiet = trickle(server.url, small, flooded.done, 0.05, {"variant": "b"})
        loud = flooded.result()
    statuses = [status for status, _ in quiet]
    return {"layout": layout, "flooded_variant_503_rate": round(loud.count(503) / max(1, len(loud)), 3),
            "trickle_requests": len(statuses),
            "trickle_variant_503_rate": round(statuses.count(503) / max(1, len(statuses)), 3)}


def wait_status(url: str, status: int, timeout_s: float) -> float | None:
    """Seconds until /readyz answers `status` (None: not within timeout_s, or the server stopped listening).
    A probe that times out (a loaded machine) is sent again."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == status:
                return time.monotonic() - started
        except httpx.TimeoutException:
            continue
        except httpx.TransportError:
            return None
        time.sleep(0.02)
    return None


def device_process(pid: int) -> psutil.Process:
    for child in psutil.Process(pid).children():
        cmdline = " ".join(child.cmdline())
        if "multiprocessing" in cmdline and "resource_tracker" not in cmdline:
            return child
    raise LookupError("no device process")


def stall_frontends(stall_s: float) -> dict:
    """SIGSTOP the device process: seconds to /readyz 503, and until a server started again (as its
    supervisor would, once it has exited with status 1) is ready."""
    config = serving_config(health={"device_stall_s": stall_s})
    small = small_png()
    with serve(config, LAYOUTS["frontends"]) as server:
        httpx.post(f"{server.url}/v1/classify", content=small, timeout=30)
        device = device_process(server.proc.pid)
        held: list[int] = []
        device.suspend()
        stopped_at = time.monotonic()
        sender = threading.Thread(target=lambda: held.append(httpx.post(
            f"{server.url}/v1/classify", content=small, timeout=60).status_code))
        sender.start()
        to_503 = wait_status(server.url, 503, stall_s + 30)
        sender.join(60)
        code = server.proc.wait(timeout=60)
    with serve(config, LAYOUTS["frontends"]) as _restarted:
        recovered = time.monotonic() - stopped_at
    return {"layout": "frontends", "stall_s": stall_s, "to_readyz_503_s": _round(to_503),
            "held_request": held[0] if held else None, "exit_status": code,
            "to_ready_after_restart_s": round(recovered, 2)}


def stall_single(stall_s: float) -> dict:
    """A batch whose forward runs past the stall time (the forward thread cannot be stopped otherwise):
    seconds from sending it to /readyz 503, and to ready again."""
    model = copy.deepcopy(TINY_MODEL)
    model["model_kwargs"] = SLOW_BATCH_KWARGS
    model["batching"] = {"max_batch_size": 32, "max_wait_ms": 300, "max_queue": 64}
    small = small_png()
    files = [("file", (f"{i}.png", small, "image/png")) for i in range(32)]
    config = serving_config(model, health={"device_stall_s": stall_s})
    with serve(config, [*LAYOUTS["single"], "--torch-threads", "1", "--no-warmup"]) as server:
        httpx.post(f"{server.url}/v1/classify", content=small, timeout=30)
        answer: list[int] = []
        sender = threading.Thread(target=lambda: answer.append(httpx.post(
            f"{server.url}/v1/classify", files=files, timeout=60).status_code))
        sender.start()
        to_503 = wait_status(server.url, 503, 60)
        to_200 = wait_status(server.url, 200, 60)
        sender.join(60)
    return {"layout": "single", "stall_s": stall_s, "to_readyz_503_s": _round(to_503),
            "held_request": answer[0] if answer else None,
            "to_ready_again_s": _round(None if to_503 is None or to_200 is None else to_503 + to_200),
            "note": "from sending a 32-image batch whose forward outlasts the stall time"}


def fault_under_load(layout: str, fault: str, clients: int, load_s: float) -> dict:
    """Keep-alive clients post with request ids; after load_s the fault (SIGKILL of the device process, or
    SIGTERM of the server). Accepted (the server's debug log) but never answered: the figure that must be
    0."""
    small = small_png()
    model = copy.deepcopy(TINY_MODEL)
    model["batching"] = {"max_batch_size": 4, "max_wait_ms": 20, "max_queue": 1000}
    answered: set[str] = set()
    failures: dict[str, int] = {}
    stop = threading.Event()

    def client(n: int, url: str) -> None:
        with httpx.Client(timeout=60) as session:
            i = 0
            while not stop.is_set():
                request_id = f"req-{n}-{i}"
                i += 1
                try:
                    session.post(f"{url}/v1/classify", content=small,
                                 headers={"content-type": "image/png", "x-request-id": request_id})
                    answered.add(request_id)
                except httpx.TransportError as exc:
                    failures[type(exc).__name__] = failures.get(type(exc).__name__, 0) + 1
                    time.sleep(0.05)

    with serve(serving_config(model), [*LAYOUTS[layout], "--log-level", "debug"]) as server:
        threads = [threading.Thread(target=client, args=(n, server.url)) for n in range(clients)]
        for thread in threads:
            thread.start()
        time.sleep(load_s)
        if fault == "device kill":
            device_process(server.proc.pid).kill()
        else:
            server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(timeout=120)
        stop.set()
        for thread in threads:
            thread.join(60)
        log = server.log()
    accepted = set(re.findall(r"request (req-\d+-\d+) accepted", log))
    return {"accepted": len(accepted), "unanswered": len(accepted - answered), "exit_status": code,
            "client_errors": failures}


def faults(layouts: list[str], runs: int, clients: int, load_s: float) -> list[dict]:
    rows = []
    for layout in layouts:
        kinds = ["SIGTERM"] + (["device kill"] if layout == "frontends" else [])
        for kind in kinds:
            results = [fault_under_load(layout, kind, clients, load_s) for _ in range(runs)]
            rows.append({"layout": layout, "fault": kind, "runs": runs,
                         "accepted": sum(r["accepted"] for r in results),
                         "accepted_unanswered": sum(r["unanswered"] for r in results),
                         "exit_statuses": sorted({r["exit_status"] for r in results}),
                         "client_errors": _merge([r["client_errors"] for r in results])})
    return rows


def _counts(values: list) -> dict:
    counts: dict = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


def _merge(dicts: list[dict]) -> dict:
    merged: dict = {}
    for d in dicts:
        for key, value in d.items():
            merged[key] = merged.get(key, 0) + value
    return merged


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["memory", "fairness", "stall", "faults"], action="append",
                        help="run only these parts (repeatable; default: all)")
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument("--max-pixels", type=int, default=8_000_000, help="limits.max_pixels of the flood")
    parser.add_argument("--flood-clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each flood")
    parser.add_argument("--stall-s", type=float, default=1.0, help="health.device_stall_s")
    parser.add_argument("--faults", type=int, default=1, help="runs of each fault per layout")
    parser.add_argument("--fault-clients", type=int, default=8, help="keep-alive clients during a fault")
    parser.add_argument("--load-s", type=float, default=1.5, help="seconds of load before a fault")
    parser.add_argument("--root", type=Path, default=REPO_ROOT,
                        help="the checkout whose server runs (another one: its figures, measured alike)")
    args = parser.parse_args(argv)
    global _server_root
    _server_root = args.root
    parts = set(args.only or ["memory", "fairness", "stall", "faults"])
    results: dict[str, object] = {}
    if "memory" in parts:
        results["memory_under_flood"] = [memory_under_flood(layout, args.max_pixels, args.flood_clients,
                                                            args.seconds) for layout in args.layouts]
    if "fairness" in parts:
        results["variant_fairness"] = [variant_fairness(layout, 4 * args.flood_clients, args.seconds)
                                       for layout in args.layouts]
    if "stall" in parts:
        results["device_stall"] = [stall_single(args.stall_s) if layout == "single"
                                   else stall_frontends(args.stall_s) for layout in args.layouts]
    if "faults" in parts:
        results["faults_under_load"] = faults(args.layouts, args.faults, args.fault_clients, args.load_s)
    for part, rows in results.items():
        print(f"== {part}")
        for row in rows:
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
