"""`POST /v1/explain`: for one image and one variant, which patches merged after the chosen blocks, drawn as
`mame-vis` draws it (mame_core/vis.py: each group of merged patches in one colour, group edges in white),
as one PNG of panels side by side (the input crop, then one panel per block), with the token counts in
headers (docs/api.md).

Bounded and admitted like classify: the same body and pixel limits and request timeout, readiness, model
and variant routing; explanations run one at a time (another while one runs answers 503 overloaded), off
the event loop, on the model the server process holds. A forward that keeps its source maps is not a
batch the scheduler and device processes run, so in the `frontends` layout, where the weights live in the
device processes only, explain answers 501.
"""

from __future__ import annotations

import asyncio
import io
import time
from typing import TYPE_CHECKING

import numpy as np
import torch
from fastapi import Request
from PIL import Image
from starlette.responses import Response

from mame_core import MergeSettings
from mame_core.vis import draw_groups, parse_blocks, source_map_to_groups
from server.engine.worker import DeviceWorker
from server.wire.body import image_payloads, read_limited
from server.wire.errors import ApiError, invalid_parameter, not_ready, overloaded, timeout
from server.wire.pool import run_all_in_pool

if TYPE_CHECKING:
    from server.engine.devices import DeviceModel
    from server.http.classify import Engine

PANEL_GAP = 4  # white pixels between panels


def default_blocks(settings: MergeSettings, depth: int) -> list[int]:
    """Every block that merges (the last one if none does), 1-based."""
    merging = settings.merge_blocks(depth)
    return list(range(1, merging + 1)) if merging else [depth]


def in_process_model(engine: Engine, model: str) -> DeviceModel:
    for worker in engine.service.workers:
        if isinstance(worker, DeviceWorker) and model in worker.models:
            return worker.models[model]
    raise ApiError(501, "not_implemented", "explain runs on a model held by the server process: start "
                   "the server with --layout single (in the frontends layout the weights are in the device "
                   "processes)")


def explain_forward(dm: DeviceModel, settings: MergeSettings, crop: torch.Tensor):
    """One image's forward with its source maps: uint8 [3, H, W] crop -> MergeResult."""
    with torch.inference_mode():
        x = crop.unsqueeze(0).to(dm.device).contiguous().float().div_(255).sub_(dm.mean).div_(dm.std)
        return dm.vit(x.to(dm.dtype), settings, return_source=True)


def panels_png(crop: torch.Tensor, sources: list[torch.Tensor], blocks: list[int],
               grid: tuple[int, int]) -> bytes:
    """The input crop, then the groups after each block, side by side, as PNG."""
    pixels = np.ascontiguousarray(crop.permute(1, 2, 0).numpy())
    panels = [pixels] + [draw_groups(pixels, source_map_to_groups(sources[b - 1][0].float().cpu()), grid)
                         for b in blocks]
    height, width = pixels.shape[:2]
    canvas = np.full((height, len(panels) * (width + PANEL_GAP) - PANEL_GAP, 3), 255, dtype=np.uint8)
    for i, panel in enumerate(panels):
        canvas[:, i * (width + PANEL_GAP): i * (width + PANEL_GAP) + width] = panel
    buffer = io.BytesIO()
    Image.fromarray(canvas).save(buffer, "PNG")
    return buffer.getvalue()


async def explain(engine: Engine, request: Request, running: asyncio.Semaphore) -> Response:
    params, limits, service = request.query_params, engine.config.limits, engine.service
    deadline = time.monotonic() + limits.request_timeout_s
    if not service.ready.is_set():
        raise not_ready("models are still loading and warming up")
    route = engine.registry.choose(model=params.get("model"), variant=params.get("variant"),
                                   headers=request.headers, query=params,
                                   client_host=request.client.host if request.client else None)
    dm = in_process_model(engine, route.model)
    settings = engine.config.models[route.model].variants[route.variant]
    depth = dm.vit.depth
    try:
        given = params.get("blocks")
        blocks = parse_blocks(given, depth) if given is not None else default_blocks(settings, depth)
    except ValueError as exc:
        raise invalid_parameter(str(exc).replace("--blocks-shown", "blocks")) from None
    if running.locked():
        raise overloaded("an explanation is running; explanations run one at a time")
    async with running:
        body = await read_limited(request.receive, request.headers.get("content-length", ""),
                                  limits.max_body_bytes, max(0.0, deadline - time.monotonic()))
        payloads, _ = image_payloads(request.headers.get("content-type", ""), body, 1)
        (crop,) = await run_all_in_pool(engine.pool, service.preprocess,
                                        [(route.model, payloads[0][1], limits.max_pixels)])
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                result = await loop.run_in_executor(engine.pool, explain_forward, dm, settings, crop)
        except TimeoutError:
            raise timeout(f"no answer within the request timeout of {limits.request_timeout_s} s") from None
        grid = tuple(dm.vit.model.patch_embed.grid_size)
        png = await loop.run_in_executor(engine.pool, panels_png, crop, result.sources, blocks, grid)
    per_block = result.tokens[0].tolist()
    return Response(png, media_type="image/png", headers={
        "X-Model": route.model, "X-Variant": route.variant, "X-Blocks-Shown": ",".join(map(str, blocks)),
        "X-Tokens-Input": str(result.input_tokens), "X-Tokens-Per-Block": ",".join(map(str, per_block)),
        "X-Tokens-Shown": ",".join(str(per_block[b - 1]) for b in blocks)})
