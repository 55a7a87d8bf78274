"""What a forward pass says about one image, the JSON answer that shows it, and the message that carries a
request's results from the engine to the front-end process that renders its answer.

Why a front-end renders the answers to the requests it decoded: building an answer (labels, rounding, the
nested JSON) is a sixth of the engine's CPU per 1-image request at full batches (docs/benchmarks.md), and
the engine's interpreter is the one part of the server that does not spread over processes. The message is
a JSON array of the fields, no names, no labels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from pydantic_core import from_json, to_json


class ImageResult(NamedTuple):
    """What one forward pass says about one image (a JSON array in a results message)."""

    indices: list[int]
    scores: list[float]
    tokens_per_block: list[int]
    input_tokens: int
    gflops: float
    queue_s: float
    inference_s: float
    batch_size: int
    device: str


class RouteNames(NamedTuple):
    """What an answer shows of a request's route (server/experiments/registry.py's Assignment)."""

    model: str
    variant: str
    experiment: str | None
    assignment: str


def final_tokens(result: ImageResult) -> int:
    return result.tokens_per_block[-1] if result.tokens_per_block else result.input_tokens


def image_answer(route: Any, weights: str, labels: Sequence[str], request_id: str, result: ImageResult,
                 total_s: float, top_k: int | None = None) -> dict[str, Any]:
    """One image's answer; `route`: an Assignment or RouteNames; `top_k`: the predictions shown, of those
    computed (all when None)."""
    per_block = result.tokens_per_block
    final = final_tokens(result)
    return {
        "request_id": request_id,
        "model": route.model,
        "variant": route.variant,
        "experiment": route.experiment,
        "assignment": route.assignment,
        "weights": weights,
        "predictions": [
            {"label": labels[i] if i < len(labels) else f"class_{i}", "index": i, "score": round(s, 6)}
            for i, s in zip(result.indices[:top_k], result.scores[:top_k])
        ],
        "tokens": {
            "input": result.input_tokens,
            "per_block": per_block,
            "final": final,
            "reduction": round(1.0 - final / result.input_tokens, 4),
        },
        "gflops": round(result.gflops, 4),
        "batch_size": result.batch_size,
        "device": result.device,
        "timings_ms": {
            "queue": round(result.queue_s * 1000, 3),
            "inference": round(result.inference_s * 1000, 3),
            "total": round(total_s * 1000, 3),
        },
    }


def request_answer(request_id: str, answers: list[dict[str, Any]], as_list: bool) -> dict[str, Any]:
    """A request's answer from its images' (`image_answer`): {"request_id", "results": [...]} where `as_list`
    (several images of a multipart request), else the one image's."""
    return {"request_id": request_id, "results": answers} if as_list else answers[0]


def results_message(route: Any, request_id: str, results: Sequence[ImageResult], total_s: float,
                    top_k: int, as_list: bool) -> bytes:
    """A request's results for `render_results`; `as_list` as for `request_answer`."""
    return to_json([request_id, route.model, route.variant, route.experiment, route.assignment, total_s,
                    top_k, as_list, results])


def render_results(message: bytes, answers_of: Mapping[str, tuple[str, Sequence[str]]]) -> bytes:
    """The JSON answer of a `results_message`, as the engine's classify() would write it; `answers_of`: each
    model's weights and labels."""
    request_id, model, variant, experiment, assignment, total_s, top_k, as_list, results = from_json(message)
    route = RouteNames(model, variant, experiment, assignment)
    weights, labels = answers_of[model]
    answers = [image_answer(route, weights, labels, request_id, ImageResult(*result), total_s, top_k)
               for result in results]
    return to_json(request_answer(request_id, answers, as_list))
