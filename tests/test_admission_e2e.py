"""End-to-end admission and the refusals around it, on real `python -m server` processes in both layouts:
a request the queue cannot take is refused before its images are decoded, a flood of one variant leaves
another its share, deadlines hold while decoding is busy, and refused bodies close their connection."""

from __future__ import annotations

import asyncio
import io
import os
import socket
import threading
import time

import httpx
import psutil
import pytest
from PIL import Image
from serverproc import metric_values, running_server, sample_images, tiny_config

pytestmark = pytest.mark.e2e

LAYOUTS = {
    "single": ["--layout", "single"],
    "frontends": ["--layout", "frontends", "--http-processes", "1"],
}
TWO_VARIANTS = {"baseline": {"method": "none"}, "mame-0.5": {"method": "mame", "tau": 0.5, "blocks": 3}}
# Batches wait long to fill: what is queued stays queued while the test looks.
HOLDING = {"max_batch_size": 64, "max_wait_ms": 4000}


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    return sample_images()


def post(url: str, data: bytes, timeout_s: float = 30, **params) -> httpx.Response:
    return httpx.post(f"{url}/v1/classify", params=params, content=data,
                      headers={"content-type": "image/png"}, timeout=timeout_s)


def queued(url: str, variant: str) -> float:
    depths = metric_values(httpx.get(f"{url}/metrics").text, "mame_queue_depth")
    return depths.get(f'{{model="tiny",variant="{variant}"}}', 0.0)


def counted(url: str, variant: str, status: str) -> float:
    values = metric_values(httpx.get(f"{url}/metrics").text, "mame_requests_total")
    return values.get(f'{{experiment="",model="tiny",status="{status}",variant="{variant}"}}', 0.0)


def fill_in_background(url: str, data: bytes, variant: str, count: int) -> list[httpx.Response]:
    """`count` requests of `variant` sent at once from a thread; the list fills as they are answered."""
    answers: list[httpx.Response] = []

    async def send() -> None:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=count)) as client:
            answers.extend(await asyncio.gather(*(
                client.post(f"{url}/v1/classify", params={"variant": variant}, content=data,
                            headers={"content-type": "image/png"}) for _ in range(count))))

    threading.Thread(target=lambda: asyncio.run(send()), daemon=True).start()
    return answers


