"""The Open Inference Protocol end to end: the real Triton client, tritonclient[http], against a real
`mame-serve` process on loopback (tiny ViT), in both process layouts. Every infer is checked against
`POST /v1/classify` of the same image on the same variant: top-1, scores and token counts."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
import timm
import torch
import tritonclient.http as triton
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from serverproc import TINY_MODEL, running_server, sample_images, tiny_config
from tritonclient.utils import InferenceServerException

from server.config import parse_config
from server.decode.imaging import decode_image
from server.decode.transforms import preprocessing
from server.engine.devices import place_model
from server.engine.models import load_model
from server.engine.worker import infer as infer_on_host

pytestmark = pytest.mark.e2e

LAYOUTS = {"single": ["--layout", "single"], "frontends": ["--layout", "frontends", "--http-processes", "2"]}
VARIANT = "mame-0.5"  # merges on the tiny model: the token counts say something


@pytest.fixture(scope="module", params=list(LAYOUTS))
def server(request):
    config = tiny_config(limits={"max_body_bytes": 2_000_000, "request_timeout_s": 30})
    with running_server(config, args=[*LAYOUTS[request.param], "--preprocess-threads", "2"]) as proc:
        yield proc


@pytest.fixture
def client(server):
    client = triton.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=60)
    yield client
    client.close()


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    return sample_images()


@pytest.fixture(scope="module")
def crop_of():
    """The uint8 [H, W, 3] crop the server makes of an encoded image (its own host transform)."""
    model = timm.create_model(TINY_MODEL["arch"], pretrained=False, **TINY_MODEL["model_kwargs"])
    transform, _ = preprocessing(model)
    return lambda data: transform(decode_image(data, 10_000_000)).permute(1, 2, 0).contiguous().numpy()


def v1_answer(server, photo: bytes, top_k: int = 5) -> dict:
    answer = httpx.post(f"{server.url}/v1/classify", params={"variant": VARIANT, "top_k": top_k},
                        content=photo, headers={"content-type": "image/png"}, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()


OUTPUTS = ("input_tokens", "tokens_per_block", "final_tokens", "gflops")


def infer(client, name: str, datatype: str, array: np.ndarray, binary: bool = True, k: int = 5):
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    outputs = [triton.InferRequestedOutput("probabilities", binary_data=binary, class_count=k)]
    outputs += [triton.InferRequestedOutput(o, binary_data=binary) for o in OUTPUTS]
    return client.infer("tiny", [tensor], model_version=VARIANT, outputs=outputs)


def assert_same_as_v1(result, answers: list[dict]) -> None:
    assert result.get_response()["model_version"] == VARIANT
    for row, answer in enumerate(answers):
        triples = [text.decode().split(":", 2) for text in result.as_numpy("probabilities")[row]]
        assert [int(index) for _, index, _ in triples] == [p["index"] for p in answer["predictions"]]
        assert [float(score) for score, _, _ in triples] == pytest.approx(
            [p["score"] for p in answer["predictions"]], abs=2e-6)
        assert [label for _, _, label in triples] == [p["label"] for p in answer["predictions"]]
        assert result.as_numpy("input_tokens")[row] == answer["tokens"]["input"]
        assert result.as_numpy("tokens_per_block")[row].tolist() == answer["tokens"]["per_block"]
        assert result.as_numpy("final_tokens")[row] == answer["tokens"]["final"]
        assert result.as_numpy("gflops")[row] == pytest.approx(answer["gflops"], abs=1e-4)


def test_live_ready_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny") and client.is_model_ready("tiny", VARIANT)
    assert not client.is_model_ready("nope")
    server_meta = client.get_server_metadata()
    assert server_meta["name"] == "mame-serve" and "classification" in server_meta["extensions"]
    meta = client.get_model_metadata("tiny")
    assert sorted(meta["versions"]) == ["baseline", "mame-0.5", "mame-0.9", "tome-r8"]
    assert meta["parameters"]["default_version"] == "baseline"
    inputs = {i["name"]: (i["datatype"], i["shape"]) for i in meta["inputs"]}
    assert inputs["pixels"] == ("UINT8", [-1, 64, 64, 3])
    assert inputs["pixel_values"] == ("FP32", [-1, 3, 64, 64])
    outputs = {o["name"]: o["shape"] for o in meta["outputs"]}
    assert outputs["tokens_per_block"] == [-1, 4] and outputs["probabilities"] == [-1, 1000]


def test_infer_encoded_photo_matches_v1(server, client, photos):
    names = ["shapes", "text"]
    encoded = np.array([photos[n] for n in names], dtype=np.object_)
    result = infer(client, "images", "BYTES", encoded)
    assert_same_as_v1(result, [v1_answer(server, photos[n]) for n in names])


def test_infer_json_base64_as_docs_show(server, photos):
    """JSON only (curl, docs/oip.md): the file base64-encoded, the answer's tensors in JSON."""
    document = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                            "parameters": {"content_type": "base64"},
                            "data": [base64.b64encode(photos["shapes"]).decode()]}],
                "outputs": [{"name": "probabilities", "parameters": {"classification": 3}},
                            {"name": "tokens_per_block"}]}
    answer = httpx.post(f"{server.url}/v2/models/tiny/versions/{VARIANT}/infer", json=document, timeout=60)
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json", answer.text
    outputs = {o["name"]: o for o in answer.json()["outputs"]}
    v1 = v1_answer(server, photos["shapes"], top_k=3)
    assert [int(s.split(":", 2)[1]) for s in outputs["probabilities"]["data"]] == [
        p["index"] for p in v1["predictions"]]
    assert outputs["tokens_per_block"]["data"] == v1["tokens"]["per_block"]


