"""The infer response: the engine's results as output tensors, in JSON or with binary tensor data."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np

from server.oip.interface import (
    FINAL_TOKENS,
    GFLOPS,
    INPUT_TOKENS,
    PROBABILITIES,
    TOKENS_PER_BLOCK,
    Classification,
    ClassifiedImage,
    ModelSpec,
)
from server.oip.tensors import binary_of, json_of
from server.wire.errors import internal

if TYPE_CHECKING:
    from server.oip.plan import InferPlan, OutputPlan


def classification_strings(image: ClassifiedImage, k: int, labels: tuple[str, ...]) -> list[bytes]:
    """Triton's classification extension: "score:index:label", best first, the score as C++'s
    std::to_string prints it (6 decimals). Labels may hold ':'; split a string at its first two."""
    return [f"{score:f}:{index}:{labels[index] if index < len(labels) else ''}".encode()
            for index, score in zip(image.indices[:k], image.scores[:k])]


def full_probabilities(images: tuple[ClassifiedImage, ...], classes: int) -> np.ndarray:
    probabilities = np.zeros((len(images), classes), dtype=np.float32)
    for row, image in zip(probabilities, images):
        if len(image.indices) != classes:  # the plan asked for every class: anything else is a server bug
            raise internal(f"the engine returned {len(image.indices)} scores of {classes} classes")
        row[list(image.indices)] = image.scores
    return probabilities


def output_tensor(output: OutputPlan, images: tuple[ClassifiedImage, ...],
                  spec: ModelSpec) -> tuple[str, list[int], Any]:
    """(datatype, shape, data) of one output."""
    n = len(images)
    if output.name == PROBABILITIES and output.classification is not None:
        k = output.classification
        return "BYTES", [n, k], [s for image in images for s in classification_strings(image, k, spec.labels)]
    if output.name == PROBABILITIES:
        return "FP32", [n, len(spec.labels)], full_probabilities(images, len(spec.labels))
    if output.name == INPUT_TOKENS:
        return "INT64", [n], np.array([i.input_tokens for i in images], dtype=np.int64)
    if output.name == TOKENS_PER_BLOCK:
        per_block = np.array([i.tokens_per_block for i in images], dtype=np.int64).reshape(n, -1)
        return "INT64", list(per_block.shape), per_block
    if output.name == FINAL_TOKENS:
        return "INT64", [n], np.array([i.final_tokens for i in images], dtype=np.int64)
    if output.name == GFLOPS:
        return "FP32", [n], np.array([i.gflops for i in images], dtype=np.float32)
    raise internal(f"no rule builds output {output.name!r}")


def infer_response(plan: InferPlan, result: Classification, spec: ModelSpec) -> tuple[bytes, int | None]:
    """(body, JSON header size): the size is None for an all-JSON body, else the value of the
    Inference-Header-Content-Length header that the answer must carry."""
    outputs, chunks = [], []
    for output in plan.outputs:
        datatype, shape, data = output_tensor(output, result.images, spec)
        tensor: dict[str, Any] = {"name": output.name, "datatype": datatype, "shape": shape}
        if output.binary:
            raw = binary_of(datatype, data)
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            tensor["data"] = json_of(datatype, data)
        outputs.append(tensor)
    parameters = {"assignment": result.assignment, "weights": result.weights}
    if result.experiment is not None:
        parameters["experiment"] = result.experiment
    document: dict[str, Any] = {"model_name": result.model, "model_version": result.variant}
    if plan.request_id is not None:
        document["id"] = plan.request_id
    document.update(parameters=parameters, outputs=outputs)
    head = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()
    if not chunks:
        return head, None
    return b"".join([head, *chunks]), len(head)
