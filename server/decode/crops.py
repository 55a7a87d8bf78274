"""A model's decoder (the edge to decode for, the resize and centre crop) as plain values, and image bytes
to the model's uint8 crop. Torch-free: front-end processes decode with it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image

from server.decode.imaging import decode_opened, open_image, release_pixels
from server.decode.resize import ResizeCrop

# the edge the resize aims for (decoding may draft down to it), resize + crop
Decoder = tuple[int, ResizeCrop]


def decoder_to_list(decoder: Decoder) -> list[int]:
    """[resize_edge, resize, crop_h, crop_w, resample]: a decoder as JSON, for front-end processes."""
    edge, rc = decoder
    return [edge, rc.edge, *rc.crop, int(rc.resample)]


def decoder_from_list(values: list[int]) -> Decoder:
    edge, rc_edge, crop_h, crop_w, resample = values
    return edge, ResizeCrop(rc_edge, (crop_h, crop_w), Image.Resampling(resample))


def crop_bytes(decoder: Decoder, data: bytes | Image.Image, max_pixels: int) -> bytes:
    """Image bytes (or an image `open_image` opened for this decoder) -> the model's uint8 crop as
    [H, W, 3] bytes."""
    resize_edge, resize_crop = decoder
    image = data if isinstance(data, Image.Image) else open_image(data, max_pixels, needed_edge=resize_edge)
    try:
        return resize_crop(decode_opened(image, resize_edge)).tobytes()
    finally:
        release_pixels(image)


def decode_plan(transform: Any, input_size: Sequence[int]) -> list | None:
    """A model's decoder as JSON for the front-ends (`decoder_to_list`), when its host transform is the
    fused resize + centre crop to the model's input size (else None)."""
    fused: ResizeCrop | None = transform.resize_then_crop
    if fused is None or tuple(fused.crop) != tuple(input_size[1:]):
        return None
    return decoder_to_list((transform.resize_edge, fused))
