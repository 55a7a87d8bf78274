"""What the engine side gives the protocol: model descriptions and one classify call.

The HTTP layer implements `Engine` over the server's own machinery (the same routing, experiments,
batching, metrics and shadow runs as `POST /v1/classify`) and passes it to the handlers of
server/oip/handlers.py. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

# Input tensors: a request gives exactly one of them.
IMAGES = "images"  # BYTES [N] (or [N, 1]): encoded image files (JPEG, PNG, ...), decoded as /v1 decodes
PIXELS = "pixels"  # UINT8 [N, H, W, 3]: RGB crops at the model's input size, not normalised
PIXEL_VALUES = "pixel_values"  # FP32 [N, 3, H, W]: crops normalised with the model's mean and std
INPUT_NAMES = (IMAGES, PIXELS, PIXEL_VALUES)
DATATYPE_OF_INPUT = {IMAGES: "BYTES", PIXELS: "UINT8", PIXEL_VALUES: "FP32"}

# Output tensors, in the order an answer gives them when the request names none.
PROBABILITIES = "probabilities"  # FP32 [N, classes]; BYTES [N, k] "score:index:label" with classification k
INPUT_TOKENS = "input_tokens"  # INT64 [N]: tokens entering the first block (patches + class/register tokens)
TOKENS_PER_BLOCK = "tokens_per_block"  # INT64 [N, depth]: real tokens after each block
FINAL_TOKENS = "final_tokens"  # INT64 [N]: tokens after the last block
GFLOPS = "gflops"  # FP32 [N]: estimated GFLOPs of the image's forward pass
OUTPUT_NAMES = (PROBABILITIES, INPUT_TOKENS, TOKENS_PER_BLOCK, FINAL_TOKENS, GFLOPS)


@dataclass(frozen=True)
class ModelSpec:
    """A loaded model as the protocol describes it (model metadata) and checks requests against."""

    name: str
    variants: tuple[str, ...]  # the model's versions, in the config's order
    default_variant: str
    input_size: tuple[int, int, int]  # (3, H, W)
    labels: tuple[str, ...]  # one per class
    mean: tuple[float, float, float]  # the normalisation of `pixel_values`
    std: tuple[float, float, float]
    depth: int | None = None  # blocks (the width of tokens_per_block); None: -1 in the metadata
    arch: str = ""
    weights: str = ""  # hub | file:<path> | random-init

    @property
    def height_width(self) -> tuple[int, int]:
        return self.input_size[1], self.input_size[2]

    def input_shapes(self) -> dict[str, list[int]]:
        """The inputs' shapes as model metadata gives them (-1: any batch size)."""
        height, width = self.height_width
        return {IMAGES: [-1], PIXELS: [-1, height, width, 3], PIXEL_VALUES: [-1, 3, height, width]}


@dataclass(frozen=True)
class Images:
    """A request's images, exactly as the client sent them: one of three kinds.

    - "encoded": `encoded` holds the files; the engine decodes and crops them as /v1 does.
    - "uint8_hwc": `array` is uint8 [N, H, W, 3]: each image is the engine's usual crop,
      `torch.from_numpy(array).permute(0, 3, 1, 2)[i]` (uint8 [3, H, W], the batches' element).
    - "float32_chw": `array` is float32 [N, 3, H, W], already normalised: the engine must skip its own
      normalisation (and cast to the model's dtype) for these.
    """

    kind: Literal["encoded", "uint8_hwc", "float32_chw"]
    encoded: tuple[bytes, ...] = ()
    array: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.encoded) if self.kind == "encoded" else len(self.array)


@dataclass(frozen=True)
class ClassifyCall:
    """One infer request, as the engine runs it.

    `variant` None: the server chooses (A/B assignment from `experiment` or the model's default
    experiment, else the default variant), as /v1 without `variant=`; a variant is an override.
    `top_k`: scores wanted per image, 1 .. number of classes (all of them for the full probabilities).
    `timeout_s`: the client's own limit (the protocol's `timeout` parameter), None for the server's."""

    model: str
    variant: str | None
    experiment: str | None
    images: Images
    top_k: int
    timeout_s: float | None = None


@dataclass(frozen=True)
class ClassifiedImage:
    """What the forward pass says about one image: the /v1 answer's predictions, tokens and gflops."""

    indices: tuple[int, ...]  # top-k class indices, best first
    scores: tuple[float, ...]  # their softmax probabilities
    input_tokens: int
    tokens_per_block: tuple[int, ...]
    gflops: float

    @classmethod
    def from_answer(cls, answer: Mapping[str, Any]) -> ClassifiedImage:
        """From one /v1 classify answer (docs/api.md), scores as it rounded them (6 decimals)."""
        predictions = answer["predictions"]
        return cls(tuple(p["index"] for p in predictions), tuple(p["score"] for p in predictions),
                   answer["tokens"]["input"], tuple(answer["tokens"]["per_block"]), answer["gflops"])

    @property
    def final_tokens(self) -> int:
        return self.tokens_per_block[-1] if self.tokens_per_block else self.input_tokens


@dataclass(frozen=True)
class Classification:
    """The engine's answer to a ClassifyCall: where it ran, and one result per image in request order."""

    model: str
    variant: str
    experiment: str | None
    assignment: str  # default | assigned | override
    weights: str
    images: tuple[ClassifiedImage, ...]


class Engine(Protocol):
    """The server as the protocol's handlers use it."""

    def ready(self) -> bool:
        """Every model loaded and warmed up (GET /v2/health/ready)."""

    def models(self) -> Mapping[str, ModelSpec | None]:
        """Every configured model by name; None while that model is still loading."""

    def max_images(self) -> int:
        """Images one request may carry (limits.max_images_per_request): more are a 413."""

    async def classify(self, call: ClassifyCall, context: Any) -> Classification:
        """Run the images (routing, queueing, metrics, experiment records, shadow runs as /v1 does).

        Raises server.wire.errors.ApiError as /v1 would (unknown variant or experiment, bad_image, overloaded,
        not_ready, timeout, ...). `context` is the HTTP layer's own (its Request: headers and query for
        sticky keys, client address, request id), handed through untouched."""

    def record_refusal(self, model: str, status: int, context: Any) -> None:
        """Count an infer request the protocol refused before `classify` (malformed body, unknown input):
        /v1 counts every answer in mame_requests_total, and so must the protocol's route. `model` is the
        path's name, which may be unknown: label it as /v1 labels names that are not configured ("")."""
