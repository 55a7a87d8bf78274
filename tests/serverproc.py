"""Helpers for every end-to-end test: a tiny-ViT serving config and a real server process on loopback."""

from __future__ import annotations

import copy
import re
from typing import Any

from loadtest.launch import ServerProcess, free_port, running_server

__all__ = ["TINY_MODEL", "ServerProcess", "free_port", "running_server", "tiny_config"]

TINY_MODEL: dict[str, Any] = {
    "arch": "vit_tiny_patch16_224",
    "model_kwargs": {"img_size": 64, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 2},
    "weights": "random",
    "device": "cpu",
    "dtype": "float32",
}

TINY_VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {"method": "none"},
    "mame-0.9": {"method": "mame", "tau": 0.9, "blocks": 3},
    "mame-0.5": {"method": "mame", "tau": 0.5, "blocks": 3},
    "tome-r8": {"method": "tome", "r": 8},
}


def tiny_config(variants: dict | None = None, batching: dict | None = None, **top_level: Any) -> dict:
    """A valid serving config with one model "tiny" (random weights, CPU); top-level keys override."""
    model = copy.deepcopy(TINY_MODEL)
    model["variants"] = copy.deepcopy(variants if variants is not None else TINY_VARIANTS)
    model["default_variant"] = next(iter(model["variants"]))
    model["batching"] = {"max_batch_size": 16, "max_wait_ms": 20, "max_queue": 256, **(batching or {})}
    return {"models": {"tiny": model}, "default_model": "tiny", **top_level}


def sample_images(size: int = 96) -> dict[str, bytes]:
    """PNG-encoded pictures of very different content: gradient, flat, shapes, text-like texture, noise."""
    import io
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(0)
    pictures = {}
    gradient = Image.new("RGB", (size, size))
    gradient.putdata([(x * 255 // size, y * 255 // size, 128) for y in range(size) for x in range(size)])
    pictures["gradient"] = gradient
    pictures["flat"] = Image.new("RGB", (size, size), (90, 140, 200))
    shapes = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(shapes)
    draw.ellipse((5, 5, size // 2, size // 2), fill="red")
    draw.rectangle((size // 2, size // 3, size - 4, size - 4), fill="blue")
    draw.polygon([(0, size), (size // 3, size // 2), (size // 2, size)], fill="green")
    pictures["shapes"] = shapes
    text = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(text)
    for row in range(0, size, 8):
        draw.text(
            (rng.randint(0, 6), row), "".join(rng.choice("abcxyz MaMe") for _ in range(20)), fill="black"
        )
    pictures["text"] = text
    pictures["noise"] = Image.frombytes(
        "RGB", (size, size), bytes(rng.getrandbits(8) for _ in range(size * size * 3))
    )
    encoded = {}
    for name, picture in pictures.items():
        buffer = io.BytesIO()
        picture.save(buffer, "PNG")
        encoded[name] = buffer.getvalue()
    return encoded


def metric_values(text: str, name: str) -> dict[str, float]:
    """{label string: value} of one metric in Prometheus text format (labels in the exporter's order)."""
    values = {}
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+(\S+)$", line)
        if match:
            values[match.group(1) or ""] = float(match.group(2))
    return values
