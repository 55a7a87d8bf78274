"""Faults a real `python -m server` must survive, on loopback: a stalled device (the watchdog), a wedged
engine (/healthz), connections beyond the cap and idle ones, and every accepted request answered."""

from __future__ import annotations

import signal
import socket
import threading
import time

import httpx
import psutil
import pytest
from serverproc import running_server, sample_images, tiny_config

pytestmark = pytest.mark.e2e

FRONTENDS = ["--layout", "frontends", "--http-processes", "1"]
# A model whose full batch takes seconds on a CPU core while one image takes tens of milliseconds: a batch
# of 32 (about 2.7 s alone on one thread) is a real stall for a watchdog of 0.8 s, long enough that a
# request sent once /readyz says so still finds it (the one-process layout's forward cannot be stopped).
SLOW_BATCH_MODEL = {"img_size": 64, "patch_size": 2, "embed_dim": 64, "depth": 12, "num_heads": 2}


def device_process(server_pid: int) -> psutil.Process:
    for child in psutil.Process(server_pid).children():
        cmdline = " ".join(child.cmdline())
        if "multiprocessing" in cmdline and "resource_tracker" not in cmdline:
            return child
    raise LookupError("no device process")


def multipart(images: list[bytes]) -> dict:
    return {"files": [("file", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]}


def wait_for_readyz(url: str, status: int, timeout_s: float) -> httpx.Response | None:
    """The first /readyz answer with `status` (or the last one past the deadline); None once the server no
    longer takes connections (it is stopping)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            response = httpx.get(f"{url}/readyz", timeout=5)
        except httpx.TransportError:
            return None
        if response.status_code == status or time.monotonic() > deadline:
            return response
        time.sleep(0.02)


def test_a_stopped_device_process_is_seen_fails_its_requests_and_stops_the_server():
    """SIGSTOP on the device process: within the stall time /readyz says stalled, the request it holds and
    those that come answer 503 `device_stalled`, and the server exits with status 1 for its supervisor."""
    config = tiny_config(health={"device_stall_s": 1.0})
    image = sample_images()["flat"]
    with running_server(config, args=FRONTENDS) as server:
        assert httpx.post(f"{server.url}/v1/classify", content=image, timeout=30).status_code == 200
        device = device_process(server.proc.pid)
        device.suspend()
        try:
            stopped_at = time.monotonic()
            held: list[httpx.Response] = []
            thread = threading.Thread(target=lambda: held.append(
                httpx.post(f"{server.url}/v1/classify", content=image, timeout=30)))
            thread.start()
            readyz = wait_for_readyz(server.url, 503, 10)
            seen_s = time.monotonic() - stopped_at
            thread.join(30)
        finally:
            if device.is_running():
                device.resume()
        # Not ready: 503 with the reason, or (on a busy machine, once the server has begun to stop) no
        # longer listening.
        if readyz is not None:
            assert readyz.status_code == 503 and readyz.json()["status"] == "stalled", readyz.text
            assert "finished no batch" in readyz.json()["detail"]
        assert seen_s < 10
        assert held and held[0].status_code == 503 and held[0].json()["error"] == "device_stalled", held
        assert server.proc.wait(timeout=60) == 1
        assert "watchdog: device cpu finished no batch" in server.log()


def test_a_stalled_forward_in_one_process_fails_its_requests_and_recovers():
    """One process: a batch that runs past the stall time makes /readyz 503, its requests and those that
    come answer 503 `device_stalled`; once the forward ends the server is ready and answers again. The
    event loop's heartbeat (its stall time shorter still) goes on meanwhile: /healthz stays 200."""
    config = tiny_config(health={"device_stall_s": 0.8, "loop_stall_s": 0.5},
                         batching={"max_batch_size": 32, "max_wait_ms": 300})
    config["models"]["tiny"]["model_kwargs"] = SLOW_BATCH_MODEL
    image = sample_images()["flat"]
    with running_server(config, args=["--layout", "single", "--torch-threads", "1", "--no-warmup"]) as server:
        assert httpx.post(f"{server.url}/v1/classify", content=image, timeout=30).status_code == 200
        big: list[httpx.Response] = []
        thread = threading.Thread(target=lambda: big.append(
            httpx.post(f"{server.url}/v1/classify", **multipart([image] * 32), timeout=60)))
        thread.start()
        readyz = wait_for_readyz(server.url, 503, 20)
        assert readyz.status_code == 503 and readyz.json()["status"] == "stalled", readyz.text
        assert httpx.get(f"{server.url}/healthz", timeout=10).json() == {"status": "ok"}
        refused = httpx.post(f"{server.url}/v1/classify", content=image, timeout=30)
        thread.join(60)
        assert big and big[0].status_code == 503 and big[0].json()["error"] == "device_stalled", big
        assert refused.status_code == 503 and refused.json()["error"] == "device_stalled", refused.text
        assert wait_for_readyz(server.url, 200, 30).status_code == 200
        assert httpx.post(f"{server.url}/v1/classify", content=image, timeout=30).status_code == 200
        assert server.proc.poll() is None


def read_answer(sock: socket.socket) -> bytes:
    answer = b""
    while chunk := sock.recv(65536):  # until the server closes the connection
        answer += chunk
    return answer


@pytest.mark.parametrize("layout", ["single", "frontends"])
def test_connections_beyond_the_cap_are_refused_while_the_others_work_and_idle_ones_are_freed(layout):
    config = tiny_config(connections={"max_connections": 8, "idle_timeout_s": 1.5})
    args = ["--layout", "single"] if layout == "single" else FRONTENDS
    image = sample_images()["flat"]
    request = (b"POST /v1/classify HTTP/1.1\r\nhost: x\r\ncontent-type: image/png\r\n"
               b"content-length: %d\r\n\r\n" % len(image) + image)
    with running_server(config, args=args) as server:
        held = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(8)]
        try:
            time.sleep(0.2)  # all accepted
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as extra:
                refused = read_answer(extra)
            assert refused.startswith(b"HTTP/1.1 503") and b'"overloaded"' in refused, refused
            assert b"retry-after: 1" in refused.lower()
            held[0].sendall(request)  # an open connection still works; idle after its answer, it is closed
            started = time.monotonic()
            answer = read_answer(held[0])
            assert answer.startswith(b"HTTP/1.1 200") and answer.count(b"HTTP/1.1") == 1, answer
            assert all(read_answer(sock) == b"" for sock in held[1:])  # idle since connecting: closed
            assert time.monotonic() - started < 10
        finally:
            for sock in held:
                sock.close()
        assert httpx.post(f"{server.url}/v1/classify", content=image, timeout=30).status_code == 200


