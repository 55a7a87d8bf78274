"""End-to-end: a real `python -m server` process on loopback with a tiny ViT, real HTTP clients."""

from __future__ import annotations

import asyncio
import io
import json
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid

import httpx
import pytest
from PIL import Image
from serverproc import metric_values, running_server, sample_images, tiny_config

pytestmark = pytest.mark.e2e

VARIANTS = ["baseline", "mame-0.5", "tome-r8"]


async def post_many(url: str, jobs: list[tuple[str, bytes, dict]]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(jobs), max_keepalive_connections=len(jobs))
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        return await asyncio.gather(
            *(
                client.post(
                    f"{url}/v1/classify", params=params, content=data, headers={"content-type": "image/png"}
                )
                for _, data, params in jobs
            )
        )


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    return sample_images()


# The two process layouts (docs/architecture.md), and front-ends sending crops in their messages.
PROCESS_LAYOUTS = {
    "single": ["--layout", "single"],  # the default on CPU
    "frontends": ["--layout", "frontends", "--http-processes", "2"],  # the default with CUDA
    "frontends, crops in messages": [
        "--layout",
        "frontends",
        "--http-processes",
        "2",
        "--crop-arena-slots",
        "0",
    ],
}


# Every test of the module-wide server runs in each layout.
@pytest.fixture(scope="module", params=list(PROCESS_LAYOUTS))
def server(request):
    config = tiny_config(batching={"max_batch_size": 16, "max_wait_ms": 100, "max_queue": 256},
                         limits={"max_body_bytes": 300_000, "max_pixels": 1_000_000, "request_timeout_s": 30})
    config["models"]["tiny"]["weights"] = "auto"  # offline here (HF_HUB_OFFLINE=1): random-init, said so
    args = [*PROCESS_LAYOUTS[request.param], "--preprocess-threads", "2"]
    with running_server(config, args=args) as proc:
        yield proc


def test_64_concurrent_requests_over_3_variants_are_batched(server, images):
    pictures = list(images.values())
    jobs = [(VARIANTS[i % 3], pictures[i % len(pictures)], {"variant": VARIANTS[i % 3]}) for i in range(64)]
    responses = asyncio.run(post_many(server.url, jobs))
    assert [r.status_code for r in responses] == [200] * 64, [
        r.text for r in responses if r.status_code != 200
    ]
    for (variant, _, _), response in zip(jobs, responses):
        answer = response.json()
        assert answer["variant"] == variant and answer["model"] == "tiny"
        assert answer["weights"] == "random-init"
        assert response.headers["x-request-id"] == answer["request_id"]
        assert len(answer["predictions"]) == 5
        tokens = answer["tokens"]
        assert (
            tokens["input"] == 65
            and len(tokens["per_block"]) == 4
            and tokens["final"] == tokens["per_block"][-1]
        )
        assert set(answer["timings_ms"]) == {"queue", "inference", "total"}
    assert max(r.json()["batch_size"] for r in responses) > 1
    metrics = httpx.get(f"{server.url}/metrics").text
    count = sum(metric_values(metrics, "mame_batch_size_count").values())
    total = sum(metric_values(metrics, "mame_batch_size_sum").values())
    assert total / count > 1, "the batch-size histogram shows no batch larger than 1"
    bucket_1 = sum(v for k, v in metric_values(metrics, "mame_batch_size_bucket").items() if 'le="1.0"' in k)
    assert bucket_1 < count
    ok = metric_values(metrics, "mame_requests_total")
    for variant in VARIANTS:
        key = f'{{experiment="",model="tiny",status="200",variant="{variant}"}}'
        assert ok[key] >= 21, ok


