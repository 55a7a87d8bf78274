"""Half precision (MAME_SPEC 5a): merge decisions in fp32, token counts batch-invariant, sizes conserved."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import content_images

from mame_core import MergeSettings, patch_vit
from mame_core import patch as patch_module
from mame_core.images import make_batch, sample_images
from mame_core.merge import TokenBatch, mame_merge

SHAPES = {  # ViT-Ti and ViT-S widths and depth, at 112 px (49 patches) to stay fast on a CPU
    "vit-ti": {"embed_dim": 192, "num_heads": 3},
    "vit-s": {"embed_dim": 384, "num_heads": 6},
}


def half_vit(shape: str, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=112, **SHAPES[shape])
    return model.eval().to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_decisions_are_made_in_fp32(dtype):
    # The half-precision merge must decide exactly as fp32 does on the same (rounded) keys and tokens.
    gen = torch.Generator().manual_seed(1)
    centres = torch.randn(4, 16, generator=gen)
    picks = torch.randint(0, 4, (2, 40), generator=gen)
    metric = centres[picks] + 0.4 * torch.randn(2, 40, 16, generator=gen)
    x = torch.randn(2, 40, 32, generator=gen).to(dtype)
    metric = metric.to(dtype)
    size = torch.rand(2, 40, generator=gen) * 3 + 1
    half, half_lengths = mame_merge(TokenBatch(x, size), metric, torch.tensor([0.6, 0.8]), num_special=1)
    full, full_lengths = mame_merge(TokenBatch(x.float(), size), metric.float(), torch.tensor([0.6, 0.8]), 1)
    assert torch.equal(half_lengths, full_lengths) and half_lengths.tolist() != [40, 40]
    assert half.size.dtype == torch.float32 and torch.equal(half.size, full.size)
    assert half.x.dtype == dtype
    torch.testing.assert_close(half.x.float(), full.x.to(dtype).float(), atol=0, rtol=0)


@pytest.mark.parametrize("shape", ["vit-ti", pytest.param("vit-s", marks=pytest.mark.slow)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_token_counts_batch_invariant_and_sizes_conserved(shape, dtype, monkeypatch):
    model = half_vit(shape, dtype)
    vit = patch_vit(model)
    photos = make_batch(sample_images(), model, 8)
    synthetic = torch.nn.functional.interpolate(content_images(), size=112)[[0, 2]]  # flat, noise
    images = torch.cat([photos[:6], synthetic]).to(dtype)

    size_sums: list[torch.Tensor] = []
    real_merge = patch_module.mame_merge_packed

    def recording_merge(*args, **kwargs):
        merged = real_merge(*args, **kwargs)
        size_sums.append(merged.padded().size.sum(dim=1))
        return merged

    monkeypatch.setattr(patch_module, "mame_merge_packed", recording_merge)
    differing = total = 0
    with torch.inference_mode():
        for tau in (0.7, 0.8, 0.9):
            settings = MergeSettings(method="mame", tau=tau)
            together = vit(images, settings)
            assert len(set(together.tokens[:, -1].tolist())) >= 3, "the images should merge very differently"
            for i in range(len(images)):
                alone = vit(images[i:i + 1], settings)
                differing += int((alone.tokens[0] != together.tokens[i]).sum())
                total += together.tokens.shape[1]
    assert differing <= 0.02 * total, f"{differing} of {total} (image, block) token counts differ"
    assert len(size_sums) == 3 * 9 * 8  # 3 taus, 9 forwards, 8 merging blocks
    for sums in size_sums:
        torch.testing.assert_close(sums, torch.full_like(sums, vit.input_tokens), atol=1e-2, rtol=0)