def test_healthz_fails_when_the_engine_is_wedged():
    """Front-ends answer the probes from the engine within health.engine_timeout_s: an engine that answers
    nothing (stopped here) makes /healthz and /readyz 503 at once, rather than hang."""
    config = tiny_config(health={"engine_timeout_s": 1.0})
    with running_server(config, args=FRONTENDS) as server:
        assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
        engine = psutil.Process(server.proc.pid)
        engine.suspend()
        try:
            started = time.monotonic()
            probes = [httpx.get(f"{server.url}/{path}", timeout=10) for path in ("healthz", "readyz")]
            elapsed = time.monotonic() - started
        finally:
            engine.resume()
        for probe in probes:
            assert probe.status_code == 503 and probe.json()["status"] == "unresponsive", probe.text
        assert elapsed < 8
        # Resumed: healthy again once its event loop's heartbeat ticks on time (the stopped seconds count as
        # a late tick, past health.loop_stall_s when both probes waited their full timeout).
        time.sleep(1.0)
        assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200


@pytest.mark.parametrize("layout", ["single", "frontends"])
def test_a_probe_that_waited_for_the_engines_event_loop_fails(layout):
    """The engine's event loop does not run for 1.5 s (its process stopped), past health.loop_stall_s: a
    probe sent meanwhile is answered once it runs again, 503 `unresponsive` from its heartbeat, in one
    process and passed on by a front-end alike; the next probes are 200."""
    config = tiny_config(health={"loop_stall_s": 0.5, "engine_timeout_s": 20})
    args = FRONTENDS if layout == "frontends" else ["--layout", "single"]
    with running_server(config, args=args) as server:
        assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
        engine, probe = psutil.Process(server.proc.pid), []
        engine.suspend()
        try:
            asker = threading.Thread(
                target=lambda: probe.append(httpx.get(f"{server.url}/healthz", timeout=30)))
            asker.start()
            time.sleep(1.5)
        finally:
            engine.resume()
        asker.join(30)
        assert probe and probe[0].status_code == 503, probe
        assert probe[0].json()["status"] == "unresponsive" and "event loop did not run" in probe[0].text
        time.sleep(1.0)  # two ticks on time
        assert httpx.get(f"{server.url}/healthz", timeout=10).json() == {"status": "ok"}


@pytest.mark.parametrize(("layout", "fault"), [("single", "SIGTERM"), ("frontends", "SIGTERM"),
                                               ("frontends", "device death")])
def test_a_stop_answers_a_request_begun_on_a_keep_alive_connection_with_connection_close(layout, fault):
    """The server stops (SIGTERM, or a device process's death) while a keep-alive connection's next request
    is arriving (its head half sent): that request is answered (200, or 500 once the device is gone), with
    `Connection: close`, and the connection closed; an idle one is closed without an answer."""
    args = ["--layout", "single"] if layout == "single" else FRONTENDS
    image = sample_images()["flat"]
    head = b"POST /v1/classify HTTP/1.1\r\nhost: x\r\ncontent-type: image/png\r\n"
    rest = b"content-length: %d\r\n\r\n" % len(image) + image
    with running_server(tiny_config(), args=args) as server:
        busy = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        idle = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        for sock in (busy, idle):  # one answer each: both are kept-alive connections now
            sock.sendall(head + rest)
            first = b""
            while not first.endswith(b"}"):
                first += sock.recv(65536)
            assert first.startswith(b"HTTP/1.1 200") and b"connection: close" not in first.lower(), first
        busy.sendall(head)
        time.sleep(0.3)  # read by the server: a request under way
        if fault == "SIGTERM":
            server.proc.send_signal(signal.SIGTERM)
        else:
            device_process(server.proc.pid).kill()
        time.sleep(1.0)  # the stop has begun (front-ends: the engine has signalled them)
        busy.sendall(rest)
        answer = read_answer(busy)
        assert read_answer(idle) == b""
        busy.close()
        idle.close()
        assert server.proc.wait(timeout=60) in ((0, -signal.SIGTERM) if fault == "SIGTERM" else (1,))
    expected = b"HTTP/1.1 200" if fault == "SIGTERM" else b"HTTP/1.1 500"
    assert answer.startswith(expected), answer
    assert b"connection: close" in answer.lower(), answer
