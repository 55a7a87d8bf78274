"""The engine's capacity: what one engine interpreter spends per request when it is the bottleneck.

  python -m loadtest.engine --images-per-request 1 --concurrency 64
  python -m loadtest.engine --images-per-request 1 --concurrency 64 --rate 500 --floor

The front-ends layout's engine process (its event loop, its feeding and receiving threads, its device
process) is built in this process from the same code as `python -m server`, on a nearly free ViT at 224 px.
A front-end process of its own sends it decoded requests over the real channel, the crops in its real
shared-memory arena, as server/frontend/app.py does. There is no HTTP client, no HTTP and no decoding: on
a small machine those take most of the cores, so the engine sees a trickle of small batches, and its CPU
per request then measures the cost of being woken for them. Here the engine is kept busy, as a fast GPU
keeps it: the figures are its capacity in requests per second of one interpreter.

With --rate, requests come at that rate instead (at most --concurrency in flight), as they come to the engine
of a server that its clients do not saturate; --floor measures, in the same run, what the same traffic costs
an event loop that answers each request at once on the same channel, with no engine behind it: the part of
the engine's CPU per request that no engine work can remove at that rate.

Every event loop here is the one the server's processes run on: uvicorn's choice (uvloop where installed).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import multiprocessing
import os
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import psutil

from loadtest.server_probes import batch_totals
from loadtest.serving import NEAR_FREE_KWARGS

T = TypeVar("T")

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


def run_on_server_loop(main: Coroutine[Any, Any, T]) -> T:
    """`main` run to its end on the event loop uvicorn gives the server and its front-ends (`loop="auto"`:
    uvloop where it is installed), so that the figures are those of the server's loop."""
    import uvicorn

    with asyncio.Runner(loop_factory=uvicorn.Config(app=None).get_loop_factory()) as runner:
        return runner.run(main)


def frontend(channel_path: str, images_per_request: int, concurrency: int, seconds: float,
             results: multiprocessing.Queue, rate: float = 0.0) -> None:
    """A front-end's traffic: `concurrency` decoded requests in flight (or `rate` requests per second, at
    most `concurrency` in flight) for a warm-up, then for `seconds`."""
    from server.frontend.arena import CropArena
    from server.wire.channel import Channel
    from server.wire.protocol import (
        FRONTEND_CROPS_AT,
        FRONTEND_IMAGES,
        FRONTEND_MODEL,
        FRONTEND_MULTIPART,
        FRONTEND_STARTED,
        request_head,
    )

    async def run() -> None:
        channel = Channel(channel_path)
        arena = CropArena("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir(),
                          3 * EDGE * EDGE, concurrency * images_per_request)
        multipart = "1" if images_per_request > 1 else "0"
        answered = 0

        async def request() -> None:
            nonlocal answered
            slots = arena.take(images_per_request)
            at = " ".join([arena.path, *(str(slot * arena.slot_bytes) for slot in slots)])
            head = request_head("", [(name.encode(), value.encode()) for name, value in (
                ("user-agent", "loadtest.engine"), (FRONTEND_STARTED, repr(time.monotonic())),
                (FRONTEND_IMAGES, str(images_per_request)), (FRONTEND_CROPS_AT, at),
                (FRONTEND_MODEL, "bench"), (FRONTEND_MULTIPART, multipart))])
            try:
                answer, body = await channel.call(head)
            finally:
                arena.give_back(slots)
            if answer["status"] != 200:
                raise RuntimeError(f"the engine answered {answer['status']}: {body[:200]!r}")
            answered += 1

        async def client(until: float) -> None:
            while time.monotonic() < until:
                await request()

        async def paced(until: float) -> None:
            """`rate` requests a second (those due while `concurrency` are in flight are skipped)."""
            started, due_so_far, in_flight = time.monotonic(), 0, set()
            while (now := time.monotonic()) < until:
                due = int((now - started) * rate) - due_so_far
                due_so_far += due
                for _ in range(min(due, concurrency - len(in_flight))):
                    task = asyncio.create_task(request())
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                await asyncio.sleep(1 / rate)
            await asyncio.gather(*in_flight)

        async def traffic(until: float) -> None:
            if rate:
                await paced(until)
            else:
                await asyncio.gather(*(client(until) for _ in range(concurrency)))

        try:
            await traffic(time.monotonic() + 1.0)
            results.put("warm")
            answered, started = 0, time.monotonic()
            await traffic(started + seconds)
            results.put((answered, time.monotonic() - started))
        finally:
            arena.close()
            await channel.close()

    run_on_server_loop(run())


