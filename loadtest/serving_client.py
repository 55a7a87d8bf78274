"""The load of the serving benchmark: requests kept in flight from client processes.

A module of its own, importing neither torch nor timm: each client process starts in well under a second.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import sys
import time
from dataclasses import asdict, dataclass, field

import aiohttp

# aiohttp rather than httpx (which the other benchmarks use): a load generator must cost the machine little
# beside the server it measures, and httpx cost about nine times aiohttp's CPU per request here (the client
# CPU that `throughput` prints; docs/benchmarks.md). The load is spread over `processes` processes so that on
# a many-core machine the client is not the limit either.

SAMPLE_EVERY = 8  # one answer in this many is parsed for the server's own timings (parsing costs the client)


@dataclass
class ClientOutcome:
    """One client process's window: requests answered in it, its CPU seconds, failures, and sampled timings
    in ms: (round trip seen by the client, server total, queue, inference) of the request's first image."""

    answered: int = 0
    cpu_s: float = 0.0
    failures: list[str] = field(default_factory=list)
    timings_ms: list[tuple[float, float, float, float]] = field(default_factory=list)


async def _keep_busy(url: str, bodies: list[tuple[bytes, str]], concurrency: int, begin: float,
                     end: float) -> ClientOutcome:
    """Keep `concurrency` requests in flight until `end`; count what is answered between `begin` and `end`."""
    outcome = ClientOutcome()

    target = f"{url}/v1/classify?top_k=1"

    async def sender(n: int, http: aiohttp.ClientSession) -> None:
        while time.monotonic() < end:
            try:
                body, content_type = bodies[n % len(bodies)]
                sent = time.monotonic()
                async with http.post(target, data=body, headers={"content-type": content_type}) as response:
                    response.raise_for_status()
                    answer_bytes = await response.read()
                done = time.monotonic()
                if begin <= done <= end:
                    outcome.answered += 1
                    if n % SAMPLE_EVERY == 0:
                        answer = json.loads(answer_bytes)
                        timings = answer.get("results", [answer])[0]["timings_ms"]
                        outcome.timings_ms.append((1000 * (done - sent), timings["total"], timings["queue"],
                                                   timings["inference"]))
            except (TimeoutError, aiohttp.ClientError) as exc:
                outcome.failures.append(f"{type(exc).__name__}: {exc}")
            n += 1

    # Idle connections are dropped well before the server's keep-alive timeout (uvicorn: 5 s), so a request
    # never races the server closing its connection.
    connections = aiohttp.TCPConnector(limit=concurrency, keepalive_timeout=2.0)
    async with aiohttp.ClientSession(connector=connections, timeout=aiohttp.ClientTimeout(total=120)) as http:
        await asyncio.gather(*(sender(n, http) for n in range(concurrency)))
    return outcome


def client_window(url: str, bodies: list[tuple[bytes, str]], concurrency: int, begin: float,
                  seconds: float) -> ClientOutcome:
    """Requests from now until `begin + seconds` (time.monotonic, the same clock in every process here)."""
    cpu = time.process_time()
    outcome = asyncio.run(_keep_busy(url, bodies, concurrency, begin, begin + seconds))
    outcome.cpu_s = time.process_time() - cpu
    return outcome


def main() -> None:
    """`python -m loadtest.serving_client SPEC.pickle`: one client process of the benchmark; JSON on
    stdout."""
    with open(sys.argv[1], "rb") as spec_file:
        spec = pickle.load(spec_file)
    json.dump(asdict(client_window(**spec)), sys.stdout)


if __name__ == "__main__":
    main()
