"""The engine's HTTP layer in process: the FastAPI app over httpx's ASGI transport (no socket, no uvicorn),
and `classify()` called directly as the front-end channel calls it. The end-to-end tests run the same
contract against real server processes."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import time
from collections import Counter

import httpx
import numpy as np
import pytest
from PIL import Image
from serverproc import metric_values, sample_images, tiny_config
from starlette.datastructures import Headers, QueryParams

from server.config import parse_config
from server.decode.imaging import decode_image
from server.engine.metrics import Metrics
from server.engine.service import InferenceService
from server.http.app import create_app
from server.http.classify import ClassifyRequest, FrontendResults, classify, classify_decoded
from server.wire.errors import ApiError
from server.wire.protocol import FRONTEND_IMAGES, FRONTEND_MODEL, FRONTEND_MULTIPART, first_values
from server.wire.results import render_results


def app_of(config, **options):
    return create_app(config, InferenceService(config, Metrics(), warmup=False, torch_threads=1), **options)


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    return sample_images()


@pytest.fixture
def app():
    """A fresh app per test: its lifespan's end stops its service for good."""
    return app_of(parse_config(tiny_config()), preprocess_threads=2)


async def running(app, check) -> None:
    """`check(client)` against the app with its lifespan started (models loaded) and then stopped."""
    async with app.router.lifespan_context(app):
        deadline = time.monotonic() + 60
        while not app.state.service.ready.is_set():
            assert time.monotonic() < deadline, "the models did not load"
            await asyncio.sleep(0.05)
        transport = httpx.ASGITransport(app=app, client=("10.1.2.3", 5555))
        async with httpx.AsyncClient(transport=transport, base_url="http://engine") as client:
            await check(client)


def test_classify_over_the_asgi_transport(app, images):
    async def check(client: httpx.AsyncClient) -> None:
        answer = await client.post("/v1/classify", params={"top_k": 3, "variant": "mame-0.9"},
                                   content=images["gradient"], headers={"content-type": "image/png",
                                                                         "x-request-id": "in-process-1"})
        assert answer.status_code == 200 and answer.headers["x-request-id"] == "in-process-1"
        body = answer.json()
        assert (
            body["variant"] == "mame-0.9"
            and body["assignment"] == "override"
            and len(body["predictions"]) == 3
        )
        several = await client.post("/v1/classify", files=[("file", ("a.png", images["flat"], "image/png")),
                                                           ("file", ("b.png", images["noise"], "image/png"))])
        assert [r["variant"] for r in several.json()["results"]] == ["baseline", "baseline"]
        # Refusals are the contract's JSON, counted under their status like any answer.
        bad_top_k = await client.post("/v1/classify", params={"top_k": "many"}, content=images["flat"])
        assert bad_top_k.status_code == 422 and bad_top_k.json()["error"] == "invalid_parameter"
        assert "query.top_k" in bad_top_k.json()["detail"]
        unknown = await client.post("/v1/classify", params={"model": "nope"}, content=images["flat"])
        assert unknown.status_code == 404 and unknown.json()["error"] == "unknown_model"
        metrics = (await client.get("/metrics")).text
        counted = {
            labels: value for labels, value in metric_values(metrics, "mame_requests_total").items() if value
        }
        assert any('"422"' in labels and 'model="tiny"' in labels for labels in counted), counted
        assert any('"200"' in labels and 'variant="mame-0.9"' in labels for labels in counted), counted
        # The query parameters classify() reads itself are documented all the same.
        spec = (await client.get("/openapi.json")).json()["paths"]["/v1/classify"]["post"]
        assert {p["name"] for p in spec["parameters"]} == {"model", "variant", "experiment", "top_k"}
        assert (await client.get("/internal/plan")).status_code == 404  # only behind front-ends

    asyncio.run(running(app, check))


def crop_of(app, data: bytes) -> bytes:
    """The uint8 [H, W, 3] crop a front-end would send for the image."""
    transform = app.state.service.transforms["tiny"]
    return np.ascontiguousarray(transform(decode_image(data, 10**7)).permute(1, 2, 0).numpy()).tobytes()


