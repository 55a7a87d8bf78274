"""Request bodies: images from a directory, the samples bundled with mame_core, or a generated set."""
from __future__ import annotations

import importlib.util
import io
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

CONTENT_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
    ".bmp": "image/bmp",
    ".gif": "image/gif",
}


@dataclass(frozen=True)
class ImagePayload:
    name: str
    data: bytes
    content_type: str


def images_from_dir(directory: Path) -> list[ImagePayload]:
    """Every image file directly in `directory`, sorted by name; a clear error when there is none."""
    if not directory.is_dir():
        raise ValueError(f"image directory {directory} does not exist or is not a directory")
    payloads = [
        ImagePayload(path.name, path.read_bytes(), CONTENT_TYPES[path.suffix.lower()])
        for path in sorted(directory.iterdir())
        if path.is_file() and path.suffix.lower() in CONTENT_TYPES
    ]
    if not payloads:
        kinds = ", ".join(sorted(CONTENT_TYPES))
        raise ValueError(f"no image files ({kinds}) in {directory}")
    return payloads


def bundled_samples_dir() -> Path | None:
    """mame_core/samples, found without importing mame_core (which would pull in torch)."""
    spec = importlib.util.find_spec("mame_core")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "samples"
        if candidate.is_dir():
            return candidate
    return None


def generated_images(count: int = 4, size: int = 224, seed: int = 0) -> list[ImagePayload]:
    """Synthetic PNGs of very different content (flat regions merge a lot, noise hardly at all),
    so token counts vary between requests as they do with real photos."""
    rng = random.Random(seed)
    makers = [_gradient, _checkerboard, _noise, _shapes]
    payloads = []
    for index in range(count):
        image = makers[index % len(makers)](size, rng)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        payloads.append(ImagePayload(f"generated-{index}.png", buffer.getvalue(), "image/png"))
    return payloads


def load_images(directory: Path | None) -> list[ImagePayload]:
    """The user's directory if given, else the bundled samples, else generated images."""
    if directory is not None:
        return images_from_dir(directory)
    samples = bundled_samples_dir()
    if samples is not None:
        try:
            return images_from_dir(samples)
        except ValueError:
            pass  # an empty samples folder: fall through to generated images
    return generated_images()


def _gradient(size: int, rng: random.Random) -> Image.Image:
    image = Image.linear_gradient("L").resize((size, size)).convert("RGB")
    return Image.merge(
        "RGB", (image.getchannel(0), image.getchannel(0).rotate(90), Image.new("L", image.size, 90))
    )


def _checkerboard(size: int, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    cell = size // 8
    for row in range(8):
        for col in range(8):
            if (row + col) % 2:
                draw.rectangle(
                    [col * cell, row * cell, (col + 1) * cell - 1, (row + 1) * cell - 1], fill="black"
                )
    return image


def _noise(size: int, rng: random.Random) -> Image.Image:
    return Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3))


def _shapes(size: int, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (size, size), (40, 120, 200))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = rng.randrange(size), rng.randrange(size)
        radius = rng.randrange(size // 16, size // 4)
        color = tuple(rng.randrange(256) for _ in range(3))
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=color)
    return image
