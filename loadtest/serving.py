"""Serving benchmarks: printed ratios, never timed assertions.

  python -m loadtest.serving throughput  # served img/s at saturation / offline img/s, same batch size
  python -m loadtest.serving latency     # median latency the server adds over a direct model call
  python -m loadtest.serving memory      # resident memory of the server after warm-up (default config)
  python -m loadtest.serving soak        # resident memory growth over a 10,000-request soak (tiny ViT)

Each starts a real `python -m server` process on loopback next to the measurement, on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pickle
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import timm
import torch
from prometheus_client.parser import text_string_to_metric_families

from loadtest.launch import running_server
from loadtest.server_probes import (
    CHILD_KINDS,
    batch_totals,
    cpu_seconds,
    gil_profile,
    gpu_memory_mib,
    process_tree,
    py_spy,
    summarise_gil_profile,
    tree_rss,
)
from loadtest.serving_client import ClientOutcome, client_window
from mame_core import MergeSettings
from server.decode.imaging import decode_image
from server.decode.transforms import HostTransform, preprocessing
from server.engine.devices import DeviceModel, place_model, resolve_devices, resolve_dtype
from server.engine.worker import infer, stack_batch

TINY_KWARGS = {"img_size": 64, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 2}
# A nearly free model with the full 224 px input: the served figure is then the host path's capacity
# (HTTP, decoding, preprocessing, batching, answering), which is what limits a fast GPU.
NEAR_FREE_KWARGS = {"img_size": 224, "patch_size": 32, "embed_dim": 16, "depth": 1, "num_heads": 1}


def sample_bytes(edge: int = 0) -> list[bytes]:
    """The photographs bundled with mame_core (300-512 px) as the files a client would send; with `edge`,
    re-encoded (JPEG quality 90) with the shorter side at `edge` px, as clients that resize before sending
    do."""
    import io

    from PIL import Image

    from mame_core.images import sample_images

    if not edge:
        return [path.read_bytes() for path in sample_images()]
    files = []
    for path in sample_images():
        with Image.open(path) as image:
            scale = edge / min(image.size)
            resized = image.convert("RGB").resize((round(image.width * scale), round(image.height * scale)),
                                                  Image.Resampling.BICUBIC)
        out = io.BytesIO()
        resized.save(out, "JPEG", quality=90)
        files.append(out.getvalue())
    return files


def request_bodies(data: list[bytes], images_per_request: int) -> list[tuple[bytes, str]]:
    """(body, content type) of each request the load cycles through: the raw JPEG for one image per request,
    a multipart body of `images_per_request` files otherwise. Encoded once: the client costs little per
    request."""
    if images_per_request == 1:
        return [(d, "image/jpeg") for d in data]
    boundary = "mame-bench-boundary"
    bodies = []
    for first in range(len(data)):
        parts = [
            b'--%s\r\nContent-Disposition: form-data; name="file"; filename="%d.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n%s\r\n" % (boundary.encode(), i, data[(first + i) % len(data)])
            for i in range(images_per_request)
        ]
        bodies.append((b"".join(parts) + b"--%s--\r\n" % boundary.encode(),
                       f"multipart/form-data; boundary={boundary}"))
    return bodies


def model_config(args: argparse.Namespace, **batching: Any) -> dict:
    return {
        "models": {"bench": {
            "arch": args.arch, "model_kwargs": args.model_kwargs, "weights": "random", "device": args.device,
            "dtype": args.dtype, "variants": {"v": args.variant_dict},
            "batching": {"max_batch_size": args.batch, "max_wait_ms": args.max_wait_ms, "max_queue": 4096,
                         **batching},
        }},
        "limits": {"request_timeout_s": 120},
    }


def server_env(args: argparse.Namespace) -> dict[str, str]:
    # The same torch thread count as the offline measurement in this process.
    return {"OMP_NUM_THREADS": str(args.threads), "MAME_TORCH_THREADS": str(args.threads)}


def server_args(args: argparse.Namespace) -> list[str]:
    return ["--preprocess-threads", str(args.preprocess_threads), "--layout", args.layout,
            "--http-processes", str(args.http_processes)]


def build_offline(args: argparse.Namespace) -> tuple[DeviceModel, HostTransform]:
    """The model as the server's worker holds it, and its host transform."""
    model = timm.create_model(args.arch, pretrained=False, **args.model_kwargs).eval()
    transform, input_size = preprocessing(model)
    device = resolve_devices(args.device)[0]
    dm = place_model(
        "bench",
        model,
        device,
        resolve_dtype(args.dtype, device),
        input_size,
        copy_weights=False,
        mean=transform.mean,
        std=transform.std,
    )
    return dm, transform


