"""Server and model metadata, and the health answers, as the protocol's JSON objects."""

from __future__ import annotations

from typing import Any

from server.oip.interface import (
    DATATYPE_OF_INPUT,
    FINAL_TOKENS,
    GFLOPS,
    INPUT_TOKENS,
    PROBABILITIES,
    TOKENS_PER_BLOCK,
    ModelSpec,
)

SERVER_NAME = "mame-serve"
# Triton's names for the protocol extensions this server implements.
EXTENSIONS = ("binary_tensor_data", "classification")
PLATFORM = "pytorch_timm"


def server_metadata(version: str) -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": version, "extensions": list(EXTENSIONS)}


def output_metadata(spec: ModelSpec) -> list[dict[str, Any]]:
    depth = spec.depth if spec.depth is not None else -1
    shapes = {PROBABILITIES: ("FP32", [-1, len(spec.labels)]), INPUT_TOKENS: ("INT64", [-1]),
              TOKENS_PER_BLOCK: ("INT64", [-1, depth]), FINAL_TOKENS: ("INT64", [-1]), GFLOPS: ("FP32", [-1])}
    return [{"name": name, "datatype": datatype, "shape": shape}
            for name, (datatype, shape) in shapes.items()]


def model_metadata(spec: ModelSpec) -> dict[str, Any]:
    """The model's versions are its variants. `parameters` (as MLServer adds them) say what the
    `pixel_values` input is normalised with, and which version answers a request that names none."""
    inputs = [{"name": name, "datatype": DATATYPE_OF_INPUT[name], "shape": shape}
              for name, shape in spec.input_shapes().items()]
    return {
        "name": spec.name,
        "versions": list(spec.variants),
        "platform": PLATFORM,
        "inputs": inputs,
        "outputs": output_metadata(spec),
        "parameters": {
            "default_version": spec.default_variant,
            "arch": spec.arch,
            "weights": spec.weights,
            "classes": len(spec.labels),
            "mean": ",".join(f"{m:g}" for m in spec.mean),
            "std": ",".join(f"{s:g}" for s in spec.std),
        },
    }


def model_ready(name: str, ready: bool) -> dict[str, Any]:
    return {"name": name, "ready": ready}
