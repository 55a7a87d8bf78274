"""Tensors of the Open Inference Protocol: datatypes, and tensor data as JSON or binary data.

The binary tensor data extension (Triton's): a body is a JSON header of `Inference-Header-Content-Length`
bytes followed by the raw tensors, each as its `binary_data_size` parameter says, in the order of the JSON's
tensors. Numbers are little-endian, row-major; a BYTES element is a 4-byte little-endian length and its bytes.
Reading a request's tensors, with its checks, is server/oip/request.py's; writing an answer's is here.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Protocol datatype -> numpy dtype (little-endian). BYTES elements are Python bytes.
NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"), "UINT8": np.dtype("u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "INT8": np.dtype("i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
DATATYPES = frozenset(NUMPY_DTYPES) | {"BYTES", "BF16"}  # BF16: known, so it is refused by name, not as junk
BYTES_LENGTH = struct.Struct("<I")  # a BYTES element's length prefix


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


def binary_of(datatype: str, data: np.ndarray | list[bytes]) -> bytes:
    """An output's raw bytes for the binary tensor data extension."""
    if datatype == "BYTES":
        return b"".join(BYTES_LENGTH.pack(len(e)) + e for e in data)
    return np.ascontiguousarray(data, dtype=NUMPY_DTYPES[datatype]).tobytes()


def json_of(datatype: str, data: np.ndarray | list[bytes]) -> list:
    """An output's flat JSON data (BYTES elements as UTF-8 strings, as the protocol's JSON form has them)."""
    if datatype == "BYTES":
        return [e.decode("utf-8", errors="replace") for e in data]
    return np.asarray(data).reshape(-1).tolist()
