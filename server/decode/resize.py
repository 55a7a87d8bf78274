"""The resize and centre crop of a model's eval transform, on PIL images (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image


@dataclass(frozen=True)
class ResizeCrop:
    """timm's eval Resize(shorter edge) + CenterCrop as one PIL resize of the part the crop keeps.

    Same sampling positions and filter width as resizing the whole image and cropping (pixels differ by at
    most 1-2 grey levels, from rounding), for the crop's pixels only: less host CPU per image.
    """

    edge: int  # the shorter side after resizing
    crop: tuple[int, int]  # (height, width)
    resample: Image.Resampling

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        if width <= height:  # torchvision's rounding: the longer side is truncated
            resized_w, resized_h = self.edge, int(self.edge * height / width)
        else:
            resized_w, resized_h = int(self.edge * width / height), self.edge
        crop_h, crop_w = self.crop
        left, top = round((resized_w - crop_w) / 2.0), round((resized_h - crop_h) / 2.0)
        sx, sy = width / resized_w, height / resized_h
        box = (left * sx, top * sy, (left + crop_w) * sx, (top + crop_h) * sy)
        return image.resize((crop_w, crop_h), self.resample, box=box)
