"""The host half of a model's timm eval transform (PIL image -> resized, centre-cropped uint8 [3, H, W]);
the other half (to [0, 1], minus the mean, over the std) runs batched on the model's device, so the host
does less per image and copies a quarter of the bytes to the device."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from mame_core.models import data_config
from server.decode.resize import ResizeCrop


@dataclass(frozen=True)
class HostTransform:
    """The host half of the model's timm eval transform: PIL image -> resized, cropped uint8 [3, H, W].

    The other half (to [0, 1], minus `mean`, over `std`) runs batched on the model's device, so the host
    does less per image and copies a quarter of the bytes to the device.
    """

    pil_to_uint8: Callable  # timm's eval transform with use_prefetcher=True
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize_edge: int  # the edge the resize step aims for: the decoder need not keep much more detail
    resize_then_crop: ResizeCrop | None = None  # set when the transform is the usual resize, centre crop

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if self.resize_then_crop is not None:
            return pil_to_tensor(self.resize_then_crop(image))
        return self.pil_to_uint8(image)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 [3, H, W] (a channels-last view: the device makes it contiguous in the
    batch)."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)  # a copy: torch wants a writable array


def fused_resize_crop(transform: Callable) -> ResizeCrop | None:
    """The ResizeCrop equal to timm's eval transform, when it is exactly Resize(int), CenterCrop,
    to-tensor."""
    steps = getattr(transform, "transforms", None)
    if not steps or len(steps) != 3:
        return None
    resize, crop, to_tensor = steps
    if not (isinstance(resize, transforms.Resize) and isinstance(crop, transforms.CenterCrop)
            and type(to_tensor).__name__ == "MaybePILToTensor"):
        return None
    size = resize.size if isinstance(resize.size, int) else resize.size[0] if len(resize.size) == 1 else None
    modes = {InterpolationMode.BICUBIC: Image.Resampling.BICUBIC, InterpolationMode.BILINEAR:
             Image.Resampling.BILINEAR, InterpolationMode.NEAREST: Image.Resampling.NEAREST}
    crop_size = tuple(crop.size) if len(crop.size) == 2 else (crop.size[0], crop.size[0])
    if size is None or resize.max_size is not None or resize.interpolation not in modes \
            or not resize.antialias or size < max(crop_size):
        return None
    return ResizeCrop(size, crop_size, modes[resize.interpolation])


def preprocessing(model: torch.nn.Module) -> tuple[HostTransform, tuple[int, int, int]]:
    """timm's eval transform from the model's own data config, at the size the model was built for,
    split into its host half (uint8 crop) and its normalisation (done on the device)."""
    config = data_config(model)
    input_size = tuple(config["input_size"])
    resize_edge = math.floor(max(input_size[1:]) / config["crop_pct"])  # as timm's eval transform
    timm_transform = create_transform(**config, is_training=False, use_prefetcher=True)
    host = HostTransform(timm_transform, tuple(config["mean"]), tuple(config["std"]), resize_edge,
                         fused_resize_crop(timm_transform))
    return host, input_size