async def _drive(handler, images_per_request: int, concurrency: int, seconds: float, rate: float,
                 sample: Callable[[], Any] = lambda: None) -> tuple[int, float, dict[str, float], Any, Any]:
    """Serve a front-end process's traffic on a channel with `handler`: the requests answered in the
    measured window, its length, the CPU each thread of this process spent in it, and `sample()` at its
    start and at its end."""
    from server.wire import channel

    spawn = multiprocessing.get_context("spawn")
    results = spawn.Queue()
    loop = asyncio.get_running_loop()
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "engine.sock")
        server = await channel.serve(path, handler)
        sender = spawn.Process(target=frontend,
                               args=(path, images_per_request, concurrency, seconds, results, rate))
        sender.start()
        try:
            if await loop.run_in_executor(None, results.get, True, 300) != "warm":
                raise RuntimeError("the front-end did not warm up")
            first = sample()
            before = thread_cpu_ms()
            requests, seconds_measured = await loop.run_in_executor(None, results.get, True, seconds + 300)
            after = thread_cpu_ms()
            last = sample()
        finally:
            await loop.run_in_executor(None, sender.join, 30)
            # the front-end has gone: its connection's handler ends on the end of the stream
            handlers = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            if handlers:
                await asyncio.wait(handlers, timeout=5)
            server.close()
    spent = {name: ms - before.get(name, 0.0) for name, ms in after.items()}
    return requests, seconds_measured, {name: ms for name, ms in spent.items() if ms >= 1.0}, first, last


def measure_floor(images_per_request: int, concurrency: int, seconds: float, rate: float = 0.0) -> float:
    """CPU milliseconds per request of an event loop that answers each request of the same traffic at once,
    on the same channel, with no engine behind it."""

    def answer_at_once(head, body, reply):
        reply({"status": 200, "headers": []}, b"")

    async def serve() -> float:
        requests, _, spent, *_ = await _drive(answer_at_once, images_per_request, concurrency, seconds, rate)
        return sum(spent.values()) / max(1, requests)

    return run_on_server_loop(serve())


def measure(images_per_request: int, concurrency: int, seconds: float, batch: int = 64,
            max_wait_ms: float = 5.0, torch_threads: int = 1, rate: float = 0.0) -> EngineFigures:
    from server.engine.metrics import Metrics
    from server.engine.service import InferenceService
    from server.http.app import build_engine, channel_request, collector_for_serving

    config = engine_config(batch, max_wait_ms)
    metrics = Metrics()
    service = InferenceService(config, metrics, torch_threads=torch_threads, device_processes=True)
    service.start()
    if not service.ready.wait(300):
        raise RuntimeError(f"the engine did not load: {service.failed}")
    engine = build_engine(config, service, preprocess_threads=1)
    collector_for_serving()  # as the server does before it serves

    async def serve() -> EngineFigures:
        requests, seconds_measured, spent, first, last = await _drive(
            functools.partial(channel_request, engine), images_per_request, concurrency, seconds, rate,
            sample=lambda: batch_totals(metrics.batch_size.collect()))
        images, batches = (a - b for a, b in zip(last, first))
        return EngineFigures(requests, images_per_request, seconds_measured, spent, images / max(1, batches))

    try:
        return run_on_server_loop(serve())
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
    parser.add_argument("--rate", type=float, default=0.0,
                        help="requests per second (0: as many as the engine answers)")
    parser.add_argument("--floor", action="store_true",
                        help="also measure the same traffic answered at once by a bare event loop")
    args = parser.parse_args(argv)
    figures = measure(args.images_per_request, args.concurrency, args.seconds, args.batch, args.max_wait_ms,
                      rate=args.rate)
    print(figures.report())
    if args.floor:
        floor = measure_floor(args.images_per_request, args.concurrency, args.seconds, args.rate)
        print(f"bare channel: {floor:.3f} ms CPU per request answered at once with no engine, the same "
              f"traffic; the engine spends {figures.cpu_ms_per_request / floor:.2f}x that, "
              f"{figures.cpu_ms_per_request - floor:.3f} ms per request above it")


if __name__ == "__main__":
    main()
