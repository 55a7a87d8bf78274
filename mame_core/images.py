"""Images for the command-line tools (mame-bench, mame-vis, mame-eval); their models come from
mame_core.models (re-exported here for the tools that import them from this module).

Preprocessing always comes from the model's own timm data config; nothing here hard-codes a
resolution, a mean or a std.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from timm.data import create_transform

from mame_core.models import data_config, load_model, parse_model_kwargs  # noqa: F401 - the tools' names

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})
SAMPLES_DIR = Path(__file__).resolve().parent / "samples"


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"image folder {str(folder)!r} does not exist or is not a directory")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(
            f"no images in {str(folder)!r} (looked for files ending in {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return paths


def sample_images() -> list[Path]:
    """The photographs bundled with the package (see samples/LICENSES.md)."""
    return list_images(SAMPLES_DIR)


@contextmanager
def _opened(path: str | Path) -> Iterator[Image.Image]:
    """PIL's image at `path`; what PIL cannot read there (header or pixels) is a ValueError naming the
    file."""
    try:
        with Image.open(path) as img:
            yield img
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{str(path)!r} is not a readable image: {err}") from err


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image file to RGB, honouring EXIF orientation; a clear ValueError if it is not one."""
    with _opened(path) as img:
        return ImageOps.exif_transpose(img).convert("RGB")


def check_image(path: str | Path) -> None:
    """A ValueError naming `path` unless PIL recognises it as an image (reads the header only)."""
    with _opened(path):
        pass


def check_merge_blocks(option: str, blocks: int | None, model: torch.nn.Module) -> None:
    """A command's count of merging blocks must be 1..depth: the patch would cut a larger one silently.
    None (the option left out) is MergeSettings' default, which fits any depth."""
    depth = len(model.blocks)
    if blocks is not None and not 1 <= blocks <= depth:
        raise ValueError(f"{option} {blocks} outside 1..{depth} (the model has {depth} blocks)")


def model_transform(model: torch.nn.Module) -> Callable[[Image.Image], torch.Tensor]:
    """The model's own evaluation preprocessing (resize, crop, normalise) as timm resolves it."""
    return create_transform(**data_config(model), is_training=False)


def augmented_copy(img: Image.Image, copy_index: int, rng: random.Random) -> Image.Image:
    """Copy number `copy_index` of a picture for filling a batch: the first is the picture itself,
    later ones are crops of 60-100 % of the area, every other one mirrored, so that a batch holds
    no two identical images (identical images would make every merge decision the same)."""
    if copy_index == 0:
        return img
    w, h = img.size
    scale = rng.uniform(0.6, 1.0) ** 0.5
    cw, ch = max(1, round(w * scale)), max(1, round(h * scale))
    left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
    out = img.crop((left, top, left + cw, top + ch))
    if copy_index % 2 == 1:
        out = ImageOps.mirror(out)
    return out


def fill_batch(images: list[Image.Image], batch_size: int, seed: int = 0) -> list[Image.Image]:
    """`batch_size` pictures made by cycling through `images`, later rounds augmented."""
    if not images:
        raise ValueError("need at least one image to fill a batch")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    rng = random.Random(seed)
    return [augmented_copy(images[i % len(images)], i // len(images), rng) for i in range(batch_size)]


def make_batch(
    paths: list[Path], model: torch.nn.Module, batch_size: int, seed: int = 0
) -> torch.Tensor:
    """A [batch_size, 3, H, W] float32 tensor of the pictures, preprocessed for `model`."""
    transform = model_transform(model)
    pictures = fill_batch([load_rgb(p) for p in paths], batch_size, seed)
    return torch.stack([transform(p) for p in pictures])
