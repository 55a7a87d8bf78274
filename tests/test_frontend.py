"""HTTP front-end processes (server/frontend/): their pieces, and the engine's side over its real socket.

The whole end-to-end suite also runs with front-ends (tests/test_api_e2e.py, tests/test_experiments_e2e.py);
these tests cover what it cannot reach from outside: the internal protocol and a front-end's death."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image
from serverproc import metric_values, running_server, sample_images, tiny_config

from server.decode.resize import ResizeCrop
from server.frontend.app import FrontEnd, Plan
from server.frontend.arena import CropArena, decode_crop
from server.wire.channel import Channel
from server.wire.protocol import (
    FRONTEND_CROPS_AT,
    FRONTEND_ERROR,
    FRONTEND_IMAGES,
    FRONTEND_MODEL,
    FRONTEND_MULTIPART,
    FRONTEND_STARTED,
    request_head,
)
from server.wire.results import render_results


def plan(**overrides) -> Plan:
    decoder = (64, ResizeCrop(64, (64, 64), Image.Resampling.BICUBIC))
    values = {"ready": True, "max_body_bytes": 1 << 20, "max_pixels": 10**6, "max_images": 4,
              "max_request_pixels": 4 * 10**6, "max_decoding_pixels": 10**6,
              "default_model": "tiny", "experiment_models": {"ab": "other"},
              "decoders": {"tiny": decoder, "other": decoder}, "answers": {}, "fetched_at": 0.0}
    return Plan(**{**values, **overrides})


def test_the_front_end_decodes_for_the_model_the_engine_will_route_to():
    p = plan()
    assert p.model_for({}) == "tiny"  # the default model
    assert p.model_for({"model": "other"}) == "other"
    assert p.model_for({"experiment": "ab"}) == "other"  # an experiment picks its model
    assert p.model_for({"experiment": "ab", "model": "tiny"}) == "other"  # the engine answers 422 for this
    assert p.model_for({"experiment": "new"}) is None  # not known yet: sent undecoded
    assert p.model_for({"model": "nope"}) is None and p.model_for({"model": ""}) is None
    assert plan(decoders={}).model_for({}) is None  # still loading, or a model without the fused transform


def test_an_arena_whose_directory_went_first_closes_quietly(tmp_path):
    # Orphaned front-ends: the first to stop removes the shared directory, the others then close their arena.
    shared = tmp_path / "shared"
    shared.mkdir()
    arena = CropArena(str(shared), slot_bytes=16, slots=2)
    shutil.rmtree(shared)
    arena.close()  # was FileNotFoundError: "Exception in 'lifespan' protocol" in the log


def test_crop_arena_slots_are_taken_given_back_and_hold_the_decoded_crop(tmp_path):
    arena = CropArena(str(tmp_path), slot_bytes=64 * 64 * 3, slots=3)
    try:
        first = arena.take(2)
        assert first is not None and len(set(first)) == 2
        assert arena.take(2) is None  # one slot left: the request would send its crops in the body
        last = arena.take(1)
        arena.give_back(last)
        assert arena.take(1) == last  # last freed, first reused: a light load touches few pages
        arena.give_back(last)
        arena.give_back(first)
        data = sample_images()["shapes"]
        decoder = (64, ResizeCrop(64, (64, 64), Image.Resampling.BICUBIC))
        expected = decode_crop(decoder, data, 10**6)
        assert decode_crop(decoder, data, 10**6, arena, first[1]) == b""
        start = first[1] * arena.slot_bytes
        assert arena.memory[start:start + len(expected)] == expected
    finally:
        arena.close()
    assert list(tmp_path.iterdir()) == []


def front_ends(server) -> list[psutil.Process]:
    return [c for c in psutil.Process(server.proc.pid).children() if "server.frontend" in c.cmdline()]


def front_end_argument(server, flag: str) -> str:
    """One of the engine's paths, from the command line of one of its front-ends."""
    command = front_ends(server)[0].cmdline()
    return command[command.index(flag) + 1]


def engine_http(server) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=front_end_argument(server, "--engine-socket")),
                        base_url="http://engine")


def over_channel(server, calls: list[tuple[dict[str, str], bytes]], query: str = "") -> list[httpx.Response]:
    """Requests to the engine as a front-end sends them (server/wire/channel.py), as HTTP responses."""
    async def send() -> list[tuple[dict, bytes]]:
        channel = Channel(front_end_argument(server, "--channel-socket"))
        try:
            return await asyncio.gather(
                *(
                    channel.call(request_head(query, [(k.encode(), v.encode()) for k, v in headers.items()]),
                                 body)
                    for headers, body in calls
                )
            )
        finally:
            await channel.close()

    with engine_http(server) as engine:  # a classification's results are rendered as a front-end does
        answers = Plan.from_json(engine.get("/internal/plan").json(), fetched_at=0.0).answers
    return [httpx.Response(head["status"], headers=head["headers"],
                           content=render_results(body, answers) if head.get("results") else body)
            for head, body in asyncio.run(send())]