def host_tensor(transform: HostTransform, data: bytes) -> torch.Tensor:
    """What the server's preprocessing threads make of one image."""
    return transform(decode_image(data, 10**8, needed_edge=transform.resize_edge))


def timed_forward(dm: DeviceModel, x: torch.Tensor, settings: MergeSettings) -> float:
    """One batch the way the worker runs it (x: uint8 on the host, pinned for a GPU), answers on the CPU."""
    started = time.perf_counter()
    infer(dm, settings, x, top_k=5)
    return time.perf_counter() - started


def offline_runner(args, data: list[bytes]):
    """A function that measures the offline model's images/s over `args.seconds`."""
    dm, transform = build_offline(args)
    pictures = [host_tensor(transform, d) for d in data]
    x = stack_batch([pictures[i % len(pictures)] for i in range(args.batch)], pin=dm.device.type == "cuda")
    settings = MergeSettings.from_dict(args.variant_dict)
    for _ in range(3):
        timed_forward(dm, x, settings)

    def measure() -> float:
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < args.seconds:
            timed_forward(dm, x, settings)
            runs += 1
        return runs * args.batch / (time.perf_counter() - started)

    return measure


@dataclass(frozen=True)
class Load:
    """What one saturation window measured."""

    images_per_s: float
    server_cpu_ms_per_image: float  # CPU time of the server process per answered image (host-path cost)
    client_cpu_ms_per_request: float
    # CPU time of the server's main thread (the event loop) per request
    event_loop_ms_per_request: float = 0.0
    # CPU time of the server process alone (not its device or front-end processes) per image: with
    # one interpreter, its ceiling is about 1000 / this img/s whatever the cores and the device
    own_cpu_ms_per_image: float = 0.0
    # CPU ms per image of each kind of child process, and the server's cores busy (CPU s per s, all of it):
    # which stage is saturated on a many-core host
    children_ms_per_image: tuple[tuple[str, float], ...] = ()
    busy_cores: float = 0.0
    # images per batch over the window: the server's per-batch work is shared by this many images
    mean_batch: float = 0.0
    # medians over sampled answers, ms: round trip at the client, and the server's total, queue and inference
    timings_ms: tuple[float, ...] = ()
    failed: int = 0  # requests that got no 200 (counted and shown, so one reset does not void a run)
    first_failure: str = ""


def run_clients(url: str, bodies: list[tuple[bytes, str]], concurrency: int, begin: float, seconds: float,
                processes: int) -> list[ClientOutcome]:
    """`client_window` in `processes` processes (`python -m loadtest.serving_client`, which starts without
    torch: quick to start), sharing `concurrency` between them."""
    if processes == 1:
        return [client_window(url, bodies, concurrency, begin, seconds)]
    shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    with tempfile.TemporaryDirectory(prefix="mame-bench-") as workdir:
        clients = []
        for i, share in enumerate(shares):
            spec = Path(workdir) / f"client-{i}.pickle"
            spec.write_bytes(pickle.dumps({"url": url, "bodies": bodies, "concurrency": share, "begin": begin,
                                           "seconds": seconds}))
            clients.append(
                subprocess.Popen(
                    [sys.executable, "-m", "loadtest.serving_client", str(spec)],
                    stdout=subprocess.PIPE,
                    cwd=Path(__file__).resolve().parent.parent,
                )
            )
        outcomes = []
        for client in clients:
            out, _ = client.communicate(timeout=begin - time.monotonic() + seconds + 300)
            if client.returncode != 0:
                raise RuntimeError(f"a client process exited with {client.returncode}")
            outcomes.append(ClientOutcome(**json.loads(out)))
    return outcomes


