"""Admission under floods, side by side for two checkouts of the server (`python -m loadtest.admission`):

- a variant flood: 128 clients send one variant as fast as they can while 4 clients send a trickle of
  another variant; each variant's share of 503 answers;
- a pixel flood: clients send PNGs of 36 Mpx (16-bit, 70 KB each) while a trickle of ordinary requests
  goes on; the server's memory (RSS of its processes together) warm, at its peak and after, the trickle's
  p99 against its p99 alone and its 504s, and whether a lone image at the pixel limit is answered 200.

`--before PATH` runs the same measurements against another checkout first (e.g. a `git worktree` of the
previous commit), so the figures are side by side in one run on the same machine. Loopback, tiny ViT.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil
from PIL import Image

from loadtest.launch import REPO_ROOT, running_server

TINY = {"arch": "vit_tiny_patch16_224", "weights": "random", "device": "cpu", "dtype": "float32",
        "model_kwargs": {"img_size": 64, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 2}}
VARIANTS = {"flood": {"method": "none"}, "trickle": {"method": "mame", "tau": 0.5, "blocks": 3}}
MAX_PIXELS = 40_000_000  # the default limits.max_pixels


def config(max_queue: int) -> dict:
    return {"models": {"tiny": {**TINY, "variants": VARIANTS, "default_variant": "trickle",
                                "batching": {"max_batch_size": 8, "max_wait_ms": 5, "max_queue": max_queue}}}}


def png(width: int, height: int, mode: str = "RGB", colour: int | tuple = 0) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), colour).save(buffer, "PNG")
    return buffer.getvalue()


SMALL = png(96, 96, colour=(90, 140, 200))


def rss_bytes(pid: int) -> int:
    """RSS of the server process and its children (front-ends, device processes) together."""
    process = psutil.Process(pid)
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


async def loop_sending(client: httpx.AsyncClient, url: str, data: bytes, params: dict, until: float,
                       pause_s: float, results: list[tuple[int, float]]) -> None:
    while time.monotonic() < until:
        started = time.monotonic()
        try:
            response = await client.post(f"{url}/v1/classify", params=params, content=data,
                                         headers={"content-type": "image/png"})
            status = response.status_code
        except httpx.HTTPError:
            status = 0
        results.append((status, time.monotonic() - started))
        await asyncio.sleep(pause_s)


def share(results: list[tuple[int, float]], status: int) -> float:
    return sum(1 for s, _ in results if s == status) / max(1, len(results))


def p99_ms(results: list[tuple[int, float]]) -> float:
    latencies = sorted(t for s, t in results if s == 200)
    if not latencies:
        return float("nan")
    return latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000


async def variant_flood(url: str, seconds: float, clients: int) -> dict:
    flood: list = []
    trickle: list = []
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        until = time.monotonic() + seconds
        await asyncio.gather(
            *(loop_sending(client, url, SMALL, {"variant": "flood"}, until, 0.0, flood)
              for _ in range(clients)),
            *(loop_sending(client, url, SMALL, {"variant": "trickle"}, until, 0.05, trickle)
              for _ in range(4)))
    return {"flooded variant requests": len(flood), "flooded variant 503 rate": share(flood, 503),
            "trickle variant requests": len(trickle), "trickle variant 503 rate": share(trickle, 503),
            "trickle variant statuses": dict(Counter(s for s, _ in trickle))}


async def pixel_flood(url: str, pid: int, seconds: float, clients: int) -> dict:
    big = png(6000, 6000, "I;16")  # 36 Mpx, under the 40 Mpx limit
    at_limit = png(6324, 6324, "L")  # 39.99 Mpx
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=clients + 4)) as client:
        alone: list = []  # as long as the flood: as many samples for either p99
        await loop_sending(client, url, SMALL, {}, time.monotonic() + seconds, 0.1, alone)
        warm = rss_bytes(pid)
        peak = [warm]
        trickle: list = []
        flood: list = []

        async def sample(until: float) -> None:
            while time.monotonic() < until:
                peak[0] = max(peak[0], rss_bytes(pid))
                await asyncio.sleep(0.05)

        until = time.monotonic() + seconds
        await asyncio.gather(
            *(loop_sending(client, url, big, {}, until, 0.0, flood) for _ in range(clients)),
            loop_sending(client, url, SMALL, {}, until, 0.1, trickle), sample(until + 1.0))
        await asyncio.sleep(3.0)
        after = rss_bytes(pid)
        lone = await client.post(f"{url}/v1/classify", content=at_limit,
                                 headers={"content-type": "image/png"})
    mib = 1 << 20
    return {"RSS warm MiB": warm / mib, "RSS peak MiB": peak[0] / mib, "RSS after MiB": after / mib,
            "peak growth MiB": (peak[0] - warm) / mib,
            "36 Mpx PNG statuses": dict(Counter(s for s, _ in flood)),
            "small p99 ms alone": p99_ms(alone), "small p99 ms in the flood": p99_ms(trickle),
            "small p99 in the flood / alone": p99_ms(trickle) / p99_ms(alone),
            "small statuses in the flood": dict(Counter(s for s, _ in trickle)),
            "lone image at the limit": lone.status_code}


def measure(root: Path, layout: str, seconds: float, parts: set[str]) -> dict:
    args = ["--layout", layout, *(["--http-processes", "1"] if layout == "frontends" else [])]
    figures: dict = {}
    if "variants" in parts:
        with running_server(config(max_queue=32), args=args, root=root) as server:
            figures.update(asyncio.run(variant_flood(server.url, seconds, clients=128)))  # 4x the queue
    if "pixels" in parts:
        with running_server(config(max_queue=256), args=args, root=root) as server:
            figures.update(asyncio.run(pixel_flood(server.url, server.proc.pid, seconds, clients=4)))
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, help="another checkout, measured first for comparison")
    parser.add_argument("--layout", choices=["single", "frontends"], default="single")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each flood")
    parser.add_argument("--only", choices=["variants", "pixels"], action="append",
                        help="run only this flood (repeatable; default: both)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure the checkouts this many times, alternating (noisy machines)")
    args = parser.parse_args(argv)
    parts = set(args.only or ["variants", "pixels"])
    checkouts = {**({"before": args.before} if args.before else {}), "this checkout": REPO_ROOT}
    runs = {f"{name} #{n + 1}" if args.rounds > 1 else name: root
            for n in range(args.rounds) for name, root in checkouts.items()}
    figures = {name: measure(root, args.layout, args.seconds, parts) for name, root in runs.items()}
    names = list(figures)
    print(f"layout {args.layout}, floods of {args.seconds:g} s; "
          + ", ".join(f"{name}: {root}" for name, root in checkouts.items()))
    for key in figures[names[0]]:
        cells = []
        for name in names:
            value = figures[name][key]
            cells.append(f"{value:.3f}" if isinstance(value, float) else str(value))
        print(f"{key:>28}: " + " | ".join(f"{cell:>28}" for cell in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