TOKEN = "t0ken"


@pytest.fixture(scope="module")
def server():
    with running_server(
        tiny_config(),
        env={"MAME_ADMIN_TOKEN": TOKEN},
        args=["--layout", "frontends", "--http-processes", "1"],
    ) as proc:
        yield proc


def test_engine_answers_crops_in_the_body_and_in_shared_memory_as_it_answers_the_image(server, tmp_path):
    data = sample_images()["shapes"]
    direct = httpx.post(f"{server.url}/v1/classify", content=data, headers={"content-type": "image/png"})
    assert direct.status_code == 200, direct.text
    internal = {FRONTEND_STARTED: repr(time.monotonic()), FRONTEND_IMAGES: "1", FRONTEND_MODEL: "tiny",
                FRONTEND_MULTIPART: "0", "x-request-id": "from-a-front-end"}
    with engine_http(server) as engine:
        plan = Plan.from_json(engine.get("/internal/plan").json(), fetched_at=0.0)
    rgb = decode_crop(plan.decoders["tiny"], data, plan.max_pixels)  # what a front-end sends
    arena = CropArena(str(tmp_path), slot_bytes=len(rgb), slots=2)
    try:
        arena.memory[len(rgb):] = rgb
        in_body, in_arena, short = over_channel(server, [
            (internal, rgb), ({**internal, FRONTEND_CROPS_AT: f"{arena.path} {len(rgb)}"}, b""),
            (internal, rgb[:-1])])
    finally:
        arena.close()
    for answer in (in_body, in_arena):
        assert answer.status_code == 200, answer.text
        assert answer.json()["predictions"] == direct.json()["predictions"]
        assert answer.json()["request_id"] == "from-a-front-end"
    assert (short.status_code, short.json()["error"]) == (500, "internal")
    assert plan.ready and plan.default_model == "tiny" and plan.decoders["tiny"][1].crop == (64, 64)


def test_engine_counts_a_front_end_error_and_not_a_reroute(server):
    def counted() -> float:
        values = metric_values(httpx.get(f"{server.url}/metrics").text, "mame_requests_total")
        return sum(values.values())

    before = counted()
    internal = {FRONTEND_STARTED: repr(time.monotonic()), FRONTEND_IMAGES: "2", FRONTEND_MULTIPART: "1"}
    error, reroute = over_channel(
        server,
        [
            (
                {
                    **internal,
                    FRONTEND_MODEL: "",
                    FRONTEND_ERROR: '{"status": 400, "code": "bad_image", "detail": "cut"}',
                },
                b"",
            ),
            ({**internal, FRONTEND_MODEL: "another"}, b""),
        ],
    )
    assert (error.status_code, error.json()["error"], error.json()["detail"]) == (400, "bad_image", "cut")
    assert (reroute.status_code, reroute.json()["error"]) == (409, "reroute")
    # The parameters and the route come first, as for any request.
    [unknown] = over_channel(
        server,
        [
            (
                {
                    **internal,
                    FRONTEND_MODEL: "",
                    FRONTEND_ERROR: '{"status": 400, "code": "bad_image", "detail": "x"}',
                },
                b"",
            )
        ],
        "model=nope",
    )
    assert (unknown.status_code, unknown.json()["error"]) == (404, "unknown_model")
    assert counted() == before + 2  # the 400 and the 404; the reroute is sent again, and counted then
    images = metric_values(httpx.get(f"{server.url}/metrics").text, "mame_images_total")
    assert sum(v for k, v in images.items() if 'status="400"' in k) == 2  # the images the front-end counted


