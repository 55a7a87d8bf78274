"""The Open Inference Protocol codec (server/oip) against the real Triton client, tritonclient[http].

Requests are built by tritonclient exactly as its users build them (InferInput.set_data_from_numpy,
InferRequestedOutput with class_count) and answers are read back by it (InferResult.as_numpy). The last
tests serve the route table (server/oip/handlers.py ROUTES) on loopback as its docstring prescribes and
talk to it with InferenceServerClient. The engine there is a stand-in that records what reached it and
answers fixed results: the server's own engine is wired to these routes by the HTTP layer.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton
import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route as StarletteRoute
from tritonclient.utils import InferenceServerException

from server.oip.handlers import ROUTES, Reply, infer
from server.oip.interface import (
    OUTPUT_NAMES,
    Classification,
    ClassifiedImage,
    ClassifyCall,
    ModelSpec,
)
from server.oip.metadata import model_metadata
from server.oip.plan import plan_infer
from server.oip.request import parse_infer_request, read_input
from server.oip.response import infer_response
from server.wire.errors import ApiError, overloaded

CLASSES = 10
LABELS = tuple(f"class {i}" for i in range(CLASSES - 1)) + ("odd: label",)  # a ':' inside a label
SPEC = ModelSpec("tiny", ("baseline", "mame-0.9"), "baseline", (3, 8, 8), LABELS,
                 (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), depth=4, arch="vit_tiny",
                 weights="random-init")


def result_for(image_index: int, top_k: int) -> ClassifiedImage:
    """A fixed, image-dependent answer: probabilities falling with the class index, shifted per image."""
    order = [(image_index + j) % CLASSES for j in range(CLASSES)]
    raw = np.array([2.0 ** -j for j in range(CLASSES)])
    scores = tuple(float(s) for s in (raw / raw.sum())[:top_k])
    return ClassifiedImage(tuple(order[:top_k]), scores, 17, (17, 12 - image_index, 9, 7), 0.25 + image_index)


class StandInEngine:
    """Records each call; answers `result_for` per image on the variant asked for (else the default)."""

    def __init__(self, loading: bool = False, failure: ApiError | None = None) -> None:
        self.calls: list[tuple[ClassifyCall, Any]] = []
        self.refusals: list[tuple[str, int]] = []
        self.loading = loading
        self.failure = failure

    def ready(self) -> bool:
        return not self.loading

    def models(self) -> Mapping[str, ModelSpec | None]:
        return {"tiny": None if self.loading else SPEC}

    def max_images(self) -> int:
        return 4

    async def classify(self, call: ClassifyCall, context: Any) -> Classification:
        self.calls.append((call, context))
        if self.failure is not None:
            raise self.failure
        variant = call.variant or "mame-0.9"
        assignment = "override" if call.variant else "assigned"
        return Classification(call.model, variant, call.experiment, assignment, "random-init",
                              tuple(result_for(i, call.top_k) for i in range(len(call.images))))

    def record_refusal(self, model: str, status: int, context: Any) -> None:
        self.refusals.append((model, status))


def encoded_images(n: int) -> list[bytes]:
    """PNG files (bytes that are not UTF-8, as real image files)."""
    files = []
    for i in range(n):
        buffer = io.BytesIO()
        Image.new("RGB", (5 + i, 7), (40 * i, 200, 17)).save(buffer, format="PNG")
        files.append(buffer.getvalue())
    return files


def bytes_input(files: list[bytes], binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("images", [len(files)], "BYTES")
    tensor.set_data_from_numpy(np.array(files, dtype=np.object_), binary_data=binary)
    return tensor


def tensor_input(name: str, array: np.ndarray, binary: bool) -> triton.InferInput:
    datatype = {np.dtype(np.uint8): "UINT8", np.dtype(np.float32): "FP32"}[array.dtype]
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def request_body(inputs, outputs=None, **options) -> tuple[bytes, dict[str, str]]:
    body, header_length = triton.InferenceServerClient.generate_request_body(inputs, outputs, **options)
    headers = {} if header_length is None else {"Inference-Header-Content-Length": str(header_length)}
    return body, headers


def serve(engine: StandInEngine, body: bytes, headers: dict[str, str], version: str | None = None) -> Reply:
    params = {"model": "tiny"} if version is None else {"model": "tiny", "version": version}
    return asyncio.run(infer(engine, params, body, headers, context="the request"))


def read_result(reply: Reply) -> triton.InferResult:
    assert reply.status == 200, reply.body
    header_length = reply.headers.get("Inference-Header-Content-Length")
    return triton.InferenceServerClient.parse_response_body(
        reply.body, header_length=int(header_length) if header_length else None)


def error_of(reply: Reply) -> str:
    document = json.loads(reply.body)
    assert list(document) == ["error"], document  # the protocol's error body, nothing else
    return document["error"]


# --- requests as tritonclient builds them -------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False])
def test_encoded_images_reach_the_engine_byte_for_byte(binary):
    files = encoded_images(3)
    if binary:
        body, headers = request_body([bytes_input(files)])
    else:  # JSON only: the files as base64 strings, marked as such
        # (tritonclient cannot send raw bytes in JSON)
        document = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [3],
                                "parameters": {"content_type": "base64"},
                                "data": [base64.b64encode(f).decode() for f in files]}]}
        body, headers = json.dumps(document).encode(), {}
    engine = StandInEngine()
    read_result(serve(engine, body, headers))
    (call, context), = engine.calls
    assert call.images.kind == "encoded" and list(call.images.encoded) == files
    assert call.model == "tiny" and call.variant is None and context == "the request"


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("name,dtype,shape", [("pixels", np.uint8, (2, 8, 8, 3)),
                                              ("pixel_values", np.float32, (2, 3, 8, 8))])
def test_tensors_reach_the_engine_exactly(binary, name, dtype, shape):
    rng = np.random.default_rng(0)
    if dtype is np.uint8:
        array = rng.integers(0, 256, shape, dtype=np.uint8)
    else:
        array = rng.standard_normal(shape).astype(np.float32)
    body, headers = request_body([tensor_input(name, array, binary)])
    assert ("Inference-Header-Content-Length" in headers) is binary
    engine = StandInEngine()
    read_result(serve(engine, body, headers))
    images = engine.calls[0][0].images
    assert images.kind == {"pixels": "uint8_hwc", "pixel_values": "float32_chw"}[name]
    assert images.array.dtype == dtype and images.array.shape == shape
    assert images.array.flags.writeable  # torch.from_numpy needs it; binary data is a view of the body
    np.testing.assert_array_equal(images.array, array)


@pytest.mark.parametrize("binary", [True, False])
def test_classification_strings_and_every_output_read_back_by_tritonclient(binary):
    outputs = [triton.InferRequestedOutput("probabilities", binary_data=binary, class_count=3)]
    outputs += [triton.InferRequestedOutput(name, binary_data=binary) for name in OUTPUT_NAMES[1:]]
    body, headers = request_body([bytes_input(encoded_images(2))], outputs, request_id="req-7")
    engine = StandInEngine()
    reply = serve(engine, body, headers, version="baseline")
    assert ("Inference-Header-Content-Length" in reply.headers) is binary
    result = read_result(reply)
    assert engine.calls[0][0].top_k == 3 and engine.calls[0][0].variant == "baseline"
    response = result.get_response()
    assert response["model_name"] == "tiny" and response["model_version"] == "baseline"
    assert response["id"] == "req-7" and response["parameters"]["assignment"] == "override"

    classes = result.as_numpy("probabilities")
    assert classes.shape == (2, 3)
    for image, row in enumerate(classes):
        expected = result_for(image, 3)
        texts = [c.decode() if isinstance(c, bytes) else c for c in row]
        parsed = [text.split(":", 2) for text in texts]
        assert [int(p[1]) for p in parsed] == list(expected.indices)
        assert [float(p[0]) for p in parsed] == [round(s, 6) for s in expected.scores]
        assert [p[2] for p in parsed] == [LABELS[i] for i in expected.indices]
    np.testing.assert_array_equal(result.as_numpy("input_tokens"), [17, 17])
    np.testing.assert_array_equal(result.as_numpy("tokens_per_block"), [[17, 12, 9, 7], [17, 11, 9, 7]])
    np.testing.assert_array_equal(result.as_numpy("final_tokens"), [7, 7])
    np.testing.assert_allclose(result.as_numpy("gflops"), [0.25, 1.25])
    assert result.as_numpy("tokens_per_block").dtype == np.int64
    assert result.as_numpy("gflops").dtype == np.float32


def test_a_label_with_a_colon_survives_a_split_at_the_first_two():
    image = ClassifiedImage((9, 0), (0.5, 0.25), 17, (9,), 1.0)
    from server.oip.response import classification_strings
    assert classification_strings(image, 2, LABELS) == [b"0.500000:9:odd: label", b"0.250000:0:class 0"]


def test_no_outputs_named_gives_every_output_in_binary_with_the_full_probabilities():
    body, headers = request_body([tensor_input("pixels", np.zeros((2, 8, 8, 3), np.uint8), True)])
    engine = StandInEngine()
    result = read_result(serve(engine, body, headers))
    assert engine.calls[0][0].top_k == CLASSES  # every class, to fill the whole vector
    assert [o["name"] for o in result.get_response()["outputs"]] == list(OUTPUT_NAMES)
    assert all("binary_data_size" in o["parameters"] for o in result.get_response()["outputs"])
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (2, CLASSES) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)
    assert probabilities[0].argmax() == 0 and probabilities[1].argmax() == 1  # image 1's order is shifted
    assert result.get_response()["model_version"] == "mame-0.9"  # the server's choice, said in the answer


def test_experiment_and_timeout_parameters_reach_the_engine():
    body, headers = request_body([bytes_input(encoded_images(1))], timeout=250_000,
                                 parameters={"experiment": "ab-1"})
    engine = StandInEngine()
    result = read_result(serve(engine, body, headers))
    call = engine.calls[0][0]
    assert call.experiment == "ab-1" and call.timeout_s == pytest.approx(0.25)
    assert result.get_response()["parameters"]["experiment"] == "ab-1"


def test_classification_count_is_capped_at_the_number_of_classes():
    outputs = [triton.InferRequestedOutput("probabilities", class_count=1000)]
    body, headers = request_body([bytes_input(encoded_images(1))], outputs)
    result = read_result(serve(StandInEngine(), body, headers))
    assert result.as_numpy("probabilities").shape == (1, CLASSES)


# --- refusals -----------------------------------------------------------------------------------------------


def bad(document: dict[str, Any], binary: bytes = b"", header_length: str | None = None) -> tuple[int, str]:
    head = json.dumps(document).encode()
    headers = {}
    if binary or header_length is not None:
        headers["Inference-Header-Content-Length"] = header_length or str(len(head))
    engine = StandInEngine()
    reply = serve(engine, head + binary, headers)
    assert not engine.calls and engine.refusals == [("tiny", reply.status)]
    return reply.status, error_of(reply)


def pixels(shape=(1, 8, 8, 3), datatype="UINT8", data=None) -> dict[str, Any]:
    count = int(np.prod(shape))
    return {"name": "pixels", "datatype": datatype, "shape": list(shape),
            "data": data if data is not None else [0] * count}


@pytest.mark.parametrize("document,expected", [
    ({"inputs": []}, "'inputs' must be a non-empty list"),
    ({"inputs": [pixels(datatype="FP32")]}, "input 'pixels' must be UINT8, got FP32"),
    ({"inputs": [pixels(shape=(1, 9, 8, 3))]}, "takes ['N', 8, 8, 3]"),
    ({"inputs": [pixels(shape=(0, 8, 8, 3))]}, "with N >= 1"),
    ({"inputs": [pixels(data=[0] * 5)]}, "5 data elements for shape [1, 8, 8, 3]"),
    ({"inputs": [pixels(data=[300] * 192)]}, "UINT8 data must lie in [0, 255]"),
    ({"inputs": [pixels(data=[0.5] * 192)]}, "UINT8 data must be integers"),
    ({"inputs": [pixels(shape=(1, 3, 8, 8), datatype="FP32", data=[0.0] * 191 + ["x"])
                 | {"name": "pixel_values"}]},
     "FP32 data must be numbers"),
    ({"inputs": [pixels(datatype="BF16")]}, "BF16 is not taken"),
    ({"inputs": [pixels(datatype="FLOAT")]}, "unknown datatype 'FLOAT'"),
    ({"inputs": [pixels() | {"name": "image"}]}, "unknown input 'image'"),
    ({"inputs": [pixels(), pixels() | {"name": "images", "datatype": "BYTES", "data": ["a"], "shape": [1]}]},
     "give exactly one of the inputs"),
    ({"inputs": [pixels(), pixels()]}, "an input name appears twice"),
    ({"inputs": [pixels()], "outputs": [{"name": "logits"}]}, "unknown output 'logits'"),
    ({"inputs": [pixels()], "outputs": [{"name": "gflops", "parameters": {"classification": 2}}]},
     "classification applies to 'probabilities' only"),
    ({"inputs": [pixels()], "outputs": [{"name": "gflops", "parameters": {"binary_data": "yes"}}]},
     "binary_data must be true or false"),
    ({"inputs": [pixels()], "parameters": {"timeout": -1}}, "'timeout' must be a positive integer"),
    ({"inputs": [pixels()], "parameters": {"experiment": 3}}, "'experiment' must be a string"),
    ({"inputs": [pixels()], "id": 5}, "'id' must be a string"),
    ({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["!!"],
                  "parameters": {"content_type": "base64"}}]}, "is not base64"),
])
def test_malformed_requests_get_400_with_a_specific_error(document, expected):
    status, error = bad(document)
    assert status == 400 and error.startswith("invalid_request: ") and expected in error, error


def test_deeply_nested_data_is_a_400_not_a_crash():
    nested = "[" * 100_000 + "0" + "]" * 100_000
    body = ('{"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 8, 8, 3], "data": '
            + nested + "}]}").encode()
    reply = serve(StandInEngine(), body, {})
    assert reply.status == 400 and "JSON is nested too deeply" in error_of(reply)
    data: list = [0]
    for _ in range(5_000):  # deeper than Python's recursion limit, as a parser with a higher one could give
        data = [data]
    spec = {"name": "pixels", "datatype": "UINT8", "shape": [1], "data": data}
    with pytest.raises(ApiError, match="'data' is nested too deeply"):
        read_input(spec, 0, memoryview(b""), 0)


def test_nan_in_pixel_values_is_refused():
    values = np.zeros((1, 3, 8, 8), np.float32)
    values[0, 1, 2, 3] = np.nan
    body, headers = request_body([tensor_input("pixel_values", values, True)])
    reply = serve(StandInEngine(), body, headers)
    assert reply.status == 400 and "NaN or infinite" in error_of(reply)


def binary_pixels(size: int) -> dict[str, Any]:
    return {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 8, 8, 3],
                        "parameters": {"binary_data_size": size}}]}


@pytest.mark.parametrize("document,binary,header_length,expected", [
    (binary_pixels(192), b"\0" * 191, None, "runs past the body's 191 remaining bytes"),
    (binary_pixels(191), b"\0" * 191, None,
     "191 bytes of binary data; shape [1, 8, 8, 3] of UINT8 needs 192"),
    (binary_pixels(192), b"\0" * 200, None, "8 bytes of binary data after"),
    (binary_pixels(192), b"\0" * 192, "abc", "must be a byte count"),
    (binary_pixels(192), b"\0" * 192, "\u00b2", "must be a byte count"),
    (binary_pixels(192), b"\0" * 192, "99999", "outside the body"),
    ({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [2],
                  "parameters": {"binary_data_size": 9}}]},
     b"\5\0\0\0abcde", None, "1 BYTES elements for a shape of 2 elements"),
    ({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                  "parameters": {"binary_data_size": 6}}]},
     b"\x09\0\0\0ab", None, "runs past the tensor's data"),
    ({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                  "parameters": {"binary_data_size": 3}}]},
     b"\1\0\0", None, "ends inside an element's 4-byte length"),
])
def test_malformed_binary_data_gets_400(document, binary, header_length, expected):
    status, error = bad(document, binary, header_length)
    assert status == 400 and expected in error, error


def test_binary_size_without_the_header_is_refused_as_json_that_is_not_utf8():
    head = json.dumps(binary_pixels(3)).encode()
    reply = serve(StandInEngine(), head + b"\xff\xfe\xfd", {})
    assert reply.status == 400 and "Inference-Header-Content-Length" in error_of(reply)


def test_more_images_than_the_limit_is_413_and_counted():
    body, headers = request_body([bytes_input(encoded_images(5))])
    engine = StandInEngine()
    reply = serve(engine, body, headers)
    assert reply.status == 413 and error_of(reply).startswith("too_large: 5 images")
    assert engine.refusals == [("tiny", 413)]


def test_unknown_model_and_version_are_404_and_loading_is_503():
    body, headers = request_body([bytes_input(encoded_images(1))])
    engine = StandInEngine()
    reply = asyncio.run(infer(engine, {"model": "nope"}, body, headers, None))
    assert reply.status == 404 and error_of(reply).startswith("unknown_model: unknown model 'nope'")
    reply = serve(engine, body, headers, version="mame-0.1")
    assert reply.status == 404 and "no version (variant) 'mame-0.1'" in error_of(reply)
    reply = serve(StandInEngine(loading=True), body, headers)
    assert reply.status == 503 and reply.headers["Retry-After"] == "5"
    assert error_of(reply).startswith("not_ready")


def test_engine_errors_keep_their_status_and_headers_except_422_which_is_400():
    body, headers = request_body([bytes_input(encoded_images(1))])
    reply = serve(StandInEngine(failure=overloaded("queue full")), body, headers)
    assert (reply.status, reply.headers["Retry-After"], error_of(reply)) == (
        503, "1", "overloaded: queue full")
    engine = StandInEngine(failure=ApiError(422, "invalid_parameter", "experiment 'x' is of another model"))
    reply = serve(engine, body, headers)
    assert reply.status == 400 and error_of(reply) == "invalid_parameter: experiment 'x' is of another model"
    assert engine.refusals == []  # the engine counted it itself


def test_compressed_requests_are_refused_not_misread():
    body, headers = request_body([bytes_input(encoded_images(1))])
    reply = serve(StandInEngine(), body, {**headers, "Content-Encoding": "gzip"})
    assert reply.status == 415 and "send infer requests uncompressed" in error_of(reply)


def test_codec_functions_compose_without_the_handler():
    """parse -> plan -> response, the pieces a different HTTP layer (or gRPC) would reuse."""
    body, _ = request_body([tensor_input("pixels", np.ones((1, 8, 8, 3), np.uint8), False)],
                           [triton.InferRequestedOutput("final_tokens", binary_data=False)])
    plan = plan_infer(parse_infer_request(body, None), SPEC, "baseline", max_images=4)
    result = Classification("tiny", "baseline", None, "override", "random-init", (result_for(0, 1),))
    answer, header_length = infer_response(plan, result, SPEC)
    assert header_length is None
    assert json.loads(answer)["outputs"] == [{"name": "final_tokens", "datatype": "INT64", "shape": [1],
                                              "data": [7]}]


def test_model_metadata_describes_inputs_outputs_and_versions():
    document = model_metadata(SPEC)
    assert document["versions"] == ["baseline", "mame-0.9"]
    assert {i["name"]: (i["datatype"], i["shape"]) for i in document["inputs"]} == {
        "images": ("BYTES", [-1]), "pixels": ("UINT8", [-1, 8, 8, 3]),
        "pixel_values": ("FP32", [-1, 3, 8, 8])}
    assert {o["name"]: (o["datatype"], o["shape"]) for o in document["outputs"]} == {
        "probabilities": ("FP32", [-1, CLASSES]), "input_tokens": ("INT64", [-1]),
        "tokens_per_block": ("INT64", [-1, 4]), "final_tokens": ("INT64", [-1]), "gflops": ("FP32", [-1])}
    assert document["parameters"]["mean"] == "0.485,0.456,0.406"
    assert document["parameters"]["default_version"] == "baseline"


# --- the route table on loopback, with tritonclient's InferenceServerClient ---------------------------------


def starlette_app(engine: StandInEngine) -> Starlette:
    """The route table served as server/oip/handlers.py's docstring says the HTTP layer serves it."""

    def endpoint_for(route):
        async def endpoint(request: Request) -> Response:
            body = await request.body() if route.method == "POST" else b""
            reply = await route.handler(engine, request.path_params, body, request.headers, request)
            return Response(reply.body, reply.status, reply.headers)
        return endpoint

    return Starlette(routes=[StarletteRoute(r.path, endpoint_for(r), methods=[r.method]) for r in ROUTES])


