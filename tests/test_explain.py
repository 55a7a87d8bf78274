"""`POST /v1/explain` on the real app (httpx's ASGI transport) and model, and on real servers in both
layouts: the PNG's merged regions are those of the forward's source map, the headers its token counts, the
limits those of classify, and every explanation is counted in its own metrics."""

from __future__ import annotations

import asyncio
import io

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from serverproc import metric_values, running_server, sample_images, tiny_config
from test_http_app import app_of, running

from server.config import parse_config
from server.decode.imaging import decode_image
from server.engine.devices import place_model
from server.engine.models import load_model
from server.engine.worker import explain_forward
from server.http.explain import PANEL_GAP

VARIANT = "mame-0.5"


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    return sample_images()


def check_png_matches_forward(answer: httpx.Response, crop: torch.Tensor, result, blocks: tuple[int, ...]):
    """The answer's panels: the crop, then for each block a patch tinted exactly where the forward merged
    it with another one, and white edges exactly between patches of different tokens; its headers the
    forward's token counts."""
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png", answer.text
    per_block = result.tokens[0].tolist()
    assert answer.headers["x-blocks-shown"] == ",".join(map(str, blocks))
    assert answer.headers["x-tokens-per-block"] == ",".join(map(str, per_block))
    assert answer.headers["x-tokens-input"] == str(result.input_tokens)
    assert answer.headers["x-tokens-shown"] == ",".join(str(per_block[b - 1]) for b in blocks)
    picture = np.array(Image.open(io.BytesIO(answer.content)).convert("RGB"))
    size, patch, grid = 64, 8, 8
    pixels = crop.permute(1, 2, 0).numpy()
    assert picture.shape == (size, (len(blocks) + 1) * size + len(blocks) * PANEL_GAP, 3)
    assert (picture[:, :size] == pixels).all()  # the first panel: the input crop
    merged_any = False
    for panel, block in enumerate(blocks, start=1):
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


def test_explain_png_matches_the_source_map_of_the_forward(photos):
    app = app_of(parse_config(tiny_config()), preprocess_threads=2)

    async def check(client: httpx.AsyncClient) -> None:
        answer = await client.post("/v1/explain", params={"variant": VARIANT, "blocks": "1,3"},
                                   content=photos["shapes"], headers={"content-type": "image/png"})
        assert answer.headers["x-variant"] == VARIANT

        # The forward, independently: the same crop and weights, its source maps and tokens.
        service = app.state.service
        crop = service.transforms["tiny"](decode_image(photos["shapes"], 10**7))
        dm = service.workers[0].models["tiny"]
        result = explain_forward(dm, service.config.models["tiny"].variants[VARIANT], crop)
        check_png_matches_forward(answer, crop, result, (1, 3))
        # The same numbers classify gives for that image and variant.
        classified = (await client.post("/v1/classify", params={"variant": VARIANT}, content=photos["shapes"],
                                        headers={"content-type": "image/png"})).json()
        assert classified["tokens"]["per_block"] == result.tokens[0].tolist()

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


def forward_of(photo: bytes, variant: str = VARIANT):
    """The crop and the forward (source maps kept) of the tiny model as a server loads it (random weights
    from a fixed seed), in this process."""
    cfg = parse_config(tiny_config()).models["tiny"]
    loaded = load_model("tiny", cfg)
    dm = place_model("tiny", loaded.model, torch.device("cpu"), torch.float32, loaded.input_size,
                     copy_weights=False, mean=loaded.transform.mean, std=loaded.transform.std)
    crop = loaded.transform(decode_image(photo, 10**7))
    return crop, explain_forward(dm, cfg.variants[variant], crop)


@pytest.mark.e2e
@pytest.mark.parametrize("layout", ["single", "frontends"])
def test_explain_over_http_as_curl_sends_it(photos, layout):
    """`curl -F file=@photo 'localhost:8000/v1/explain?variant=...'` on a real server, in each layout (with
    front-ends, the crop is made there and the forward runs in the device process): the PNG of the forward's
    source maps, and the explanations counted, refusals included, in their own metrics only."""
    args = ["--layout", layout] + (["--http-processes", "1"] if layout == "frontends" else [])
    crop, result = forward_of(photos["text"])
    with running_server(tiny_config(), args=args) as server:
        answer = httpx.post(f"{server.url}/v1/explain", params={"variant": VARIANT},
                            files={"file": ("photo.png", photos["text"], "image/png")}, timeout=60)
        check_png_matches_forward(answer, crop, result, (1, 2, 3))  # the variant's merging blocks: 3
        refused = httpx.post(f"{server.url}/v1/explain", params={"variant": VARIANT, "blocks": "7"},
                             files={"file": ("photo.png", photos["text"], "image/png")}, timeout=60)
        assert refused.status_code == 422 and refused.json()["error"] == "invalid_parameter", refused.text
        broken = httpx.post(f"{server.url}/v1/explain", content=b"not an image",
                            headers={"content-type": "image/png"}, timeout=60)
        assert broken.status_code == 400 and broken.json()["error"] == "bad_image", broken.text
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    counted = metric_values(metrics, "mame_explain_requests_total")
    assert counted == {f'{{model="tiny",status="{status}",variant="{variant}"}}': 1.0
                       for status, variant in (("200", VARIANT), ("422", VARIANT), ("400", "baseline"))}
    durations = metric_values(metrics, "mame_explain_duration_seconds_count")
    assert durations == {'{model="tiny",variant="mame-0.5"}': 2.0, '{model="tiny",variant="baseline"}': 1.0}
    assert not metric_values(metrics, "mame_requests_total")  # classify's own figures stay apart