def decoded_request(crops: list[bytes], model: str = "tiny", query: str = "top_k=2") -> ClassifyRequest:
    headers = Headers({FRONTEND_IMAGES: str(len(crops)), FRONTEND_MODEL: model, FRONTEND_MULTIPART: "0"})
    return ClassifyRequest(
        "decoded-1",
        QueryParams(query),
        headers,
        "10.0.0.9",
        time.monotonic(),
        receive=None,
        crops=b"".join(crops),
    )


async def over_channel(engine, request: ClassifyRequest):
    """classify_decoded(), as the channel calls it for a front-end's request: its one answer (an ApiError
    raised, as classify() raises it)."""
    answers, answered = [], asyncio.Event()

    def reply(answer) -> None:
        answers.append(answer)
        answered.set()

    classify_decoded(engine, request, reply)
    await answered.wait()
    await asyncio.sleep(0.05)  # time for a second answer, which must never come
    assert len(answers) == 1, answers
    if isinstance(answers[0], ApiError):
        raise answers[0]
    return answers[0]


def http_request(body: bytes) -> ClassifyRequest:
    """A request whose body classify() reads and decodes itself (the HTTP route's, without a scope)."""
    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    headers = Headers({"content-type": "image/png", "content-length": str(len(body))})
    return ClassifyRequest("http-1", QueryParams(""), headers, "10.0.0.9", time.monotonic(), receive=receive)


@pytest.mark.parametrize("road", ["classify_decoded", "classify"])
def test_classify_answers_a_decoded_request_as_the_http_route_answers_the_image(app, images, road):
    """The channel's road (classify_decoded(), answering through a callback) and classify() itself, with a
    small request object, no ASGI scope."""
    async def check(client: httpx.AsyncClient) -> None:
        engine = app.state.engine
        answer_of = over_channel if road == "classify_decoded" else classify
        over_http = (await client.post("/v1/classify", params={"top_k": 2}, content=images["shapes"])).json()
        answer = await answer_of(engine, decoded_request([crop_of(app, images["shapes"])]))
        assert isinstance(answer, FrontendResults)  # rendered by the front-end, with the plan's labels
        answers_of = {name: (info.weights, info.labels) for name, info in engine.service.models.items()}
        decoded = json.loads(render_results(answer.message, answers_of))
        assert decoded["predictions"] == over_http["predictions"] and decoded["request_id"] == "decoded-1"
        # Crops made for another model than the route's: a re-route (409), not an answer, not counted.
        before = metric_values((await client.get("/metrics")).text, "mame_requests_total")
        reroute = await answer_of(engine, decoded_request([crop_of(app, images["flat"])], model="other"))
        assert reroute.status_code == 409
        assert metric_values((await client.get("/metrics")).text, "mame_requests_total") == before
        with pytest.raises(ApiError) as refused:  # the caller answers it, as the contract says
            await answer_of(engine, decoded_request([crop_of(app, images["flat"])], query="top_k=0"))
        assert refused.value.status == 422

    asyncio.run(running(app, check))


def test_a_decoded_request_past_its_deadline_answers_504_and_the_next_is_answered(app, images):
    """The deadline fails a queued request on the channel's road as on classify()'s: 504 `timeout`, its
    places given back, and the request after it answered."""
    async def check(client: httpx.AsyncClient) -> None:
        engine, crop = app.state.engine, crop_of(app, images["shapes"])
        timeout_s = engine.config.limits.request_timeout_s
        late = decoded_request([crop])
        late = ClassifyRequest(late.request_id, late.query, late.headers, late.client_host,
                               time.monotonic() - timeout_s + 0.001, receive=None, crops=late.crops)
        with pytest.raises(ApiError) as refused:
            await over_channel(engine, late)
        assert refused.value.status == 504 and refused.value.code == "timeout"
        assert engine.service.scheduler.pending("tiny") == 0
        assert isinstance(await over_channel(engine, decoded_request([crop])), FrontendResults)

    asyncio.run(running(app, check))


