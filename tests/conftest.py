import os

import pytest
import timm
import torch

# Two cores, several test processes: keep torch from oversubscribing them.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TINY_VIT = {"img_size": 64, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 2}


def tiny_vit(arch: str = "vit_tiny_patch16_224", seed: int = 0, **overrides) -> torch.nn.Module:
    """A randomly initialised (not pretrained) small ViT for fast tests."""
    torch.manual_seed(seed)
    return timm.create_model(arch, pretrained=False, **{**TINY_VIT, **overrides}).eval()


def content_images(size: int = 64) -> torch.Tensor:
    """Four images of very different content: flat, smooth gradient, noise, and half flat / half stripes."""
    gen = torch.Generator().manual_seed(0)
    flat = torch.full((3, size, size), 0.3)
    ramp = torch.linspace(-1, 1, size)
    gradient = torch.stack(
        [ramp.view(1, -1).expand(size, size), ramp.view(-1, 1).expand(size, size), torch.zeros(size, size)]
    )
    noise = torch.randn(3, size, size, generator=gen)
    stripes = flat.clone()
    stripes[:, size // 2:, ::2] = 1.5
    return torch.stack([flat, gradient, noise, stripes])


@pytest.fixture
def images() -> torch.Tensor:
    return content_images()