def test_an_unexpected_error_on_the_channel_is_a_500_not_an_unanswered_call(server):
    # A start time that is not a number breaks classify_request outside its own error handling: the frame
    # went unanswered, so the front-end's call (and its client) waited for ever. Then the next call works.
    internal = {
        FRONTEND_IMAGES: "1",
        FRONTEND_MODEL: "tiny",
        FRONTEND_MULTIPART: "0",
        "x-request-id": "odd-1",
    }

    async def calls() -> list:
        channel = Channel(front_end_argument(server, "--channel-socket"))
        try:
            broken = await asyncio.wait_for(channel.call(
                {"query": {}, "headers": {**internal, FRONTEND_STARTED: "soon"}}, b""), 10)
            # A head not made by request_head (headers as a list): answered 500 too, not a closed channel.
            malformed = await asyncio.wait_for(channel.call(
                {"query": {}, "headers": list({**internal, FRONTEND_STARTED: "1"}.items())}, b""), 10)
            error = '{"status": 400, "code": "bad_image", "detail": "cut"}'
            fine = await asyncio.wait_for(channel.call(
                {"query": {}, "headers": {**internal, FRONTEND_STARTED: repr(time.monotonic()),
                                          FRONTEND_ERROR: error}}, b""), 10)
            return [broken, malformed, fine]
        finally:
            await channel.close()

    (broken_head, broken_body), (malformed_head, malformed_body), (fine_head, fine_body) = \
        asyncio.run(calls())
    assert broken_head["status"] == 500 and json.loads(broken_body)["error"] == "internal"
    assert "odd-1" in json.loads(broken_body)["detail"]
    assert malformed_head["status"] == 500 and json.loads(malformed_body)["error"] == "internal"
    # the channel still serves
    assert (fine_head["status"], json.loads(fine_body)["error"]) == (400, "bad_image")


def test_the_internal_routes_exist_only_behind_front_ends(server):
    with engine_http(server) as engine:
        # decoded requests: the channel
        assert engine.post("/internal/classify", content=b"").status_code == 404
    assert httpx.get(f"{server.url}/internal/plan").status_code == 404  # front-ends keep it from clients
    with running_server(tiny_config()) as alone:
        assert httpx.get(f"{alone.url}/internal/plan").status_code == 404


def test_a_dead_front_end_is_replaced_and_its_crop_arena_removed():
    images = sample_images()
    with running_server(tiny_config(), args=["--layout", "frontends", "--http-processes", "2"]) as server:
        def classify() -> int:
            return httpx.post(f"{server.url}/v1/classify", content=images["flat"],
                              headers={"content-type": "image/png", "connection": "close"}).status_code

        assert [classify() for _ in range(6)] == [200] * 6  # both front-ends have made their arenas
        assert len(front_ends(server)) == 2
        crops_dir = front_end_argument(server, "--crops-dir")
        victim = front_ends(server)[0]
        victim.kill()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and "starting another" not in server.log():
            time.sleep(0.1)
        time.sleep(1.0)  # the new one starts
        assert [classify() for _ in range(6)] == [200] * 6
        now = [c.pid for c in front_ends(server)]
        assert len(now) == 2 and victim.pid not in now
        assert not list(Path(crops_dir).glob(f"crops-{victim.pid}-*"))
        assert re.search(rf"front-end process {victim.pid} exited with -9; starting another", server.log())


def test_an_experiment_moved_to_another_model_is_rerouted_not_misdecoded():
    """A front-end's view of the experiments may be 5 s old: crops made for the wrong model are refused by the
    engine (409, uncounted) and the front-end sends the request again for the engine to decode."""
    config = tiny_config()
    other = dict(config["models"]["tiny"])
    other["model_kwargs"] = {**other["model_kwargs"], "img_size": 32}  # another input size: other crops
    config["models"]["small"] = other
    token, images = "t0ken", sample_images()
    auth = {"authorization": f"Bearer {token}"}
    with running_server(
        config, env={"MAME_ADMIN_TOKEN": token}, args=["--layout", "frontends", "--http-processes", "1"]
    ) as server:

        def classify() -> httpx.Response:
            return httpx.post(
                f"{server.url}/v1/classify",
                params={"experiment": "moving"},
                content=images["flat"],
                headers={"content-type": "image/png"},
            )

        def create(model: str) -> None:
            body = {"name": "moving", "model": model, "split": {"baseline": 1.0}}
            assert (
                httpx.post(f"{server.url}/v1/admin/experiments", json=body, headers=auth).status_code == 201
            )

        create("tiny")
        time.sleep(5.5)  # past PLAN_MAX_AGE_S: the front-end learns that "moving" runs on "tiny"
        assert classify().json()["model"] == "tiny"
        assert httpx.delete(f"{server.url}/v1/admin/experiments/moving", headers=auth).status_code == 200
        create("small")  # the front-end still thinks "tiny"
        moved = classify()
        assert moved.status_code == 200 and moved.json()["model"] == "small", moved.text
        requests = metric_values(httpx.get(f"{server.url}/metrics").text, "mame_requests_total")
        assert "a request re-sent undecoded: the route's model is small" in server.log()
    # the re-route is not counted
    assert sum(v for k, v in requests.items() if 'experiment="moving"' in k) == 2