def test_infer_uint8_tensor_matches_v1(server, client, photos, crop_of):
    names = ["gradient", "shapes", "noise"]
    crops = np.stack([crop_of(photos[n]) for n in names])
    assert crops.shape == (3, 64, 64, 3) and crops.dtype == np.uint8
    result = infer(client, "pixels", "UINT8", crops)
    assert_same_as_v1(result, [v1_answer(server, photos[n]) for n in names])


def test_infer_fp32_normalised_crops_match_v1(server, client, photos, crop_of):
    meta = client.get_model_metadata("tiny")
    mean = np.array(meta["parameters"]["mean"].split(","), dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.array(meta["parameters"]["std"].split(","), dtype=np.float32).reshape(1, 3, 1, 1)
    crops = np.stack([crop_of(photos["text"])])
    values = ((crops.transpose(0, 3, 1, 2) / np.float32(255) - mean) / std).astype(np.float32)
    assert_same_as_v1(infer(client, "pixel_values", "FP32", values), [v1_answer(server, photos["text"])])


@pytest.fixture(scope="module")
def tiny_model():
    """The tiny model as the server loads it (random weights from a fixed seed), in this process."""
    cfg = parse_config(tiny_config()).models["tiny"]
    loaded = load_model("tiny", cfg)
    dm = place_model("tiny", loaded.model, torch.device("cpu"), torch.float32, loaded.input_size,
                     copy_weights=False, mean=loaded.transform.mean, std=loaded.transform.std)
    return dm, cfg


def float_pipeline(photos: dict[str, bytes], names: list[str], mean: np.ndarray,
                   std: np.ndarray) -> np.ndarray:
    """Another client's preprocessing, in float: the whole picture resized bilinearly (antialiased) to the
    input size and normalised; nothing a uint8 crop can give."""
    pictures = torch.stack([torch.from_numpy(np.array(Image.open(io.BytesIO(photos[n])).convert("RGB")))
                            for n in names]).permute(0, 3, 1, 2).float() / 255
    resized = torch.nn.functional.interpolate(pictures, size=(64, 64), mode="bilinear", antialias=True)
    return ((resized.numpy() - mean) / std).astype(np.float32)


def test_infer_fp32_from_another_pipeline_is_what_the_model_says(server, client, photos, tiny_model):
    """Float pixels that no uint8 crop makes are served: the model's own answer on exactly those values."""
    meta = client.get_model_metadata("tiny")
    mean = np.array(meta["parameters"]["mean"].split(","), dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.array(meta["parameters"]["std"].split(","), dtype=np.float32).reshape(1, 3, 1, 1)
    values = float_pipeline(photos, ["shapes", "gradient"], mean, std)
    levels = (values * std + mean) * 255
    assert np.abs(levels - np.rint(levels)).max() > 0.1  # not a normalised uint8 crop
    result = infer(client, "pixel_values", "FP32", values)
    dm, cfg = tiny_model
    scores, indices, tokens, _, input_tokens = infer_on_host(dm, cfg.variants[VARIANT],
                                                             torch.from_numpy(values), 5)
    for row in range(len(values)):
        triples = [text.decode().split(":", 2) for text in result.as_numpy("probabilities")[row]]
        assert [int(index) for _, index, _ in triples] == indices[row].tolist()
        assert [float(score) for score, _, _ in triples] == pytest.approx(scores[row].tolist(), abs=2e-6)
        assert result.as_numpy("tokens_per_block")[row].tolist() == tokens[row].tolist()
        assert result.as_numpy("input_tokens")[row] == input_tokens
    # The server did not quantise them: the same pictures as uint8 crops answer other scores.
    crops = np.rint(np.clip(levels, 0, 255)).astype(np.uint8).transpose(0, 2, 3, 1)
    as_crops = infer(client, "pixels", "UINT8", np.ascontiguousarray(crops))
    assert not np.array_equal(as_crops.as_numpy("probabilities"), result.as_numpy("probabilities"))


@pytest.mark.parametrize("bad,expected", [
    ("nan", "holds NaN or infinite values"), ("inf", "holds NaN or infinite values"),
    ("huge", "beyond +-65504"), ("shape", "has shape [1, 3, 32, 32]; model 'tiny' takes ['N', 3, 64, 64]"),
])
def test_infer_fp32_refuses_non_finite_values_and_wrong_shapes(server, client, bad, expected):
    values = np.zeros((1, 3, 64, 64), np.float32)
    if bad == "shape":
        values = np.zeros((1, 3, 32, 32), np.float32)
    else:
        values[0, 1, 5, 7] = {"nan": np.nan, "inf": -np.inf, "huge": 1e6}[bad]
    with pytest.raises(InferenceServerException, match="invalid_request") as refused:
        infer(client, "pixel_values", "FP32", values)
    assert refused.value.status() == "400" and expected in str(refused.value)
    # The protocol's error body, as it comes over the wire (JSON data this time; Python writes NaN as NaN).
    document = {"inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": list(values.shape),
                            "data": values.ravel().tolist()}]}
    answer = httpx.post(f"{server.url}/v2/models/tiny/infer", content=json.dumps(document).encode(),
                        headers={"content-type": "application/json"}, timeout=60)
    assert answer.status_code == 400 and list(answer.json()) == ["error"], answer.text
    assert answer.json()["error"].startswith("invalid_request: ") and expected in answer.json()["error"]