def test_answers_in_a_batch_equal_answers_alone(server, images):
    alone = {}
    for name, data in images.items():
        response = httpx.post(f"{server.url}/v1/classify", params={"variant": "mame-0.5", "top_k": 10},
                              content=data, headers={"content-type": "image/png"})
        assert response.status_code == 200
        alone[name] = response.json()
    files = [("file", (f"{name}.png", data, "image/png")) for name, data in images.items()]
    together = httpx.post(f"{server.url}/v1/classify", params={"variant": "mame-0.5", "top_k": 10},
                          files=files, timeout=60)
    assert together.status_code == 200, together.text
    results = together.json()["results"]
    assert len(results) == len(images)
    assert all(r["batch_size"] == len(images) for r in results)
    assert len({tuple(r["tokens"]["per_block"]) for r in results}) > 1, "pick images that merge differently"
    for name, batched in zip(images, results):
        single = alone[name]
        assert single["batch_size"] == 1
        assert batched["tokens"] == single["tokens"], name
        assert [p["index"] for p in batched["predictions"]] == [p["index"] for p in single["predictions"]], (
            name
        )
        for a, b in zip(batched["predictions"], single["predictions"]):
            assert a["score"] == pytest.approx(b["score"], abs=2e-6)


def post(server, data: bytes = b"", content_type: str = "image/png", **params) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/classify", params=params, content=data,
                      headers={"content-type": content_type}, timeout=30)