def test_front_ends_stop_when_the_server_process_is_killed():
    """A killed server process cannot stop its front-ends: they notice and exit, freeing the port."""
    with running_server(tiny_config(), args=["--layout", "frontends", "--http-processes", "2"]) as server:
        children = front_ends(server)
        crops_dir = Path(front_end_argument(server, "--crops-dir"))
        server.proc.kill()
        server.proc.wait()
        _, alive = psutil.wait_procs(children, timeout=15)
        assert not alive, alive
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", server.port))  # the port is free again
        assert not crops_dir.exists()  # nor is anything left in /dev/shm


def test_connections_are_spread_over_the_front_ends():
    """Each front-end listens on the port itself (SO_REUSEPORT): 16 keep-alive clients do not all land on
    one."""
    image = sample_images()["flat"]
    with running_server(tiny_config(), args=["--layout", "frontends", "--http-processes", "2"]) as server:
        clients = [httpx.Client(base_url=server.url) for _ in range(16)]
        try:
            for client in clients:
                assert (
                    client.post(
                        "/v1/classify", content=image, headers={"content-type": "image/png"}
                    ).status_code
                    == 200
                )
            held = [sum(1 for c in p.net_connections("tcp") if c.status == psutil.CONN_ESTABLISHED
                        and c.laddr.port == server.port) for p in front_ends(server)]
        finally:
            for client in clients:
                client.close()
    assert sum(held) == 16 and min(held) >= 1, held


def raw_request(port: int, request: bytes, read: bool = True) -> bytes:
    """Bytes on a socket exactly as given (httpx would normalise the path), and the answer's first bytes."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        answer = b""
        while read and (chunk := sock.recv(65536)):  # until the server closes (connection: close)
            answer += chunk
        return answer


def test_clients_cannot_reach_the_engines_routes_nor_send_it_unbounded_bodies(server):
    """The target reaches the engine unparsed, so `..` and `//` route as in one process (404); bodies of
    passed-through requests are capped; the front-end's own answers carry a request id."""
    for target in (b"/internal/plan", b"/v1/../internal/plan", b"/./internal/plan", b"//x/internal/plan",
                   b"/%69nternal/plan"):
        answer = raw_request(
            server.port, b"GET " + target + b" HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
        )
        assert answer.startswith(b"HTTP/1.1 404"), (target, answer[:200])
        assert b'"request_id":"' in answer and b"x-request-id: " in answer.lower(), answer
    big = httpx.request("GET", f"{server.url}/healthz", content=b"x" * (2 << 20))
    assert (big.status_code, big.json()["error"]) == (413, "too_large")
    assert big.json()["request_id"] == big.headers["x-request-id"]
    given = httpx.get(f"{server.url}/healthz", headers={"x-request-id": "mine-1"})
    assert given.status_code == 200 and given.headers["x-request-id"] == "mine-1"


def test_header_values_with_trailing_whitespace_are_answered_as_in_one_process(server):
    """httptools keeps a trailing space or tab of a header value and h11 refuses to send it to the engine: the
    front-end strips it (not part of the value, RFC 9110 5.5) rather than answer 503 `not_ready`."""
    def ask(head: bytes, body: bytes = b"") -> bytes:
        return raw_request(server.port, head + b"host: x\r\nconnection: close\r\n\r\n" + body)

    assert ask(b"GET /healthz HTTP/1.1\r\nuser-agent: curl \r\n").startswith(b"HTTP/1.1 200")
    assert ask(b"GET /metrics HTTP/1.1\r\naccept: */*\t\r\n").startswith(b"HTTP/1.1 200")
    denied = ask(b"GET /v1/admin/changes HTTP/1.1\r\nauthorization: Bearer \r\n")
    assert denied.startswith(b"HTTP/1.1 401") and b'"error":"unauthorized"' in denied, denied
    image = sample_images()["flat"]
    unknown = ask(b"POST /v1/classify?model=nope HTTP/1.1\r\ncontent-type: image/png\r\nx-foo: bar \r\n"
                  b"content-length: %d\r\n" % len(image), image)
    assert unknown.startswith(b"HTTP/1.1 404") and b'"error":"unknown_model"' in unknown, unknown


