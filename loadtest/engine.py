"""The engine's capacity: what one engine interpreter spends per request when it is the bottleneck.

  python -m loadtest.engine --images-per-request 1 --concurrency 64

The front-ends layout's engine process (its event loop, its feeding and receiving threads, its device
process) is built in this process from the same code as `python -m server`, on a nearly free ViT at 224 px.
A front-end process of its own sends it decoded requests over the real channel, the crops in its real
shared-memory arena, as server/frontend/app.py does. There is no HTTP client, no HTTP and no decoding: on
a small machine those take most of the cores, so the engine sees a trickle of small batches, and its CPU
per request then measures the cost of being woken for them. Here the engine is kept busy, as a fast GPU
keeps it: the figures are its capacity in requests per second of one interpreter.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import tempfile
import threading
import time
from dataclasses import dataclass

import psutil

from loadtest.server_probes import batch_totals
from loadtest.serving import NEAR_FREE_KWARGS

EDGE = NEAR_FREE_KWARGS["img_size"]


@dataclass(frozen=True)
class EngineFigures:
    requests: int
    images_per_request: int
    seconds: float
    cpu_ms_by_thread: dict[str, float]  # CPU milliseconds of each engine thread over the window
    mean_batch: float

    @property
    def cpu_ms_per_request(self) -> float:
        return sum(self.cpu_ms_by_thread.values()) / self.requests

    def report(self) -> str:
        per_request = self.cpu_ms_per_request
        lines = [
            (f"engine alone: {self.requests} requests of {self.images_per_request} image(s) in "
             f"{self.seconds:.1f} s ({self.requests / self.seconds:.0f} requests/s), mean batch "
             f"{self.mean_batch:.1f} images"),
            (f"  engine CPU   {per_request:.3f} ms per request, "
             f"{per_request / self.images_per_request:.3f} ms per image "
             f"(~{1000 / per_request:.0f} requests/s at most in one interpreter)"),
        ]
        lines += [f"    {name:14s} {ms / self.requests:.3f} ms per request"
                  for name, ms in sorted(self.cpu_ms_by_thread.items(), key=lambda kv: -kv[1])]
        return "\n".join(lines)


def engine_config(batch: int, max_wait_ms: float):
    from server.config import ServingConfig

    return ServingConfig.model_validate({
        "models": {"bench": {
            "arch": "vit_tiny_patch16_224", "model_kwargs": NEAR_FREE_KWARGS, "weights": "random",
            "device": "cpu", "variants": {"baseline": {"method": "none"}},
            "batching": {"max_batch_size": batch, "max_wait_ms": max_wait_ms, "max_queue": 4096},
        }},
        "limits": {"request_timeout_s": 120},
    })


def thread_cpu_ms() -> dict[str, float]:
    """CPU milliseconds of each thread of this process, by thread name."""
    names = {thread.native_id: thread.name for thread in threading.enumerate()}
    return {names.get(t.id, f"thread {t.id}"): 1000 * (t.user_time + t.system_time)
            for t in psutil.Process().threads()}


def frontend(channel_path: str, images_per_request: int, concurrency: int, seconds: float,
             results: multiprocessing.Queue) -> None:
    """A front-end's traffic: `concurrency` decoded requests in flight for a warm-up, then for `seconds`."""
    from server.frontend.arena import CropArena
    from server.wire.channel import Channel
    from server.wire.protocol import (
        FRONTEND_CROPS_AT,
        FRONTEND_IMAGES,
        FRONTEND_MODEL,
        FRONTEND_MULTIPART,
        FRONTEND_STARTED,
    )

    async def run() -> None:
        channel = Channel(channel_path)
        arena = CropArena("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir(),
                          3 * EDGE * EDGE, concurrency * images_per_request)
        multipart = "1" if images_per_request > 1 else "0"
        answered = 0

        async def client(until: float) -> None:
            nonlocal answered
            while time.monotonic() < until:
                slots = arena.take(images_per_request)
                at = " ".join([arena.path, *(str(slot * arena.slot_bytes) for slot in slots)])
                head = {"query": "", "headers": [
                    ["user-agent", "loadtest.engine"], [FRONTEND_STARTED, repr(time.monotonic())],
                    [FRONTEND_IMAGES, str(images_per_request)], [FRONTEND_CROPS_AT, at],
                    [FRONTEND_MODEL, "bench"], [FRONTEND_MULTIPART, multipart]]}
                try:
                    answer, body = await channel.call(head)
                finally:
                    arena.give_back(slots)
                if answer["status"] != 200:
                    raise RuntimeError(f"the engine answered {answer['status']}: {body[:200]!r}")
                answered += 1

        try:
            await asyncio.gather(*(client(time.monotonic() + 1.0) for _ in range(concurrency)))
            results.put("warm")
            answered, started = 0, time.monotonic()
            await asyncio.gather(*(client(started + seconds) for _ in range(concurrency)))
            results.put((answered, time.monotonic() - started))
        finally:
            arena.close()
            await channel.close()

    asyncio.run(run())


def measure(images_per_request: int, concurrency: int, seconds: float, batch: int = 64,
            max_wait_ms: float = 5.0, torch_threads: int = 1) -> EngineFigures:
    from server.engine.metrics import Metrics
    from server.engine.service import InferenceService
    from server.http.app import build_engine, channel_request
    from server.wire import channel

    config = engine_config(batch, max_wait_ms)
    metrics = Metrics()
    service = InferenceService(config, metrics, torch_threads=torch_threads, device_processes=True)
    service.start()
    if not service.ready.wait(300):
        raise RuntimeError(f"the engine did not load: {service.failed}")
    engine = build_engine(config, service, preprocess_threads=1)
    spawn = multiprocessing.get_context("spawn")
    results = spawn.Queue()

    async def serve() -> EngineFigures:
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "engine.sock")
            server = await channel.serve(path, lambda head, body: channel_request(engine, head, body))
            sender = spawn.Process(target=frontend,
                                   args=(path, images_per_request, concurrency, seconds, results))
            sender.start()
            loop = asyncio.get_running_loop()
            try:
                if await loop.run_in_executor(None, results.get, True, 300) != "warm":
                    raise RuntimeError("the front-end did not warm up")
                batches_before = batch_totals(metrics.batch_size.collect())
                before = thread_cpu_ms()
                requests, window = await loop.run_in_executor(None, results.get, True, seconds + 300)
                after = thread_cpu_ms()
                batches_after = batch_totals(metrics.batch_size.collect())
            finally:
                await loop.run_in_executor(None, sender.join, 30)
                # the front-end has gone: its connection's handler ends on the end of the stream
                handlers = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
                if handlers:
                    await asyncio.wait(handlers, timeout=5)
                server.close()
        spent = {name: ms - before.get(name, 0.0) for name, ms in after.items()}
        images, batches = (a - b for a, b in zip(batches_after, batches_before))
        return EngineFigures(requests, images_per_request, window,
                             {name: ms for name, ms in spent.items() if ms >= 1.0}, images / max(1, batches))

    try:
        return asyncio.run(serve())
    finally:
        service.stop()
        engine.pool.shutdown()
        if engine.large_pool is not None:
            engine.large_pool.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images-per-request", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    parser.add_argument("--seconds", type=float, default=5.0, help="the measured window")
    parser.add_argument("--batch", type=int, default=64, help="max_batch_size")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    args = parser.parse_args(argv)
    figures = measure(args.images_per_request, args.concurrency, args.seconds, args.batch, args.max_wait_ms)
    print(figures.report())


if __name__ == "__main__":
    main()
