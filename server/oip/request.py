"""Reading an infer request body: JSON, or JSON plus binary tensor data (server/oip/tensors.py), its
tensors read and checked against the protocol (not yet against a model: server/oip/plan.py)."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.oip.tensors import BYTES_LENGTH, DATATYPES, NUMPY_DTYPES, Tensor, element_count
from server.wire.errors import invalid_request


def check_shape(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(type(d) is int and d >= 0 for d in value):
        raise invalid_request(f"{what}: 'shape' must be a list of non-negative integers, got {value!r}")
    return tuple(value)


def flatten(data: Any) -> list:
    """The protocol lets JSON tensor data be flat or nested as the shape: row-major either way."""
    if not isinstance(data, list):
        return [data]
    if not any(isinstance(item, list) for item in data):
        return data
    flat: list = []
    for item in data:
        flat.extend(flatten(item))
    return flat


def numeric_from_json(values: list, datatype: str, shape: tuple[int, ...], what: str) -> np.ndarray:
    """JSON numbers -> array, refusing what the datatype cannot hold (numpy would wrap 256 to 0 silently)."""
    dtype = NUMPY_DTYPES[datatype]
    if dtype.kind == "b":
        if not all(isinstance(v, bool) for v in values):
            raise invalid_request(f"{what}: BOOL data must be true or false")
        return np.array(values, dtype=dtype).reshape(shape)
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise invalid_request(f"{what}: {datatype} data must be numbers")
    if dtype.kind in "iu":
        if not all(isinstance(v, int) or float(v).is_integer() for v in values):
            raise invalid_request(f"{what}: {datatype} data must be integers")
        info = np.iinfo(dtype)
        if values and not (info.min <= min(values) and max(values) <= info.max):
            raise invalid_request(f"{what}: {datatype} data must lie in [{info.min}, {info.max}]")
    return np.array(values, dtype=dtype).reshape(shape)


def bytes_from_json(values: list, parameters: dict[str, Any], what: str) -> list[bytes]:
    """JSON BYTES elements are strings: their UTF-8 bytes, or (input parameter content_type "base64", as
    MLServer spells it) the bytes they encode, so that JSON-only clients can send binary files."""
    if not all(isinstance(v, str) for v in values):
        raise invalid_request(f"{what}: BYTES data in JSON must be strings")
    if parameters.get("content_type") != "base64":
        return [v.encode() for v in values]
    try:
        return [base64.b64decode(v, validate=True) for v in values]
    except (binascii.Error, ValueError):
        raise invalid_request(f"{what}: content_type base64, but an element is not base64") from None


def bytes_from_binary(raw: bytes | memoryview, count: int, what: str) -> list[bytes]:
    """Length-prefixed elements; exactly `count` of them filling `raw`."""
    raw = memoryview(raw)
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise invalid_request(f"{what}: BYTES data ends inside an element's 4-byte length")
        (length,) = BYTES_LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise invalid_request(f"{what}: a BYTES element of {length} bytes runs past the tensor's data")
        elements.append(bytes(raw[offset:offset + length]))
        offset += length
    if len(elements) != count:
        raise invalid_request(f"{what}: {len(elements)} BYTES elements for a shape of {count} elements")
    return elements


def binary_data(datatype: str, shape: list[int], size: Any, binary: memoryview, offset: int,
                what: str) -> Any:
    """An input's `size` bytes of binary tensor data from `offset`, as its datatype reads them."""
    if type(size) is not int or size < 0:
        raise invalid_request(f"{what}: binary_data_size must be a non-negative integer, got {size!r}")
    if offset + size > len(binary):
        raise invalid_request(f"{what}: binary_data_size {size} runs past the body's "
                              f"{len(binary) - offset} remaining bytes of binary data")
    raw, count = binary[offset:offset + size], element_count(shape)
    if datatype == "BYTES":
        return bytes_from_binary(raw, count, what)
    dtype = NUMPY_DTYPES[datatype]
    if size != count * dtype.itemsize:
        raise invalid_request(f"{what}: {size} bytes of binary data; shape {list(shape)} of "
                              f"{datatype} needs {count * dtype.itemsize}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def read_input(spec: Any, index: int, binary: memoryview, offset: int) -> tuple[Tensor, int]:
    """The `index`-th entry of a request's "inputs" -> (tensor, offset past its binary data)."""
    if not isinstance(spec, dict):
        raise invalid_request(f"inputs[{index}] must be an object")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise invalid_request(f"inputs[{index}]: 'name' must be a non-empty string")
    what = f"input {name!r}"
    datatype = spec.get("datatype")
    if datatype not in DATATYPES:
        raise invalid_request(f"{what}: unknown datatype {datatype!r}; "
                              f"the protocol's are {sorted(DATATYPES)}")
    if datatype == "BF16":
        raise invalid_request(f"{what}: BF16 is not taken; send FP32")
    shape = check_shape(spec.get("shape"), what)
    parameters = spec.get("parameters", {})
    if not isinstance(parameters, dict):
        raise invalid_request(f"{what}: 'parameters' must be an object")
    count = element_count(shape)
    size = parameters.get("binary_data_size")
    if size is not None:
        if "data" in spec:
            raise invalid_request(f"{what}: has both 'data' and a binary_data_size parameter")
        data = binary_data(datatype, shape, size, binary, offset, what)
        return Tensor(name, datatype, shape, data, parameters), offset + size
    if "data" not in spec:
        raise invalid_request(f"{what}: neither 'data' nor a binary_data_size parameter")
    try:
        values = flatten(spec["data"])
    except RecursionError:
        raise invalid_request(f"{what}: 'data' is nested too deeply") from None
    if len(values) != count:
        raise invalid_request(f"{what}: {len(values)} data elements for shape {list(shape)} "
                              f"({count} elements)")
    if datatype == "BYTES":
        data = bytes_from_json(values, parameters, what)
    else:
        data = numeric_from_json(values, datatype, shape, what)
    return Tensor(name, datatype, shape, data, parameters), offset


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
