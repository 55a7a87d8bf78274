"""An infer request against one model: its images, the engine call, and the outputs to answer with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from server.oip.interface import (
    DATATYPE_OF_INPUT,
    IMAGES,
    INPUT_NAMES,
    OUTPUT_NAMES,
    PIXELS,
    PROBABILITIES,
    ClassifyCall,
    Images,
    ModelSpec,
)
from server.wire.errors import invalid_request, too_large

if TYPE_CHECKING:
    from server.oip.request import InferRequest
    from server.oip.tensors import Tensor

FLOAT16_MAX = 65504.0  # the largest finite float16: models may run in half precision


@dataclass(frozen=True)
class OutputPlan:
    name: str
    binary: bool
    classification: int | None  # k, already capped at the number of classes


@dataclass(frozen=True)
class InferPlan:
    call: ClassifyCall
    outputs: tuple[OutputPlan, ...]
    request_id: str | None


def read_images(tensor: Tensor, spec: ModelSpec, max_images: int) -> Images:
    """The one image input of a request, checked against the model's datatype and shape."""
    what = f"input {tensor.name!r}"
    expected = DATATYPE_OF_INPUT[tensor.name]
    if tensor.datatype != expected:
        raise invalid_request(f"{what} must be {expected}, got {tensor.datatype}")
    wanted = spec.input_shapes()[tensor.name]
    shape = tensor.shape
    if tensor.name == IMAGES:
        fits = len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)
    else:
        fits = len(shape) == len(wanted) and list(shape[1:]) == wanted[1:]
    if not fits or shape[0] == 0:
        alternatives = " or [N, 1]" if tensor.name == IMAGES else ""
        raise invalid_request(f"{what} has shape {list(shape)}; model {spec.name!r} takes "
                              f"{['N', *wanted[1:]]}{alternatives} with N >= 1")
    if shape[0] > max_images:
        raise too_large(f"{shape[0]} images in one request; the limit is {max_images} "
                        "(limits.max_images_per_request)")
    if tensor.name == IMAGES:
        return Images("encoded", encoded=tuple(tensor.data))
    # Binary data is a read-only view of the body: the engine gets an array of its own (torch.from_numpy
    # wants a writable one), a copy that costs far less than the forward pass.
    array = tensor.data if tensor.data.flags.writeable else tensor.data.copy()
    if tensor.name == PIXELS:
        return Images("uint8_hwc", array=array)
    if not np.isfinite(array).all():
        raise invalid_request(f"{what} holds NaN or infinite values")
    # A normalised image lies within a few units of 0; past half precision's range a float16 model would
    # turn the value into infinity, and its answer into NaN.
    if np.abs(array).max(initial=0.0) > FLOAT16_MAX:
        raise invalid_request(f"{what} holds values beyond +-{FLOAT16_MAX:g} (float16's range): it must be "
                              "normalised pixels")
    return Images("float32_chw", array=array)


def _outputs(request: InferRequest, spec: ModelSpec) -> tuple[OutputPlan, ...]:
    if request.outputs is None:
        return tuple(OutputPlan(name, request.binary_output, None) for name in OUTPUT_NAMES)
    plans = []
    for output in request.outputs:
        if output.name not in OUTPUT_NAMES:
            raise invalid_request(f"unknown output {output.name!r}; model {spec.name!r} has "
                                  f"{list(OUTPUT_NAMES)}")
        if output.classification is not None and output.name != PROBABILITIES:
            raise invalid_request(f"output {output.name!r} is not a class score: classification applies "
                                  f"to {PROBABILITIES!r} only")
        k = None if output.classification is None else min(output.classification, len(spec.labels))
        binary = request.binary_output if output.binary is None else output.binary
        plans.append(OutputPlan(output.name, binary, k))
    return tuple(plans)


def _top_k(outputs: tuple[OutputPlan, ...], classes: int) -> int:
    """Scores the engine must return per image: every class for the full probabilities."""
    wanted = [classes if o.classification is None else o.classification
              for o in outputs if o.name == PROBABILITIES]
    return max(wanted, default=1)


def _request_parameters(request: InferRequest) -> tuple[str | None, float | None]:
    """(experiment, timeout in seconds). Other parameters are left alone, as Triton leaves custom ones."""
    experiment = request.parameters.get("experiment")
    if experiment is not None and not isinstance(experiment, str):
        raise invalid_request(f"parameter 'experiment' must be a string, got {experiment!r}")
    timeout_us = request.parameters.get("timeout")  # Triton's: microseconds
    if timeout_us is not None and (type(timeout_us) is not int or timeout_us <= 0):
        raise invalid_request("parameter 'timeout' must be a positive integer (microseconds), "
                              f"got {timeout_us!r}")
    return experiment, None if timeout_us is None else timeout_us / 1e6


def plan_infer(request: InferRequest, spec: ModelSpec, variant: str | None, max_images: int) -> InferPlan:
    """What to run and what to answer, or an ApiError naming the first problem."""
    known = [t for t in request.inputs if t.name in INPUT_NAMES]
    unknown = [t.name for t in request.inputs if t.name not in INPUT_NAMES]
    if unknown:
        raise invalid_request(f"unknown input {unknown[0]!r}; model {spec.name!r} takes one of "
                              f"{list(INPUT_NAMES)}")
    if len(known) != 1:
        raise invalid_request(f"give exactly one of the inputs {list(INPUT_NAMES)}, "
                              f"got {[t.name for t in known]}")
    images = read_images(known[0], spec, max_images)
    outputs = _outputs(request, spec)
    experiment, timeout_s = _request_parameters(request)
    call = ClassifyCall(spec.name, variant, experiment, images, _top_k(outputs, len(spec.labels)), timeout_s)
    return InferPlan(call, outputs, request.id)