@pytest.fixture
def loopback():
    """(url, engine): the routes on a real uvicorn server, in a thread of this process."""
    engine = StandInEngine()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(starlette_app(engine), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    yield f"127.0.0.1:{sock.getsockname()[1]}", engine
    server.should_exit = True
    thread.join(10)
    sock.close()


def test_tritonclient_talks_to_the_routes(loopback):
    url, engine = loopback
    client = triton.InferenceServerClient(url)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny") and client.is_model_ready("tiny", model_version="mame-0.9")
    assert not client.is_model_ready("tiny", model_version="nope")
    metadata = client.get_server_metadata()
    assert metadata["name"] == "mame-serve" and "classification" in metadata["extensions"]
    assert client.get_model_metadata("tiny", model_version="baseline")["versions"] == ["baseline", "mame-0.9"]

    files = encoded_images(2)
    outputs = [triton.InferRequestedOutput("probabilities", class_count=2),
               triton.InferRequestedOutput("final_tokens")]
    result = client.infer("tiny", [bytes_input(files)], model_version="mame-0.9", outputs=outputs,
                          headers={"X-User": "alice"}, query_params={"user": "bob"})
    call, request = engine.calls[0]
    assert call.variant == "mame-0.9" and list(call.images.encoded) == files
    assert request.headers["x-user"] == "alice" and request.query_params["user"] == "bob"  # sticky keys
    assert result.as_numpy("probabilities")[1][0].decode() == f"{result_for(1, 2).scores[0]:f}:1:class 1"
    np.testing.assert_array_equal(result.as_numpy("final_tokens"), [7, 7])

    result = client.infer("tiny", [tensor_input("pixel_values", np.zeros((1, 3, 8, 8), np.float32), True)])
    assert result.get_response()["model_version"] == "mame-0.9"
    assert result.as_numpy("probabilities").shape == (1, CLASSES)

    with pytest.raises(InferenceServerException) as refused:
        client.infer("tiny", [tensor_input("pixels", np.zeros((1, 4, 4, 3), np.uint8), True)])
    assert refused.value.status() == "400" and "model 'tiny' takes ['N', 8, 8, 3]" in refused.value.message()
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_metadata("other")
    assert unknown.value.status() == "404" and "unknown model 'other'" in unknown.value.message()


def test_while_loading_the_server_and_model_say_not_ready():
    from server.oip.handlers import model_metadata_handler, model_ready_handler, server_live, server_ready
    engine = StandInEngine(loading=True)

    def call(handler, **params) -> Reply:
        return asyncio.run(handler(engine, params, b"", {}, None))

    assert (call(server_live).status, json.loads(call(server_live).body)) == (200, {"live": True})
    assert (call(server_ready).status, json.loads(call(server_ready).body)) == (503, {"ready": False})
    reply = call(model_ready_handler, model="tiny")
    assert (reply.status, json.loads(reply.body)) == (503, {"name": "tiny", "ready": False})
    reply = call(model_metadata_handler, model="tiny")
    assert reply.status == 503 and error_of(reply).startswith("not_ready: model 'tiny' is still loading")
    assert call(model_ready_handler, model="other").status == 404