def test_full_probabilities_and_server_choice(server, client, photos):
    """No outputs named: every output, the full softmax (top_k = every class); no version: the default."""
    images = triton.InferInput("images", [1], "BYTES")
    images.set_data_from_numpy(np.array([photos["flat"]], dtype=np.object_))
    result = client.infer("tiny", [images])
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (1, 1000) and probabilities.dtype == np.float32
    assert probabilities.sum() == pytest.approx(1.0, abs=1e-4)
    answer = httpx.post(f"{server.url}/v1/classify", params={"top_k": 3}, content=photos["flat"],
                        headers={"content-type": "image/png"}, timeout=60).json()
    assert result.get_response()["model_version"] == answer["variant"] == "baseline"
    assert np.argsort(-probabilities[0])[:3].tolist() == [p["index"] for p in answer["predictions"]]
    assert result.get_response()["parameters"]["assignment"] == "default"


def test_errors_are_the_protocols_and_counted(server, client, photos):
    images = triton.InferInput("images", [1], "BYTES")
    images.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
    with pytest.raises(InferenceServerException, match="bad_image"):
        client.infer("tiny", [images], model_version=VARIANT)
    with pytest.raises(InferenceServerException, match="unknown_variant"):
        client.infer("tiny", [images], model_version="nope")
    families = text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)
    counted = {(s.labels["variant"], s.labels["status"]): s.value
               for f in families if f.name == "mame_requests" for s in f.samples
               if s.name == "mame_requests_total" and s.labels["model"] == "tiny"}
    assert counted[VARIANT, "400"] >= 1 and counted["", "404"] >= 1


def test_a_body_over_the_limit_is_the_protocols_413(client):
    """Refused before the engine reads it (by the front-end in that layout): still the protocol's body."""
    pixels = triton.InferInput("pixels", [200, 64, 64, 3], "UINT8")  # 2.4 MB, over max_body_bytes
    pixels.set_data_from_numpy(np.zeros((200, 64, 64, 3), dtype=np.uint8))
    with pytest.raises(InferenceServerException, match="too_large: .*body") as refused:
        client.infer("tiny", [pixels])
    assert refused.value.status() == "413"