def saturate(url: str, server_pid: int, bodies: list[tuple[bytes, str]], concurrency: int, seconds: float,
             warmup_s: float, processes: int = 1, images_per_request: int = 1,
             gil_profile_to: Path | None = None) -> Load:
    """Images per second answered while `concurrency` requests are kept in flight, after a warm-up."""
    processes = max(1, min(processes, concurrency))
    server = psutil.Process(server_pid)
    server_cpu: list[dict[str, float]] = []
    batching: list[tuple[float, float]] = []
    # Client processes start in ~1 s (without torch); the window starts once all of them have warmed up.
    begin = time.monotonic() + warmup_s + (1.5 if processes > 1 else 0.0)
    profiler: list[subprocess.Popen] = []

    def watch_server() -> None:  # the server's CPU time over exactly the counted window
        for at in (begin, begin + seconds):
            time.sleep(max(0.0, at - time.monotonic()))
            server_cpu.append(cpu_seconds(server))
            batching.append(batched_so_far(url))
            if gil_profile_to is not None and not profiler:
                profiler.append(gil_profile(server_pid, seconds, gil_profile_to))

    watcher = threading.Thread(target=watch_server)
    watcher.start()
    outcomes = run_clients(url, bodies, concurrency, begin, seconds, processes)
    watcher.join()
    for process in profiler:
        _, errors = process.communicate(timeout=seconds + 30)
        if process.returncode != 0 or not gil_profile_to.exists():
            print(
                f"  py-spy could not profile the server (exit {process.returncode}): {errors.strip()[-300:]}"
            )
    answered = sum(outcome.answered for outcome in outcomes)
    failures = [failure for outcome in outcomes for failure in outcome.failures]
    timings = [sample for outcome in outcomes for sample in outcome.timings_ms]
    if answered == 0:
        raise RuntimeError(f"no request was answered inside the measurement window; failures: {failures[:3]}")
    images = answered * images_per_request
    return Load(
        images_per_s=images / seconds,
        server_cpu_ms_per_image=1000 * (server_cpu[1]["total"] - server_cpu[0]["total"]) / images,
        client_cpu_ms_per_request=1000 * sum(outcome.cpu_s for outcome in outcomes) / answered,
        timings_ms=tuple(statistics.median(column) for column in zip(*timings)) if timings else (),
        event_loop_ms_per_request=1000
        * (server_cpu[1]["event loop"] - server_cpu[0]["event loop"])
        / answered,
        own_cpu_ms_per_image=1000 * (server_cpu[1]["own"] - server_cpu[0]["own"]) / images,
        children_ms_per_image=tuple(
            (kind, 1000 * (server_cpu[1][kind] - server_cpu[0].get(kind, 0.0)) / images)
            for kind in [*(name for _, name in CHILD_KINDS), "other"]
            if kind in server_cpu[1]
        ),
        busy_cores=(server_cpu[1]["total"] - server_cpu[0]["total"]) / seconds,
        mean_batch=(batching[1][0] - batching[0][0]) / max(1.0, batching[1][1] - batching[0][1]),
        failed=len(failures),
        first_failure=failures[0] if failures else "",
    )


def batched_so_far(url: str) -> tuple[float, float]:
    """Images batched and batches run by the server so far (its mame_batch_size histogram)."""
    return batch_totals(text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text))