def wait_for(condition, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def png(width: int, height: int, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_request_the_queue_cannot_take_is_refused_before_decoding(images, layout):
    """A full queue: a request is refused from its images' headers, before any decoding, so a body that is
    a valid header and nothing else gets the queue's 503 (decoded first, it was a 400). A request's pixels
    are bounded together (413), and a lone image larger than the pixels decoded at once is still served."""
    config = tiny_config(variants={"baseline": {"method": "none"}}, batching={**HOLDING, "max_queue": 2},
                         limits={"max_pixels": 4_000_000, "max_request_pixels": 6_000_000,
                                 "max_decoding_pixels": 1_000_000})
    with running_server(config, args=LAYOUTS[layout]) as server:
        assert post(server.url, png(2000, 2000)[:80]).status_code == 400  # room in the queue: decoded
        held = fill_in_background(server.url, images["flat"], "baseline", 2)
        wait_for(lambda: queued(server.url, "baseline") == 2)
        refused = post(server.url, png(2000, 2000)[:80])
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"] == "overloaded" and refused.headers["retry-after"]
        wait_for(lambda: len(held) == 2)
        assert [r.status_code for r in held] == [200, 200]
        lone = post(server.url, png(2000, 2000))  # 4 Mpx, over the 1 Mpx decoded at once: decoded alone
        assert lone.status_code == 200, lone.text
        together = httpx.post(f"{server.url}/v1/classify", timeout=30, files=[
            ("file", (f"{i}.png", png(2000, 2000), "image/png")) for i in range(2)])
        assert (together.status_code, together.json()["error"]) == (413, "too_large"), together.text
        assert "max_request_pixels" in together.json()["detail"]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_flood_of_one_variant_does_not_refuse_another(images, layout):
    config = tiny_config(variants=TWO_VARIANTS, batching={**HOLDING, "max_queue": 8})
    with running_server(config, args=LAYOUTS[layout]) as server:
        flood = fill_in_background(server.url, images["noise"], "baseline", 12)
        wait_for(lambda: counted(server.url, "baseline", "503") >= 1)  # the flooder's share is full
        quiet = post(server.url, images["flat"], variant="mame-0.5")
        assert quiet.status_code == 200, quiet.text
        wait_for(lambda: len(flood) == 12)
        statuses = sorted(r.status_code for r in flood)
        assert statuses.count(200) == 4 and statuses.count(503) == 8, statuses  # its share: half of 8


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_deadline_holds_while_decoding_is_busy(layout):
    """Large 16-bit PNGs queue for one decoding thread: each answer comes by its deadline (504), not when its
    turn to decode has come and gone (it came seconds late)."""
    buffer = io.BytesIO()
    Image.new("I;16", (6000, 6000)).save(buffer, "PNG")
    heavy = buffer.getvalue()
    config = tiny_config(limits={"request_timeout_s": 1.0})
    with running_server(config, args=[*LAYOUTS[layout], "--preprocess-threads", "1"]) as server:
        async def send() -> list[tuple[int, float]]:
            async with httpx.AsyncClient(timeout=60) as client:
                async def one() -> tuple[int, float]:
                    started = time.monotonic()
                    response = await client.post(f"{server.url}/v1/classify", content=heavy,
                                                 headers={"content-type": "image/png"})
                    return response.status_code, time.monotonic() - started
                return await asyncio.gather(*(one() for _ in range(16)))

        answers = asyncio.run(send())
    assert {status for status, _ in answers} <= {200, 504}, answers
    assert 504 in {status for status, _ in answers}, answers
    # 1 s deadline; sixteen decodes in a row would take seconds. A wide margin for a busy machine.
    assert max(elapsed for _, elapsed in answers) < 3.0, answers


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_small_image_is_not_decoded_behind_large_ones(layout, images):
    """With one decoding thread for small images, a small request sent while a request of four 36 Mpx PNGs
    decodes (seconds: one at a time, within the pixels decoded at once) is answered first: large images
    decode in a lane of their own, in either layout, whose thread runs niced (limits.large_image_nice,
    default 10) while the process's other threads keep its priority."""
    buffer = io.BytesIO()
    Image.new("I;16", (6000, 6000)).save(buffer, "PNG")
    files = [("file", (f"{i}.png", buffer.getvalue(), "image/png")) for i in range(4)]
    base = os.getpriority(os.PRIO_PROCESS, 0)
    with running_server(tiny_config(), args=[*LAYOUTS[layout], "--preprocess-threads", "1"]) as server:
        done: list[str] = []
        sender = threading.Thread(target=lambda: done.append(
            f"large {httpx.post(f'{server.url}/v1/classify', files=files, timeout=60).status_code}"))
        sender.start()
        time.sleep(0.3)
        done.append(f"small {post(server.url, images['flat']).status_code}")
        sender.join(60)
        server_process = psutil.Process(server.proc.pid)
        decoding = server_process if layout == "single" else next(
            p for p in server_process.children() if "server.frontend" in " ".join(p.cmdline()))
        nice_values = sorted(os.getpriority(os.PRIO_PROCESS, t.id) for t in decoding.threads())
    assert done == ["small 200", "large 200"], done
    # one thread in the lane of large images (one per front-end; for --preprocess-threads 1 in one process)
    assert nice_values == sorted([base] * (len(nice_values) - 1) + [min(19, base + 10)]), nice_values


def exchange(port: int, data: bytes, timeout_s: float = 10) -> tuple[bytes, bool]:
    """Send `data`, read until the server closes the connection or stays silent: (bytes, closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(data)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except TimeoutError:
            return answer, False
    return answer, True


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_refused_or_stalled_body_closes_its_connection(images, layout):
    config = tiny_config(limits={"max_body_bytes": 100_000, "request_timeout_s": 1.0})
    with running_server(config, args=LAYOUTS[layout]) as server:
        # A body declared too large: 413 at once, Connection: close, and nothing of the body is waited for.
        answer, closed = exchange(server.port, b"POST /v1/classify HTTP/1.1\r\nhost: x\r\n"
                                  b"content-type: image/png\r\ncontent-length: 1073741824\r\n\r\n\x89PNG", 5)
        head = answer.partition(b"\r\n\r\n")[0].lower()
        assert head.startswith(b"http/1.1 413") and b"connection: close" in head, answer
        assert closed, "the connection stayed open after the 413"
        # A body that stops coming: 408, Connection: close.
        answer, closed = exchange(server.port, b"POST /v1/classify HTTP/1.1\r\nhost: x\r\n"
                                  b"content-type: image/png\r\ncontent-length: 5000\r\n\r\n\x89PNG", 10)
        head = answer.partition(b"\r\n\r\n")[0].lower()
        assert head.startswith(b"http/1.1 408") and b"connection: close" in head and closed, answer
        # A name of 60,000 characters is not sent back whole.
        named = httpx.post(f"{server.url}/v1/classify", params={"model": "m" * 60_000},
                           content=images["flat"], headers={"content-type": "image/png"})
        assert named.status_code == 404 and len(named.json()["detail"]) < 300, len(named.text)
        assert post(server.url, images["flat"]).status_code == 200


def test_admin_bodies_are_capped_in_one_process():
    """Behind front-ends an admin body was capped at 1 MiB; in one process FastAPI read any size."""
    config = tiny_config()
    with running_server(config, args=LAYOUTS["single"], env={"MAME_ADMIN_TOKEN": "s3cret"}) as server:
        big = b'{"name": "' + b"x" * (2 << 20) + b'"}'
        answer = httpx.post(f"{server.url}/v1/admin/experiments", content=big, timeout=30,
                            headers={"authorization": "Bearer s3cret", "content-type": "application/json"})
        assert (answer.status_code, answer.json()["error"]) == (413, "too_large"), answer.text[:200]
        assert answer.headers["connection"] == "close"
        created = httpx.post(f"{server.url}/v1/admin/experiments", headers={"authorization": "Bearer s3cret"},
                             json={"name": "ab", "model": "tiny",
                                   "split": {"baseline": 0.5, "mame-0.5": 0.5}})
        assert created.status_code == 201, created.text