def test_requests_before_the_models_load_are_not_ready():
    app = app_of(parse_config(tiny_config()))

    async def check() -> None:  # no lifespan: nothing loads
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://engine") as client:
            answer = await client.post("/v1/classify", content=b"x")
            assert answer.status_code == 503 and answer.json()["error"] == "not_ready"
            assert (await client.get("/readyz")).json() == {"status": "loading"}

    asyncio.run(check())


def test_a_channel_requests_headers_read_as_starlette_reads_them():
    """Names in any case, a repeated header's first value: what Starlette's Headers.get gives."""
    pairs = [["X-Variant-Key", "first"], ["accept", "*/*"], ["x-variant-key", "second"],
             ["X-Mame-Images", "2"]]
    starlette = Headers(raw=[(name.lower().encode(), value.encode()) for name, value in pairs])
    headers = first_values(pairs)
    for name in ("x-variant-key", "accept", "x-mame-images", "missing"):
        assert headers.get(name) == starlette.get(name)
    assert list(headers.items()) == [("x-variant-key", "first"), ("accept", "*/*"), ("x-mame-images", "2")]


def test_healthz_fails_while_the_event_loop_is_blocked_and_says_where(caplog):
    """A call that blocks the event loop (time.sleep in a callback on it, as a blocking call in a handler
    would) past health.loop_stall_s: the probes that waited through it answer 503 `unresponsive`, the log says
    where the loop was stuck, and the next tick makes them 200 again."""
    app = app_of(parse_config(tiny_config(health={"loop_stall_s": 0.4})), preprocess_threads=1)

    def a_blocking_call() -> None:
        time.sleep(1.2)

    async def check(client: httpx.AsyncClient) -> None:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        asyncio.get_running_loop().call_soon(a_blocking_call)
        probes = await asyncio.gather(client.get("/healthz"), client.get("/readyz"))
        for probe in probes:
            assert probe.status_code == 503, probe.text
            assert probe.json()["status"] == "unresponsive" and "did not run for" in probe.json()["detail"]
        await asyncio.sleep(0.5)  # the next tick, on time
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        assert (await client.get("/readyz")).status_code == 200
        lag = metric_values((await client.get("/metrics")).text, "mame_event_loop_lag_seconds_bucket")
        assert lag['{le="0.5"}'] < lag['{le="2.0"}'], lag  # the late tick, in the histogram

    with caplog.at_level("ERROR", logger="mame.server"):
        asyncio.run(running(app, check))
    assert any("a_blocking_call" in record.getMessage() for record in caplog.records), caplog.text


def test_a_small_image_is_not_decoded_behind_a_large_one():
    """Large images decode in a lane of their own: with one decoding thread for small images, a small request
    sent while a 36 Mpx PNG decodes is answered before it."""
    app = app_of(parse_config(tiny_config()), preprocess_threads=1)
    buffer = io.BytesIO()
    Image.new("I;16", (6000, 6000)).save(buffer, "PNG")
    large = buffer.getvalue()

    async def check(client: httpx.AsyncClient) -> None:
        sent = asyncio.create_task(client.post("/v1/classify", content=large))
        while app.state.engine.pixels.in_use == 0:  # the large image is being decoded
            await asyncio.sleep(0.005)
        small = await client.post("/v1/classify", content=sample_images()["flat"])
        assert small.status_code == 200 and not sent.done()
        assert (await sent).status_code == 200

    asyncio.run(running(app, check))


def test_an_answered_request_leaves_no_cyclic_garbage(app, images):
    """The server collects its youngest generation rarely (collector_for_serving): cheap only while answering
    a request, decoded here or by a front-end, leaves nothing that only the cyclic collector can free."""
    async def check(client: httpx.AsyncClient) -> None:
        engine, crop = app.state.engine, crop_of(app, images["shapes"])

        async def answer_both() -> None:
            assert isinstance(await over_channel(engine, decoded_request([crop])), FrontendResults)
            request = http_request(images["shapes"])
            assert (await classify(engine, request)).status_code == 200

        await answer_both()  # first calls fill caches (label children, views)
        gc.collect()
        gc.disable()
        try:
            for _ in range(10):
                await answer_both()
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
            garbage = Counter(type(o).__qualname__ for o in gc.garbage)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
        assert not garbage, garbage

    asyncio.run(running(app, check))