def cmd_throughput(args) -> None:
    """Offline and served windows alternate (the server idles during offline ones), so that load from
    other processes on a shared machine hits both alike; the ratio of the medians is the figure."""
    data = sample_bytes(args.image_edge)
    bodies = request_bodies(data, args.images_per_request)
    offline_measure = offline_runner(args, data)
    # Enough images in flight for two full batches, whatever the images per request.
    concurrency = args.concurrency or max(1, -(-2 * args.batch // args.images_per_request))
    offline: list[float] = []
    served: list[Load] = []
    with running_server(model_config(args), env=server_env(args), ready_timeout=600,
                        args=server_args(args)) as server:
        for round_ in range(args.rounds):
            offline.append(offline_measure())
            profile = Path(args.gil_profile) if args.gil_profile and round_ == args.rounds - 1 else None
            served.append(saturate(server.url, server.proc.pid, bodies, concurrency, args.seconds,
                                   3.0 if round_ == 0 else 1.0, processes=args.client_processes,
                                   images_per_request=args.images_per_request, gil_profile_to=profile))
            if profile is not None and profile.exists():
                print(summarise_gil_profile(profile, args.seconds))
            print(
                f"  round {round_ + 1}: offline {offline[-1]:8.1f} img/s, "
                f"served {served[-1].images_per_s:8.1f} "
                f"img/s, ratio {served[-1].images_per_s / offline[-1]:.3f}; server CPU "
                f"{served[-1].server_cpu_ms_per_image:.2f} ms/img "
                f"({served[-1].own_cpu_ms_per_image:.3f} in its own process), event loop "
                f"{served[-1].event_loop_ms_per_request:.2f} ms/req, client CPU "
                f"{served[-1].client_cpu_ms_per_request:.2f} ms/req",
                flush=True,
            )
            if served[-1].failed:
                print(f"    {served[-1].failed} requests failed, the first with {served[-1].first_failure}")
    off = statistics.median(offline)
    srv = statistics.median(load.images_per_s for load in served)
    host_ms = statistics.median(load.server_cpu_ms_per_image for load in served)
    loop_ms = statistics.median(load.event_loop_ms_per_request for load in served)
    images = f"{args.image_edge} px JPEGs" if args.image_edge else "the bundled 300-512 px JPEGs"
    print(f"{args.arch} {args.variant} on {args.device}/{args.dtype}, batch {args.batch}, "
          f"{torch.get_num_threads()} torch threads, {args.rounds} rounds of {args.seconds:g} s, "
          f"{concurrency} requests of {args.images_per_request} image(s) ({images}) in flight from "
          f"{args.client_processes} client process(es)")
    print(f"  offline model   {off:9.1f} img/s  "
          "(preprocessed uint8 tensors, normalise + forward + top-k; median)")
    print(f"  served (HTTP)   {srv:9.1f} img/s  (JPEG over HTTP, decode, preprocess, batch, answer; median)")
    print(f"  server CPU time {host_ms:9.2f} ms per image "
          f"(all its threads; {1000 / host_ms:.0f} img/s per busy core)")
    print(f"  event loop      {loop_ms:9.2f} ms CPU per request ({1000 / loop_ms:.0f} requests/s at most)")
    own_ms = statistics.median(load.own_cpu_ms_per_image for load in served)
    # The one interpreter every image passes through (with --http-processes: the engine, not the front-ends).
    mean_batch = statistics.median(load.mean_batch for load in served)
    print(f"  server process  {own_ms:9.3f} ms CPU per image without its child processes "
          f"(~{1000 / own_ms:.0f} img/s at most in one interpreter, at a mean batch of {mean_batch:.1f} "
          "images: python -m loadtest.engine measures it at full batches)")
    kinds = {kind for load in served for kind, _ in load.children_ms_per_image}
    by_kind = [(kind, statistics.median(dict(load.children_ms_per_image).get(kind, 0.0) for load in served))
               for kind in sorted(kinds)]
    by_kind = [(kind, ms) for kind, ms in by_kind if ms >= 0.0005]  # e.g. multiprocessing's resource tracker
    children = (
        ", ".join(f"{kind} {ms:.3f}" for kind, ms in by_kind) + " ms CPU per image" if by_kind else "none"
    )
    print(f"  child processes {children}; the server used "
          f"{statistics.median(load.busy_cores for load in served):.1f} cores (of {psutil.cpu_count()} here)")
    if timings := [load.timings_ms for load in served if load.timings_ms]:
        trip, total, queue, inference = (statistics.median(column) for column in zip(*timings))
        # Where a request's time goes tells which stage limits: a long queue wait means the device (or
        # the batching); a long rest means decoding, the event loop or the GIL.
        print(f"  per request, median ms: round trip {trip:.1f} = server {total:.1f} (queue {queue:.1f}, "
              f"inference {inference:.1f}, the rest {total - queue - inference:.1f}: reading, decoding, "
              f"answering) + outside the handler {trip - total:.1f}")
    print(f"  ratio served/offline = {srv / off:.3f}")
    if failed := sum(load.failed for load in served):
        print(f"  {failed} requests failed (not counted as served); the first: "
              f"{next(load.first_failure for load in served if load.failed)}")


def cmd_latency(args) -> None:
    data = sample_bytes()
    dm, transform = build_offline(args)
    settings = MergeSettings.from_dict(args.variant_dict)
    preprocess_s, forward_s = [], []
    for i in range(args.requests):
        started = time.perf_counter()
        x = stack_batch([host_tensor(transform, data[i % len(data)])], pin=dm.device.type == "cuda")
        preprocess_s.append(time.perf_counter() - started)
        forward_s.append(timed_forward(dm, x, settings))
    served_s = []
    with running_server(model_config(args), env=server_env(args), ready_timeout=600,
                        args=server_args(args)) as server, \
            httpx.Client(timeout=60) as http:
        for i in range(args.requests + 5):
            started = time.perf_counter()
            response = http.post(
                f"{server.url}/v1/classify",
                params={"top_k": 1},
                content=data[i % len(data)],
                headers={"content-type": "image/jpeg"},
            )
            response.raise_for_status()
            if i >= 5:
                served_s.append(time.perf_counter() - started)
    med = lambda values: statistics.median(values) * 1000
    print(f"{args.arch} {args.variant} on {args.device}/{args.dtype}, concurrency 1, "
          f"max_wait_ms {args.max_wait_ms}, {args.requests} requests")
    print(f"  direct forward (batch 1)      median {med(forward_s):8.2f} ms")
    print(f"  direct decode + preprocess    median {med(preprocess_s):8.2f} ms")
    print(f"  served round trip (HTTP)      median {med(served_s):8.2f} ms")
    print(f"  added by the server over the forward:            {med(served_s) - med(forward_s):8.2f} ms")
    print(f"  added over decode + preprocess + forward:        "
          f"{med(served_s) - med(forward_s) - med(preprocess_s):8.2f} ms")


def cmd_memory(args) -> None:
    config = Path(args.config) if args.config else Path(__file__).parent / "configs" / "default.yaml"
    with running_server(config, env=server_env(args), ready_timeout=1200, args=server_args(args)) as server:
        rss = tree_rss(server.proc.pid)
        processes = len(process_tree(server.proc.pid))
        weights = httpx.get(f"{server.url}/v1/models").json()["models"][0]["weights"]
        gpu = gpu_memory_mib(server.proc.pid)
    print(f"config {config} (weights {weights}): resident memory after warm-up {rss / 2**20:.0f} MiB "
          f"({processes} process(es): the server and its device or front-end processes)"
          + (f", GPU memory {gpu:.0f} MiB" if gpu is not None else ""))


async def soak_requests(url: str, data: list[bytes], total: int, concurrency: int) -> None:
    counter = iter(range(total))

    async def client(http: httpx.AsyncClient) -> None:
        for n in counter:
            response = await http.post(f"{url}/v1/classify", content=data[n % len(data)],
                                       params={"variant": ["baseline", "mame", "tome"][n % 3]},
                                       headers={"content-type": "image/jpeg"})
            response.raise_for_status()

    async with httpx.AsyncClient(timeout=60) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))


