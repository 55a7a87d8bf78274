"""`POST /v1/explain` on the real app (httpx's ASGI transport) and model: the PNG's merged regions are
those of the forward's source map, the headers its token counts, and the limits those of classify."""

from __future__ import annotations

import asyncio
import io

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from serverproc import running_server, sample_images, tiny_config
from test_http_app import app_of, running

from server.config import parse_config
from server.decode.imaging import decode_image
from server.http.explain import PANEL_GAP, explain_forward

VARIANT = "mame-0.5"


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    return sample_images()


def test_explain_png_matches_the_source_map_of_the_forward(photos):
    app = app_of(parse_config(tiny_config()), preprocess_threads=2)

    async def check(client: httpx.AsyncClient) -> None:
        answer = await client.post("/v1/explain", params={"variant": VARIANT, "blocks": "1,3"},
                                   content=photos["shapes"], headers={"content-type": "image/png"})
        assert answer.status_code == 200 and answer.headers["content-type"] == "image/png", answer.text
        picture = np.array(Image.open(io.BytesIO(answer.content)).convert("RGB"))
        assert answer.headers["x-blocks-shown"] == "1,3" and answer.headers["x-variant"] == VARIANT

        # The forward, independently: the same crop and weights, its source maps and tokens.
        service = app.state.service
        crop = service.transforms["tiny"](decode_image(photos["shapes"], 10**7))
        dm = service.workers[0].models["tiny"]
        result = explain_forward(dm, service.config.models["tiny"].variants[VARIANT], crop)
        per_block = result.tokens[0].tolist()
        assert answer.headers["x-tokens-per-block"] == ",".join(map(str, per_block))
        assert answer.headers["x-tokens-input"] == str(result.input_tokens)
        assert answer.headers["x-tokens-shown"] == f"{per_block[0]},{per_block[2]}"
        # The same numbers classify gives for that image and variant.
        classified = (await client.post("/v1/classify", params={"variant": VARIANT}, content=photos["shapes"],
                                        headers={"content-type": "image/png"})).json()
        assert classified["tokens"]["per_block"] == per_block

        size, patch, grid = 64, 8, 8
        pixels = crop.permute(1, 2, 0).numpy()
        assert picture.shape == (size, 3 * size + 2 * PANEL_GAP, 3)
        assert (picture[:, :size] == pixels).all()  # the first panel: the input crop
        merged_any = False
        for panel, block in enumerate((1, 3), start=1):
            drawn = picture[:, panel * (size + PANEL_GAP): panel * (size + PANEL_GAP) + size]
            owner = result.sources[block - 1][0].float().argmax(dim=0).view(grid, grid)  # token per patch
            group_size = torch.bincount(owner.flatten(), minlength=owner.max() + 1)[owner]
            for row in range(grid):
                for col in range(grid):
                    rows = slice(row * patch, row * patch + patch - 1)  # the patch less its edge pixels
                    inner = (rows, slice(col * patch, col * patch + patch - 1))
                    tinted = not (drawn[inner] == pixels[inner]).all()
                    # A patch is painted exactly when the forward merged it with another one.
                    assert tinted == bool(group_size[row, col] > 1), (block, row, col)
                    merged_any |= tinted
                    if col + 1 < grid:  # a white edge exactly where neighbours belong to different tokens
                        edge = drawn[rows, col * patch + patch - 1]
                        assert (edge == 255).all() == bool(owner[row, col] != owner[row, col + 1])
        assert merged_any, "the case must merge something"

    asyncio.run(running(app, check))


def test_explain_is_bounded_and_refuses_clearly(photos):
    app = app_of(parse_config(tiny_config(limits={"max_body_bytes": 2000})), preprocess_threads=2)

    async def check(client: httpx.AsyncClient) -> None:
        png = {"content-type": "image/png"}
        big = await client.post("/v1/explain", content=b"\0" * 5000, headers=png)
        assert big.status_code == 413 and big.json()["error"] == "too_large"
        blocks = await client.post("/v1/explain", params={"blocks": "9"}, content=photos["flat"], headers=png)
        assert blocks.status_code == 422 and "blocks [9] outside 1..4" in blocks.json()["detail"]
        variant = await client.post("/v1/explain", params={"variant": "nope"}, content=photos["flat"],
                                    headers=png)
        assert variant.status_code == 404 and variant.json()["error"] == "unknown_variant"
        broken = await client.post("/v1/explain", content=b"not an image", headers=png)
        assert broken.status_code == 400 and broken.json()["error"] == "bad_image"
        default = await client.post("/v1/explain", params={"variant": "mame-0.9"}, content=photos["flat"],
                                    headers=png)
        assert default.status_code == 200 and default.headers["x-blocks-shown"] == "1,2,3"  # blocks: 3

    asyncio.run(running(app, check))


@pytest.mark.e2e
@pytest.mark.parametrize("layout", ["single", "frontends"])
def test_explain_over_http_as_curl_sends_it(photos, layout):
    """`curl -F file=@photo 'localhost:8000/v1/explain?variant=...'` on a real server: a PNG; in the
    frontends layout the clear 501."""
    args = ["--layout", layout] + (["--http-processes", "1"] if layout == "frontends" else [])
    with running_server(tiny_config(), args=args) as server:
        answer = httpx.post(f"{server.url}/v1/explain", params={"variant": VARIANT},
                            files={"file": ("photo.png", photos["text"], "image/png")}, timeout=60)
    if layout == "single":
        assert answer.status_code == 200 and answer.content.startswith(b"\x89PNG\r\n\x1a\n")
        assert Image.open(io.BytesIO(answer.content)).size == (64 * 4 + 3 * PANEL_GAP, 64)  # 3 merge blocks
        assert answer.headers["x-blocks-shown"] == "1,2,3"
    else:
        assert answer.status_code == 501 and answer.json()["error"] == "not_implemented"
        assert "--layout single" in answer.json()["detail"]