def front_end_answer(engine: Callable[[httpx.Request], httpx.Response], method: str, path: str,
                     headers: list[tuple[bytes, bytes]]) -> tuple[dict, dict]:
    """One request through a FrontEnd whose engine is `engine` (an httpx handler): the answer's start and body
    messages. For engine failures a real engine does not produce on demand."""
    async def call() -> list[dict]:
        front, sent = FrontEnd("/nonexistent/engine.sock", "/nonexistent/channel.sock", threads=1), []
        front.engine = httpx.AsyncClient(transport=httpx.MockTransport(engine), base_url="http://engine")
        scope = {
            "type": "http",
            "method": method,
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "headers": [(b"host", b"x"), *headers],
            "scheme": "http",
            "server": ("127.0.0.1", 8000),
        }

        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict) -> None:
            sent.append(message)

        try:
            await front(scope, receive, send)
        finally:
            await front.engine.aclose()
            front.pool.shutdown()
        return sent

    start, body = asyncio.run(call())
    return start, body


def test_a_request_h11_refuses_to_pass_on_is_a_400_not_an_unreachable_engine():
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.LocalProtocolError("Illegal header value")

    start, body = front_end_answer(refuse, "GET", "/healthz", [])
    assert start["status"] == 400 and json.loads(body["body"])["error"] == "http_error"


def test_a_front_end_error_nothing_else_answers_is_the_contracts_500():
    # The engine could not give its plan (a 500 of its own): raise_for_status's error went to uvicorn, which
    # answered text/plain without an id.
    def broken_plan(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, json={"error": "internal"})

    start, body = front_end_answer(broken_plan, "POST", "/v1/classify", [(b"x-request-id", b"plan-1")])
    answer = json.loads(body["body"])
    assert start["status"] == 500 and answer["error"] == "internal" and answer["request_id"] == "plan-1"


def test_an_admin_body_over_the_cap_is_refused_for_its_token_first(server):
    """One process checks the admin token before it reads the body (docs/ab_testing.md): 401/403, not 413."""
    url, big = f"{server.url}/v1/admin/experiments", b'{"pad": "' + b"x" * (2 << 20) + b'"}'
    missing = httpx.post(url, content=big, headers={"content-type": "application/json"})
    assert (missing.status_code, missing.json()["error"]) == (401, "unauthorized")
    assert missing.headers["www-authenticate"].startswith("Bearer")
    # chunked: no length
    wrong = httpx.post(url, content=iter([big]), headers={"authorization": "Bearer wrong"})
    assert (wrong.status_code, wrong.json()["error"]) == (403, "forbidden")
    right = httpx.post(url, content=big, headers={"authorization": f"Bearer {TOKEN}"})
    # authorised: the pass-through cap
    assert (right.status_code, right.json()["error"]) == (413, "too_large")


def test_a_redirect_names_the_address_the_client_reached_not_the_engine(server):
    """Without a valid Host, one process builds a trailing-slash redirect from its own address."""
    for host in (b"", b"host: \r\n", b"host: x:abc\r\n"):
        answer = raw_request(server.port, b"GET /v1/models/ HTTP/1.0\r\n" + host + b"\r\n")
        assert answer.startswith(b"HTTP/1.1 307"), answer
        assert f"location: http://127.0.0.1:{server.port}/v1/models\r\n".encode() in answer, (host, answer)
    given = raw_request(server.port, b"GET /v1/models/ HTTP/1.0\r\nhost: example.org:81\r\n\r\n")
    assert b"location: http://example.org:81/v1/models\r\n" in given, given


def test_front_ends_that_keep_dying_stop_the_server():
    """Three deaths in a row within seconds of starting (a port it cannot bind, a broken install): the server
    exits 1 for its supervisor to see, rather than serve without front-ends. The front-end that did not die
    is stopped by the server (drained), not left to notice it was orphaned."""
    with running_server(tiny_config(), args=["--layout", "frontends", "--http-processes", "2"]) as server:
        survivor, killed = None, set()
        deadline = time.monotonic() + 30
        while server.proc.poll() is None and time.monotonic() < deadline:
            try:
                for child in psutil.Process(server.proc.pid).children():
                    if "server.frontend" not in child.cmdline() or child.pid in killed:
                        continue
                    if survivor is None:
                        survivor = child.pid
                    elif child.pid != survivor:
                        killed.add(child.pid)
                        child.kill()
            except psutil.Error:  # a killed one not yet reaped, or the server gone meanwhile
                pass
            time.sleep(0.1)
        assert server.proc.wait(timeout=30) == 1
        assert "3 front-end processes in a row exited" in server.log()
        time.sleep(1.5)  # an orphaned front-end notices within 0.5 s, and says so
        assert survivor is not None and "is gone: stopping" not in server.log()


def test_a_front_end_process_imports_no_torch():
    """Front-ends stay small (~50 MiB): they decode with PIL and numpy only."""
    import subprocess
    import sys

    code = "import sys, server.frontend; sys.exit('torch' in sys.modules or 'timm' in sys.modules)"
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent, check=True)