def cmd_soak(args) -> None:
    data = sample_bytes()
    config = {
        "models": {
            "tiny": {
                "arch": "vit_tiny_patch16_224",
                "model_kwargs": TINY_KWARGS,
                "weights": "random",
                "device": args.device,
                "dtype": args.dtype,
                "batching": {"max_batch_size": 16, "max_wait_ms": 5, "max_queue": 1024},
                "variants": {
                    "baseline": {"method": "none"},
                    "mame": {"method": "mame", "tau": 0.8, "blocks": 3},
                    "tome": {"method": "tome", "r": 8},
                },
            }
        }
    }
    with running_server(config, env=server_env(args), args=server_args(args)) as server:
        pid = server.proc.pid
        ready_rss = tree_rss(pid)
        asyncio.run(soak_requests(server.url, data, args.settle, args.concurrency or 8))
        start_rss, start_gpu = tree_rss(pid), gpu_memory_mib(pid)
        started = time.perf_counter()
        asyncio.run(soak_requests(server.url, data, args.requests, args.concurrency or 8))
        elapsed = time.perf_counter() - started
        end_rss, end_gpu = tree_rss(pid), gpu_memory_mib(pid)
    print(f"soak: {args.requests} requests (3 variants, concurrency {args.concurrency or 8}) "
          f"in {elapsed:.0f} s, tiny ViT on {args.device}")
    print(f"  RSS after warm-up {ready_rss / 2**20:.1f} MiB, after {args.settle} settling requests "
          f"{start_rss / 2**20:.1f} MiB, after the soak {end_rss / 2**20:.1f} MiB")
    print(f"  growth over the soak: {100 * (end_rss - start_rss) / start_rss:+.2f} %")
    if start_gpu is not None:
        print(f"  GPU memory {start_gpu:.0f} MiB -> {end_gpu:.0f} MiB")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.serving", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["throughput", "latency", "memory", "soak"])
    parser.add_argument("--arch", default="vit_small_patch16_224")
    parser.add_argument("--tiny", action="store_true", help="use the tiny test ViT (64 px, 4 blocks)")
    parser.add_argument(
        "--near-free",
        action="store_true",
        help="a nearly free ViT at 224 px (1 block, width 16): measures the host path's capacity",
    )
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--variant", default="baseline", help="baseline | mame-<tau> | tome-<r>")
    parser.add_argument("--batch", type=int, default=8, help="max_batch_size of the server = offline batch")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=0, help="clients (default: 2 x batch; soak: 8)")
    parser.add_argument("--seconds", type=float, default=10.0, help="throughput: one measurement window")
    parser.add_argument("--rounds", type=int, default=3, help="throughput: offline/served window pairs")
    parser.add_argument("--requests", type=int, default=None, help="latency: 50; soak: 10000")
    parser.add_argument("--settle", type=int, default=500, help="soak: requests before the first measurement")
    parser.add_argument("--config", help="memory: serving config (default: the shipped default)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads, here and in the server (use 1 on a small shared CPU: "
                             "OpenMP threads that wait for each other collapse under contention)")
    parser.add_argument("--preprocess-threads", type=int, default=4, help="the server's decoding threads")
    parser.add_argument("--layout", default="auto", choices=["auto", "single", "frontends"],
                        help="the server's --layout (auto: frontends with CUDA, else single)")
    parser.add_argument(
        "--http-processes",
        default="auto",
        help="the server's --http-processes (front-end processes in the frontends layout; auto: a "
        "quarter of the cores)",
    )
    parser.add_argument("--images-per-request", type=int, default=1,
                        help="throughput: images in each request (several: one multipart body)")
    parser.add_argument("--image-edge", type=int, default=0,
                        help="throughput: re-encode the sample images with this shorter side (0: as bundled)")
    parser.add_argument(
        "--gil-profile",
        metavar="FILE",
        help="throughput: record which server threads hold the GIL during the last served "
        "window with py-spy (pip install py-spy; needs ptrace rights) into FILE, and summarise",
    )
    parser.add_argument("--client-processes", type=int, default=1,
                        help="throughput: processes that send the load (one Python process sends ~1000 "
                             "requests/s at most; use more on a many-core machine)")
    args = parser.parse_args(argv)
    if args.gil_profile and py_spy() is None:
        parser.error("--gil-profile needs py-spy on the PATH (pip install py-spy)")
    torch.set_num_threads(args.threads)
    args.model_kwargs = TINY_KWARGS if args.tiny else NEAR_FREE_KWARGS if args.near_free else {}
    if args.tiny or args.near_free:
        args.arch = "vit_tiny_patch16_224"
    if args.variant == "baseline":
        args.variant_dict = {"method": "none"}
    elif args.variant.startswith("mame-"):
        # default: 8 blocks, cut to --tiny's
        args.variant_dict = {"method": "mame", "tau": float(args.variant[5:])}
    elif args.variant.startswith("tome-"):
        args.variant_dict = {"method": "tome", "r": int(args.variant[5:])}
    else:
        parser.error(f"--variant {args.variant!r}: use baseline, mame-<tau> or tome-<r>")
    args.requests = args.requests or {"latency": 50, "soak": 10_000}.get(args.what, 0)
    {"throughput": cmd_throughput, "latency": cmd_latency, "memory": cmd_memory, "soak": cmd_soak}[args.what](
        args
    )


if __name__ == "__main__":
    main()
