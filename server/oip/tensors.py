"""Tensors of the Open Inference Protocol: datatypes, JSON and binary tensor data, in and out.

The binary tensor data extension (Triton's): a body is a JSON header of `Inference-Header-Content-Length`
bytes followed by the raw tensors, each as its `binary_data_size` parameter says, in the order of the JSON's
tensors. Numbers are little-endian, row-major; a BYTES element is a 4-byte little-endian length and its bytes.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from server.oip.errors import invalid_request

# Protocol datatype -> numpy dtype (little-endian). BYTES elements are Python bytes.
NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"), "UINT8": np.dtype("u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "INT8": np.dtype("i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
DATATYPES = frozenset(NUMPY_DTYPES) | {"BYTES", "BF16"}  # BF16: known, so it is refused by name, not as junk
_LENGTH = struct.Struct("<I")


@dataclass(frozen=True)
class Tensor:
    """One input tensor of a request, its data read and checked against its shape.

    `data`: a numpy array of `shape` for numeric datatypes, a list of bytes (row-major) for BYTES."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: Any
    parameters: dict[str, Any] = field(default_factory=dict)


def element_count(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


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
        (length,) = _LENGTH.unpack_from(raw, offset)
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


def binary_of(datatype: str, data: np.ndarray | list[bytes]) -> bytes:
    """An output's raw bytes for the binary tensor data extension."""
    if datatype == "BYTES":
        return b"".join(_LENGTH.pack(len(e)) + e for e in data)
    return np.ascontiguousarray(data, dtype=NUMPY_DTYPES[datatype]).tobytes()


def json_of(datatype: str, data: np.ndarray | list[bytes]) -> list:
    """An output's flat JSON data (BYTES elements as UTF-8 strings, as the protocol's JSON form has them)."""
    if datatype == "BYTES":
        return [e.decode("utf-8", errors="replace") for e in data]
    return np.asarray(data).reshape(-1).tolist()
