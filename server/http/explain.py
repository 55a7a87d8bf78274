"""`POST /v1/explain`: for one image and one variant, which patches merged after the chosen blocks, drawn as
`mame-vis` draws it (mame_core/vis.py: each group of merged patches in one colour, group edges in white),
as one PNG of panels side by side (the input crop, then one panel per block), with the token counts in
headers (docs/api.md).

Bounded and admitted like classify: the same body and pixel limits and request timeout, readiness, model
and variant routing; explanations run one at a time (another while one runs answers 503 overloaded). The
forward keeps its source maps, which the batches do not: it runs on its own, off the event loop, where the
model's weights are (in a thread on the server process's copy, or in the device process between two
batches: InferenceService.explain). In the `frontends` layout a front-end decodes the image and sends the
crop over the channel, as for classify. Counted in `mame_explain_requests_total` and
`mame_explain_duration_seconds`, apart from classify's metrics.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from starlette.responses import Response

from mame_core import MergeSettings
from mame_core.vis import draw_groups, parse_blocks, source_map_to_groups
from server.http.classify import _asked_labels, decode_opened, open_images
from server.http.frontend_requests import frontend_crops, raise_frontend_error, shared_crops_at
from server.wire.body import image_payloads, read_limited
from server.wire.errors import ApiError, internal, invalid_parameter, not_ready, overloaded, timeout
from server.wire.protocol import FRONTEND_MODEL

if TYPE_CHECKING:
    from server.engine.worker import Explanation
    from server.http.classify import ClassifyRequest, Engine

log = logging.getLogger("mame.server")

PANEL_GAP = 4  # white pixels between panels


def default_blocks(settings: MergeSettings, depth: int) -> list[int]:
    """Every block that merges (the last one if none does), 1-based."""
    merging = settings.merge_blocks(depth)
    return list(range(1, merging + 1)) if merging else [depth]


def panels_png(crop: torch.Tensor, sources: list[np.ndarray], grid: tuple[int, int]) -> bytes:
    """The input crop, then the groups of each source map ([tokens, patches]), side by side, as PNG."""
    pixels = np.ascontiguousarray(crop.permute(1, 2, 0).numpy())
    panels = [pixels] + [draw_groups(pixels, source_map_to_groups(torch.from_numpy(source)), grid)
                         for source in sources]
    height, width = pixels.shape[:2]
    canvas = np.full((height, len(panels) * (width + PANEL_GAP) - PANEL_GAP, 3), 255, dtype=np.uint8)
    for i, panel in enumerate(panels):
        canvas[:, i * (width + PANEL_GAP): i * (width + PANEL_GAP) + width] = panel
    buffer = io.BytesIO()
    Image.fromarray(canvas).save(buffer, "PNG")
    return buffer.getvalue()


async def explain(engine: Engine, request: ClassifyRequest) -> Response:
    """The PNG, or an ApiError (answered by the caller as the contract says); counted either way."""
    model, _, _ = _asked_labels(engine, {k: v for k, v in request.query.items() if k == "model"})
    labels, status = [model, ""], 500
    try:
        answer = await _explain(engine, request, labels)
        status = 200
        return answer
    except ApiError as exc:
        status = exc.status
        raise
    except Exception as exc:
        log.exception("explanation %s failed", request.request_id)
        raise internal(f"{type(exc).__name__}: {exc}") from None
    finally:
        metrics = engine.metrics
        metrics.explain_duration_of(*labels).observe(time.monotonic() - request.started)
        metrics.explain_requests_of(*labels, str(status)).inc()


async def _explain(engine: Engine, request: ClassifyRequest, labels: list[str]) -> Response:
    params, limits, service = request.query, engine.config.limits, engine.service
    deadline = request.started + limits.request_timeout_s
    if not service.ready.is_set():
        raise not_ready("models are still loading and warming up")
    route = engine.registry.choose(model=params.get("model"), variant=params.get("variant"),
                                   headers=request.headers, query=params, client_host=request.client_host)
    labels[:] = [route.model, route.variant]
    info, settings = service.models[route.model], engine.config.models[route.model].variants[route.variant]
    try:
        given, depth = params.get("blocks"), info.depth
        blocks = parse_blocks(given, depth) if given is not None else default_blocks(settings, depth)
    except ValueError as exc:
        raise invalid_parameter(str(exc).replace("--blocks-shown", "blocks")) from None
    if engine.explaining.locked():
        raise overloaded("an explanation is running; explanations run one at a time")
    async with engine.explaining:
        crop = await _crop(engine, request, route.model, deadline)
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                explained: Explanation = await asyncio.wrap_future(
                    service.explain(route.model, settings, crop, blocks, engine.pool))
        except TimeoutError:
            raise timeout(f"no answer within the request timeout of {limits.request_timeout_s} s") from None
        png = await asyncio.get_running_loop().run_in_executor(
            engine.pool, panels_png, crop, explained.sources, info.patch_grid)
    per_block = explained.tokens_per_block
    return Response(png, media_type="image/png", headers={
        "X-Model": route.model, "X-Variant": route.variant, "X-Blocks-Shown": ",".join(map(str, blocks)),
        "X-Tokens-Input": str(explained.input_tokens), "X-Tokens-Per-Block": ",".join(map(str, per_block)),
        "X-Tokens-Shown": ",".join(str(per_block[b - 1]) for b in blocks)})


async def _crop(engine: Engine, request: ClassifyRequest, model: str, deadline: float) -> torch.Tensor:
    """The image's uint8 [3, H, W] crop: the one a front-end made (or the error it met), else decoded here
    from the body."""
    limits, headers = engine.config.limits, request.headers
    if request.receive is None:  # decoded by a front-end, for the model the engine routes to
        raise_frontend_error(headers)
        if headers.get(FRONTEND_MODEL) != model:  # the front-end routes explanations as the engine does
            raise internal(f"a front-end made the crop for model {headers.get(FRONTEND_MODEL)!r}, "
                           f"the route's is {model!r}")
        input_size = engine.service.models[model].input_size
        (crop,) = frontend_crops(headers, request.crops, input_size, engine.arenas, shared_crops_at(headers))
        return crop.clone()  # its own memory: the message's bytes are gone once this returns
    body = await read_limited(request.receive, headers.get("content-length", ""), limits.max_body_bytes,
                              max(0.0, deadline - time.monotonic()))
    payloads, _ = image_payloads(headers.get("content-type", ""), body, 1)
    (crop,) = await decode_opened(engine, model, open_images(engine, model, [payloads[0][1]]), deadline)
    return crop
