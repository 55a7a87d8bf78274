"""The load of the serving benchmark: requests kept in flight from client processes.

A module of its own, importing neither torch nor timm: each client process starts in well under a second.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import sys
import time

import httpx

# httpx's connection pool costs more per request the more connections it holds (encode/httpx#3215): here one
# AsyncClient with 192 connections sent 78 requests/s to a server that answers at once, while clients of
# 8 connections each sent 300. The load therefore comes from clients of at most 8 connections, spread over
# `processes` processes so that on a many-core machine the client is not the limit either.
CONNECTIONS_PER_CLIENT = 8


async def _keep_busy(url: str, bodies: list[tuple[bytes, str]], concurrency: int, begin: float,
                     end: float) -> tuple[int, list[str]]:
    """Keep `concurrency` requests in flight until `end`: (answered between `begin` and `end`, failures)."""
    answered, failures = 0, []

    async def sender(n: int, http: httpx.AsyncClient) -> None:
        nonlocal answered
        while time.monotonic() < end:
            try:
                body, content_type = bodies[n % len(bodies)]
                response = await http.post(f"{url}/v1/classify", params={"top_k": 1}, content=body,
                                           headers={"content-type": content_type})
                response.raise_for_status()
                answered += begin <= time.monotonic() <= end
            except httpx.HTTPError as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
            n += 1

    async def client(first: int, count: int) -> None:
        # Idle connections are dropped well before the server's keep-alive timeout (uvicorn: 5 s, the same as
        # httpx's default expiry), so a request never races the server closing its connection.
        limits = httpx.Limits(max_connections=count, max_keepalive_connections=count, keepalive_expiry=2.0)
        async with httpx.AsyncClient(timeout=120, limits=limits) as http:
            await asyncio.gather(*(sender(first + i, http) for i in range(count)))

    step = CONNECTIONS_PER_CLIENT
    await asyncio.gather(*(client(first, min(step, concurrency - first)) for first in range(0, concurrency, step)))
    return answered, failures


def client_window(url: str, bodies: list[tuple[bytes, str]], concurrency: int, begin: float,
                  seconds: float) -> tuple[int, float, list[str]]:
    """Requests from now until `begin + seconds` (time.monotonic, the same clock in every process here):
    (requests answered inside the window, CPU seconds of this process, failures)."""
    cpu = time.process_time()
    answered, failures = asyncio.run(_keep_busy(url, bodies, concurrency, begin, begin + seconds))
    return answered, time.process_time() - cpu, failures


def main() -> None:
    """`python -m server.bench_client SPEC.pickle`: one client process of the benchmark; JSON on stdout."""
    with open(sys.argv[1], "rb") as spec_file:
        spec = pickle.load(spec_file)
    answered, cpu, failures = client_window(**spec)
    json.dump({"answered": answered, "cpu": cpu, "failures": failures}, sys.stdout)


if __name__ == "__main__":
    main()
