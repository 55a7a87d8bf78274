"""Reading an infer request body: JSON, or JSON plus binary tensor data (server/oip/tensors.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from server.oip.errors import invalid_request
from server.oip.tensors import Tensor, read_input


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool | None  # None: as the request's binary_data_output says
    classification: int | None  # Triton's classification extension: top-k as "score:index:label" strings


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    parameters: dict[str, Any]
    inputs: tuple[Tensor, ...]
    outputs: tuple[RequestedOutput, ...] | None  # None: every output, with default settings
    binary_output: bool = False  # the request's binary_data_output parameter


def header_length_of(value: str | None, body_size: int) -> int | None:
    """The Inference-Header-Content-Length header: the JSON's size when binary data follows it."""
    if value is None:
        return None
    if not (value.strip().isascii() and value.strip().isdigit()):
        raise invalid_request(f"Inference-Header-Content-Length must be a byte count, got {value!r}")
    length = int(value)
    if not 0 < length <= body_size:
        raise invalid_request(f"Inference-Header-Content-Length {length} is outside the body's "
                              f"{body_size} bytes")
    return length


def _parameters(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    scalars = bool | int | float | str
    if not isinstance(value, dict) or not all(isinstance(v, scalars) for v in value.values()):
        raise invalid_request(f"{what}: 'parameters' must be an object of booleans, numbers and strings")
    return value


def _requested_output(spec: Any, index: int) -> RequestedOutput:
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise invalid_request(f"outputs[{index}] must be an object with a string 'name'")
    name = spec["name"]
    parameters = _parameters(spec.get("parameters"), f"output {name!r}")
    binary = parameters.get("binary_data")
    if binary is not None and not isinstance(binary, bool):
        raise invalid_request(f"output {name!r}: binary_data must be true or false, got {binary!r}")
    count = parameters.get("classification")
    if count is not None and (type(count) is not int or count < 0):
        raise invalid_request(f"output {name!r}: classification must be a non-negative integer, "
                              f"got {count!r}")
    return RequestedOutput(name, binary, count or None)  # 0: no classification, as tritonclient's default


def parse_infer_request(body: bytes, header_length: str | None) -> InferRequest:
    """The request's JSON and tensors, checked against the protocol (not yet against a model)."""
    length = header_length_of(header_length, len(body))
    head, binary = (body, b"") if length is None else (body[:length], body[length:])
    try:
        document = json.loads(head)
    except UnicodeDecodeError:
        raise invalid_request("the request's JSON is not UTF-8 (binary data needs the "
                              "Inference-Header-Content-Length header)") from None
    except json.JSONDecodeError as exc:
        raise invalid_request(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise invalid_request("the request's JSON is nested too deeply") from None
    if not isinstance(document, dict):
        raise invalid_request("the request body must be a JSON object")
    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise invalid_request(f"'id' must be a string, got {request_id!r}")
    parameters = _parameters(document.get("parameters"), "request")
    binary_output = parameters.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise invalid_request(f"binary_data_output must be true or false, got {binary_output!r}")
    specs = document.get("inputs")
    if not isinstance(specs, list) or not specs:
        raise invalid_request("'inputs' must be a non-empty list")
    inputs, offset, view = [], 0, memoryview(binary)
    for index, spec in enumerate(specs):
        tensor, offset = read_input(spec, index, view, offset)
        inputs.append(tensor)
    if offset != len(binary):
        raise invalid_request(f"{len(binary) - offset} bytes of binary data after the inputs' "
                              "binary_data_size parameters are used up")
    if len({t.name for t in inputs}) != len(inputs):
        raise invalid_request("an input name appears twice")
    outputs = document.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list):
            raise invalid_request("'outputs' must be a list")
        outputs = tuple(_requested_output(spec, i) for i, spec in enumerate(outputs)) or None  # []: all
        if outputs and len({o.name for o in outputs}) != len(outputs):
            raise invalid_request("an output name appears twice")
    return InferRequest(request_id, parameters, tuple(inputs), outputs, binary_output)