def png(width: int, height: int, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


def test_bad_requests_and_vanishing_clients_do_not_disturb_good_ones_in_flight(server, images):
    """Good images sent among undecodable, oversized and half-sent requests, all at once: every good one gets
    the answer it gets alone, every bad one its own error."""
    alone = {name: httpx.post(f"{server.url}/v1/classify", params={"variant": "mame-0.5"}, content=data,
                              headers={"content-type": "image/png"}).json() for name, data in images.items()}

    def vanish() -> None:  # sends half a body and leaves
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(b"POST /v1/classify HTTP/1.1\r\nhost: x\r\ncontent-type: image/png\r\n"
                         b"content-length: 9000\r\n\r\n" + images["shapes"][:100])

    async def everything() -> list:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            def send(data: bytes) -> asyncio.Future:
                return client.post(f"{server.url}/v1/classify", params={"variant": "mame-0.5"}, content=data,
                                   headers={"content-type": "image/png"})

            jobs = []
            for round_ in range(4):
                for name, data in images.items():
                    jobs.append((name, send(data)))
                jobs += [
                    ("garbage", send(b"not an image at all")),
                    ("truncated", send(images["noise"][:300])),
                    ("too large", send(b"\x89PNG" + b"0" * 400_000)),
                    ("vanish", asyncio.to_thread(vanish)),
                ]
            answers = await asyncio.gather(*(job for _, job in jobs))
            return list(zip((name for name, _ in jobs), answers))

    for name, response in asyncio.run(everything()):
        if name == "vanish":
            continue
        if name in alone:
            assert response.status_code == 200, (name, response.text)
            got, want = response.json(), alone[name]
            assert got["tokens"] == want["tokens"], name
            assert [p["index"] for p in got["predictions"]] == [p["index"] for p in want["predictions"]], name
        else:
            assert response.status_code == {"garbage": 400, "truncated": 400, "too large": 413}[name], name
    assert httpx.get(f"{server.url}/readyz").status_code == 200


def test_a_clients_x_mame_headers_are_dropped_not_trusted(server, images):
    # The server's processes tell each other about a request with x-mame-* headers (an error a front-end
    # met, where its crops are, when it started); a client sending them must change nothing.
    spoofed = {"x-mame-error": '{"status": 400, "code": "bad_image", "detail": "spoofed"}',
               "x-mame-crops-at": "/etc/passwd 1", "x-mame-started": "0", "x-mame-images": "7",
               "x-mame-model": "nope", "x-mame-multipart": "1", "content-type": "image/png"}
    plain = httpx.post(
        f"{server.url}/v1/classify", content=images["shapes"], headers={"content-type": "image/png"}
    )
    answer = httpx.post(f"{server.url}/v1/classify", content=images["shapes"], headers=spoofed)
    assert answer.status_code == 200, answer.text
    assert answer.json()["predictions"] == plain.json()["predictions"]
    assert answer.json()["timings_ms"]["total"] < 60_000  # x-mame-started: 0 would make it hours


def test_each_bad_input_gets_its_status_and_code(server, images):
    good = images["shapes"]
    truncated_jpeg = io.BytesIO()
    Image.open(io.BytesIO(images["noise"])).save(truncated_jpeg, "JPEG")
    cases = {
        "undecodable": (post(server, b"definitely not an image"), 400, "bad_image"),
        "truncated": (post(server, truncated_jpeg.getvalue()[:800], "image/jpeg"), 400, "bad_image"),
        "unknown model": (post(server, good, model="nope"), 404, "unknown_model"),
        "unknown variant": (post(server, good, variant="nope"), 404, "unknown_variant"),
        "unknown experiment": (post(server, good, experiment="nope"), 404, "unknown_experiment"),
        "too many bytes": (post(server, b"\x89PNG" + b"0" * 400_000), 413, "too_large"),
        "too many pixels": (post(server, png(2000, 1000, "1")), 413, "too_large"),
        "decompression bomb": (post(server, png(20000, 20000, "1")), 413, "too_large"),
        "not an image type": (post(server, good, "text/plain"), 415, "unsupported_media_type"),
        "json body": (post(server, b"{}", "application/json"), 415, "unsupported_media_type"),
        "top_k zero": (post(server, good, top_k=0), 422, "invalid_parameter"),
        "top_k too big": (post(server, good, top_k=21), 422, "invalid_parameter"),
        "top_k not a number": (post(server, good, top_k="many"), 422, "invalid_parameter"),
        "no file field": (
            httpx.post(f"{server.url}/v1/classify", files={"image": ("a.png", good, "image/png")}),
            422,
            "invalid_parameter",
        ),
        "too many files": (
            httpx.post(
                f"{server.url}/v1/classify",
                files=[("file", (f"{i}.png", good, "image/png")) for i in range(33)],
            ),
            413,
            "too_large",
        ),
        "malformed multipart": (
            post(server, b"--nope\r\ngarbage", "multipart/form-data; boundary=xyz"),
            400,
            "bad_image",
        ),
        "file part not an image": (
            httpx.post(f"{server.url}/v1/classify", files={"file": ("a.txt", b"hello", "text/plain")}),
            415,
            "unsupported_media_type",
        ),
    }
    for name, (response, status, code) in cases.items():
        assert response.status_code == status, (name, response.text)
        body = response.json()
        assert body["error"] == code, (name, body)
        assert body["detail"] and body["request_id"] == response.headers["x-request-id"], name
    metrics = httpx.get(f"{server.url}/metrics").text
    counted = metric_values(metrics, "mame_requests_total")
    # A client-chosen model name never becomes a label value (unbounded series): it counts under model "".
    assert counted['{experiment="",model="",status="404",variant=""}'] >= 1
    assert not any('model="nope"' in key for key in counted)
    assert any('status="413"' in key for key in counted)
    # Every answer is counted, a bad top_k too (read before anything else, as FastAPI did); an unknown variant
    # of the default model counts under that model, as if it had been named.
    assert counted['{experiment="",model="tiny",status="422",variant=""}'] >= 3
    assert counted['{experiment="",model="tiny",status="404",variant=""}'] >= 1


def raw_exchange(server, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes on a new connection, read until the server closes it: (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def test_http_level_refusals_are_the_contracts_json_with_an_id(server, images):
    # What the HTTP parser refuses (a DEL in a header value) was uvicorn's text/plain 400 without an id.
    status, headers, body = raw_exchange(server, b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-bad: a\x7fb\r\n\r\n")
    assert (status, headers["content-type"]) == (400, "application/json"), body
    assert (
        json.loads(body)["error"] == "http_error"
        and json.loads(body)["request_id"] == headers["x-request-id"]
    )
    # A head of any size was kept in memory (300 MB grew the server by 166 MB): over 64 KiB it is a 431.
    status, headers, body = raw_exchange(server, b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: "
                                         + b"a" * 100_000 + b"\r\n\r\n")
    assert (status, json.loads(body)["error"]) == (431, "http_error"), body
    assert headers["x-request-id"] and headers["connection"] == "close"
    # A head just under the limit, with a body in the same packet, is an ordinary request.
    small = images["shapes"]
    status, _, body = raw_exchange(server, b"POST /v1/classify HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"
                                   b"content-type: image/png\r\nx-pad: " + b"a" * 60_000
                                   + b"\r\ncontent-length: %d\r\n\r\n" % len(small) + small)
    assert status == 200, body
    # A 405 says what is allowed (RFC 9110: it must).
    refused = httpx.delete(f"{server.url}/v1/classify")
    assert (refused.status_code, refused.json()["error"]) == (405, "method_not_allowed")
    assert refused.headers["allow"] == "POST"
    # Files and other fields together are capped (parsing work); the answer says parts, not files.
    fields = {f"note{i}": "x" for i in range(48)}
    too_many = httpx.post(
        f"{server.url}/v1/classify", data=fields, files={"file": ("a.png", small, "image/png")}
    )
    assert (too_many.status_code, too_many.json()["error"]) == (413, "too_large")
    assert "too many multipart parts" in too_many.json()["detail"], too_many.text


def test_a_file_field_without_a_filename_is_an_image(server, images):
    """What `curl -F 'file=<cat.png'` sends: a form field named file, no filename."""
    body = (b'--b\r\nContent-Disposition: form-data; name="file"\r\nContent-Type: image/png\r\n\r\n'
            + images["shapes"] + b"\r\n--b--\r\n")
    response = post(server, body, "multipart/form-data; boundary=b")
    assert response.status_code == 200, response.text
    assert response.json()["predictions"]


def test_a_client_that_leaves_mid_body_is_counted_as_499_not_a_server_error(server):
    """Nobody reads that answer; counted as a server error it fed the error-rate alert and the A/B errors."""
    def counted(status: str) -> float:
        values = metric_values(httpx.get(f"{server.url}/metrics").text, "mame_requests_total")
        return sum(v for k, v in values.items() if f'status="{status}"' in k)

    before, errors_before = counted("499"), counted("500")
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/classify HTTP/1.1\r\nhost: x\r\ncontent-type: image/png\r\n"
                     b"content-length: 5000\r\n\r\n" + b"\x89PNG" * 25)
    deadline = time.monotonic() + 10
    while counted("499") == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert counted("499") == before + 1 and counted("500") == errors_before


def test_models_health_readiness_docs(server, images):
    models = httpx.get(f"{server.url}/v1/models").json()
    assert models["default_model"] == "tiny"
    (tiny,) = models["models"]
    assert tiny["weights"] == "random-init" and tiny["device"] == "cpu" and tiny["dtype"] == "float32"
    assert tiny["input_size"] == [3, 64, 64] and tiny["default_variant"] == "baseline"
    assert tiny["variants"]["mame-0.5"]["tau"] == 0.5 and tiny["variants"]["tome-r8"]["r"] == 8
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    for path in ("/healthz", "/readyz", "/metrics"):  # load balancers probe with HEAD
        head = httpx.head(f"{server.url}{path}")
        assert head.status_code == 200 and head.content == b"" and head.headers["x-request-id"], path
    assert httpx.head(f"{server.url}/healthz").headers["content-length"] == "15"  # the GET's: {"status":"ok"}
    openapi = httpx.get(f"{server.url}/openapi.json").json()
    classify = openapi["paths"]["/v1/classify"]["post"]
    assert {"multipart/form-data", "image/*"} <= set(classify["requestBody"]["content"])  # /docs can send one
    assert {"400", "413", "415", "422", "503", "504"} <= set(classify["responses"])
    multipart = classify["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert multipart["properties"]["file"]["minItems"] == 1
    top_k = next(p for p in classify["parameters"] if p["name"] == "top_k")["schema"]
    assert (top_k["minimum"], top_k["maximum"]) == (1, 20)  # limits.max_top_k
    assert set(classify["responses"]["200"]["content"]["application/json"]["schema"]["anyOf"][0]) == {"$ref"}
    for probe in ("/readyz", "/healthz"):
        answers = openapi["paths"][probe]["get"]["responses"]
        assert answers["503"]["content"]["application/json"]["schema"]["$ref"].endswith("/Readiness")
    # Every documented error is the contract's body (FastAPI's HTTPValidationError is not what 422s are).
    assert "ValidationError" not in json.dumps(openapi)
    # The contract's error body everywhere but the probes' 503 (their own answer) and /v2 (the protocol's).
    errors = [answer for name, path in openapi["paths"].items()
              if not name.startswith(("/v2", "/readyz", "/healthz"))
              for operation in path.values() for status, answer in operation["responses"].items()
              if status >= "4"]
    assert errors and all(
        a["content"]["application/json"]["schema"]["required"] == ["error", "detail", "request_id"]
        for a in errors
    )
    assert set(openapi["paths"]["/v1/admin/experiments"]["post"]["responses"]) >= {"401", "403", "404", "409"}
    assert "text/plain" in openapi["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    schemas = openapi["components"]["schemas"]
    assert schemas["NewExperiment"]["properties"]["name"]["pattern"]
    assert schemas["SplitChange"]["properties"]["split"]["minProperties"] == 1
    assert httpx.get(f"{server.url}/docs").status_code == 200
    given = uuid.uuid4().hex
    assert (
        httpx.get(f"{server.url}/healthz", headers={"x-request-id": given}).headers["x-request-id"] == given
    )
    missing = httpx.get(f"{server.url}/no/such/path")
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    # one answered request of its own: under pytest-xdist this test may be the first on its server
    assert post(server, images["flat"]).status_code == 200
    metrics = httpx.get(f"{server.url}/metrics").text
    assert metric_values(metrics, "mame_model_info") == {
        '{arch="vit_tiny_patch16_224",device="cpu",dtype="float32",model="tiny",weights="random-init"}': 1.0}
    for name in ("mame_request_duration_seconds_bucket", "mame_queue_wait_seconds_bucket",
                 "mame_batch_inference_seconds_bucket", "mame_final_tokens_bucket", "mame_gflops_bucket",
                 "mame_queue_depth", "mame_in_flight_requests", "mame_images_total"):
        assert metric_values(metrics, name), name


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Prometheus) is not installed")
def test_metrics_pass_promtool(server, images):
    post(server, images["flat"])
    text = httpx.get(f"{server.url}/metrics").text
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True,
                            check=False)
    # promtool exits 1 on lint hints as well as on errors; errors are what would break scraping.
    assert "error" not in result.stderr.lower() and "error" not in result.stdout.lower(), result
    # Only the contract's names: no prometheus_client `_created` gauge doubling every series.
    assert "_created" not in text


def test_burst_on_a_tiny_queue_gives_fast_503s_and_no_other_5xx(images):
    config = tiny_config(batching={"max_batch_size": 2, "max_wait_ms": 50, "max_queue": 3})
    with running_server(config) as server:
        data = images["text"]
        jobs = [("baseline", data, {})] * 48
        started = time.monotonic()
        responses = asyncio.run(post_many(server.url, jobs))
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 503}, statuses
        assert statuses.count(503) > 0 and statuses.count(200) > 0
        for r in responses:
            if r.status_code == 503:
                assert r.json()["error"] == "overloaded" and int(r.headers["retry-after"]) >= 1
        rejected = [r.elapsed.total_seconds() for r in responses if r.status_code == 503]
        answered = [r.json()["timings_ms"]["total"] / 1000 for r in responses if r.status_code == 200]
        print(f"burst of 48 in {time.monotonic() - started:.2f} s: {statuses.count(200)} x 200, "
              f"{statuses.count(503)} x 503; slowest 503 {max(rejected) * 1000:.0f} ms, "
              f"slowest 200 {max(answered) * 1000:.0f} ms")
        metrics = httpx.get(f"{server.url}/metrics").text
        counted = metric_values(metrics, "mame_requests_total")
        assert counted['{experiment="",model="tiny",status="200",variant="baseline"}'] == statuses.count(200)
        assert counted['{experiment="",model="tiny",status="503",variant="baseline"}'] == statuses.count(503)
        assert metric_values(metrics, "mame_queue_depth")['{model="tiny",variant="baseline"}'] == 0
        # More images than the queue holds can never be taken: a 413 at once, not a 503 to retry for ever.
        whole = httpx.post(f"{server.url}/v1/classify", files=[("file", (f"{i}.png", data, "image/png"))
                                                               for i in range(4)])
        assert (whole.status_code, whole.json()["error"]) == (413, "too_large"), whole.text
        assert "queues at most 3" in whole.json()["detail"]


@pytest.mark.parametrize("layout", ["single", "frontends"])
def test_request_past_its_deadline_gets_504_and_a_stalled_body_or_head_408(images, layout):
    # Batches wait up to 3 s to fill, the deadline is 0.5 s: the request times out in the queue.
    config = tiny_config(batching={"max_batch_size": 64, "max_wait_ms": 3000},
                         limits={"request_timeout_s": 0.5})
    with running_server(config, args=PROCESS_LAYOUTS[layout]) as server:
        response = post(server, images["flat"])
        assert response.status_code == 504 and response.json()["error"] == "timeout"
        # A body that stops coming (a stalled or slowloris upload) does not hold its connection for ever.
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(b"POST /v1/classify HTTP/1.1\r\nhost: x\r\ncontent-type: image/png\r\n"
                         b"content-length: 5000\r\n\r\n\x89PNG")
            answer = b""
            while b"}" not in answer and (chunk := sock.recv(65536)):  # the head and the JSON may come apart
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in answer, answer
        # Nor do headers that stop coming (uvicorn alone waits for them for ever), nor a silent connection.
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(b"POST /v1/classify HTTP/1.1\r\nhost: x\r\ncontent-ty")
            answer = b""
            while chunk := sock.recv(65536):  # until the server closes the connection
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in answer, answer
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            assert sock.recv(65536) == b""  # closed, without an answer to a request never begun
        assert httpx.get(f"{server.url}/healthz").status_code == 200


@pytest.mark.parametrize("layout", ["single", "frontends"])
def test_sigterm_under_load_answers_every_accepted_request(images, layout):
    config = tiny_config(batching={"max_batch_size": 4, "max_wait_ms": 30, "max_queue": 1000})
    with running_server(config, args=["--log-level", "debug", *PROCESS_LAYOUTS[layout]]) as server:
        outcomes: dict[str, object] = {}
        first_answers = threading.Semaphore(0)

        def client(request_id: str) -> None:
            try:
                response = httpx.post(f"{server.url}/v1/classify", content=images["gradient"], timeout=60,
                                      headers={"content-type": "image/png", "x-request-id": request_id,
                                               "connection": "close"})
                outcomes[request_id] = response.status_code
            except httpx.TransportError as exc:  # refused or reset before the server accepted it
                outcomes[request_id] = type(exc).__name__
            first_answers.release()

        threads = [threading.Thread(target=client, args=(f"req-{i:03d}",)) for i in range(80)]
        for thread in threads:
            thread.start()
            time.sleep(0.005)
        for _ in range(5):
            first_answers.acquire(timeout=30)
        server.proc.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(60)
        # uvicorn re-raises the SIGTERM after its graceful stop, so the exit status is -SIGTERM.
        assert server.proc.wait(timeout=60) in (0, -signal.SIGTERM)
        log = server.log()
    accepted = set(re.findall(r"request (req-\d+) accepted", log))
    answered = dict(re.findall(r"request (req-\d+) answered (\d+)", log))
    ok = {rid for rid, outcome in outcomes.items() if outcome == 200}
    print(f"{len(ok)} answered 200, {len(outcomes) - len(ok)} not accepted: "
          f"{sorted({str(o) for o in outcomes.values()})}")
    assert len(outcomes) == 80
    assert accepted == set(answered) == ok, (accepted ^ ok, answered)
    assert set(answered.values()) == {"200"}
    assert all(outcome == 200 or isinstance(outcome, str) for outcome in outcomes.values()), outcomes
    assert len(ok) > 5


def test_a_dead_device_process_fails_its_requests_and_stops_the_server(images):
    """Killed (out of host memory, a driver crash): requests answer 500 at once instead of hanging, /readyz
    says failed, and the server exits non-zero so that its supervisor restarts it. The front-ends stop first,
    while the server
    process still answers what they hold."""
    import psutil

    config = tiny_config(batching={"max_batch_size": 4, "max_wait_ms": 500})
    with running_server(config, args=["--layout", "frontends", "--http-processes", "1"]) as server:
        assert post(server, images["flat"]).status_code == 200
        children = psutil.Process(server.proc.pid).children()
        device_process = next(c for c in children if "multiprocessing" in " ".join(c.cmdline())
                              and "resource_tracker" not in " ".join(c.cmdline()))  # decoding: in threads
        waiting = []  # queued behind max_wait_ms when the device process dies
        thread = threading.Thread(target=lambda: waiting.append(post(server, images["text"])))
        thread.start()
        time.sleep(0.2)
        device_process.kill()
        thread.join(30)
        assert waiting and waiting[0].status_code == 500, waiting
        assert waiting[0].json()["error"] == "internal" and "device process" in waiting[0].json()["detail"]
        assert server.proc.wait(timeout=60) == 1
        assert "device process for cpu died" in server.log()


def test_an_unexpected_error_is_the_contracts_500_and_keeps_the_connection():
    """A bug in a handler: Starlette answered text/plain without an id, and uvicorn then closed the connection
    under the client's next request. A real uvicorn on loopback, one keep-alive connection."""
    import uvicorn
    from fastapi import FastAPI

    from server.http.middleware import RequestIdMiddleware

    app = FastAPI()

    @app.get("/broken")
    async def broken():
        raise RuntimeError("a bug")

    @app.get("/fine")
    async def fine():
        return {"ok": True}

    app.add_middleware(RequestIdMiddleware)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, log_level="critical"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 10
            while not server.started and time.monotonic() < deadline:
                time.sleep(0.05)
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                conn.sendall(b"GET /broken HTTP/1.1\r\nhost: x\r\nx-request-id: bug-1\r\n\r\n")
                answer = conn.recv(65536)
                head, _, body = answer.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 500") and b"x-request-id: bug-1" in head, answer
                assert json.loads(body)["error"] == "internal" and "bug-1" in json.loads(body)["detail"]
                conn.sendall(b"GET /fine HTTP/1.1\r\nhost: x\r\n\r\n")  # the same connection, still open
                assert conn.recv(65536).startswith(b"HTTP/1.1 200"), "the connection was closed"
        finally:
            server.should_exit = True
            thread.join(10)


def test_docs_page_loads_only_from_the_server(server):
    """/docs works offline: the page and everything it loads come from the server's own paths."""
    page = httpx.get(f"{server.url}/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "://" not in page.text and '"validatorUrl": null' in page.text  # no other host, no validator badge
    references = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)""", page.text)
    references += re.findall(r"""\burl:\s*["']([^"']+)""", page.text)
    assert len(references) == 4 and all(r.startswith("/") and not r.startswith("//") for r in references)
    types = {".js": "text/javascript", ".css": "text/css", ".png": "image/png", ".json": "application/json"}
    for reference in references:
        asset = httpx.get(f"{server.url}{reference}")
        expected = next(kind for suffix, kind in types.items() if reference.endswith(suffix))
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(expected), reference
        assert len(asset.content) > 500, reference
    assert httpx.get(f"{server.url}/redoc").status_code == 404  # FastAPI's ReDoc page loads from a CDN
