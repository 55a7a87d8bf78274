"""Which devices and dtype a model runs on, and one model's weights placed on one device."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mame_core import MergingViT, patch_vit


@dataclass
class DeviceModel:
    """One model's weights on one device, serving all its variants."""

    name: str
    vit: MergingViT
    device: torch.device
    dtype: torch.dtype
    input_size: tuple[int, int, int]
    mean: torch.Tensor  # [1, 3, 1, 1] float32 on the device: the normalisation of the model's data config
    std: torch.Tensor


def resolve_devices(spec: str) -> list[torch.device]:
    """auto: every CUDA device, else the CPU. Otherwise a comma-separated list (cpu, cuda, cuda:1)."""
    if spec == "auto":
        count = torch.cuda.device_count()
        return [torch.device("cuda", i) for i in range(count)] if count else [torch.device("cpu")]
    try:
        devices = [torch.device(part.strip()) for part in spec.split(",") if part.strip()]
    except RuntimeError as exc:  # torch's word for a device string it does not know
        raise ValueError(f"{spec!r} is not a device list (auto, cpu, cuda, cuda:1, ...): {exc}") from None
    if not devices:
        raise ValueError(f"{spec!r} names no device (auto, cpu, cuda, cuda:1, ...)")
    for device in devices:
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device} asked for, but CUDA is not available")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(
                f"device {device} asked for, but there are {torch.cuda.device_count()} CUDA devices"
            )
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device {device} is not supported (cpu or cuda)")
    return [torch.device("cuda", 0) if d.type == "cuda" and d.index is None else d for d in devices]


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    if spec == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, spec)


def place_model(name: str, model: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                input_size: tuple[int, int, int], copy_weights: bool, *,
                mean: Sequence[float], std: Sequence[float]) -> DeviceModel:
    source = copy.deepcopy(model) if copy_weights else model

    def per_channel(values: Sequence[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    return DeviceModel(
        name,
        patch_vit(source.to(device=device, dtype=dtype).eval()),
        device,
        dtype,
        input_size,
        per_channel(mean),
        per_channel(std),
    )
