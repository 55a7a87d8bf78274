"""Building one served model: timm architecture, weights (hub, local file or random), labels, preprocessing."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from timm.data import ImageNetInfo, create_transform, infer_imagenet_subset, resolve_data_config
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from mame_core.hub import load_checkpoint_file, pretrained_or_cached
from mame_core.patch import check_supported
from server.config import ConfigError, ModelConfig, ServingConfig
from server.imaging import ResizeCrop
from server.worker import resolve_devices

log = logging.getLogger("mame.server")


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
    """RGB PIL image -> uint8 [3, H, W] (a channels-last view: the device makes it contiguous in the batch)."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)  # a copy: torch wants a writable array


def fused_resize_crop(transform: Callable) -> ResizeCrop | None:
    """The ResizeCrop equal to timm's eval transform, when it is exactly Resize(int), CenterCrop, to-tensor."""
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


@dataclass(frozen=True)
class LoadedModel:
    """A timm model on the CPU with everything needed to serve it."""

    model: torch.nn.Module
    weights: str  # hub | file:<path> | random-init (docs/CONTRACT.md)
    labels: list[str]
    transform: HostTransform
    input_size: tuple[int, int, int]


RANDOM_INIT_SEED = 0


def _create(cfg: ModelConfig, pretrained: bool, **extra) -> torch.nn.Module:
    # Seeded: random-init weights are the same in every process that builds them (a device process per GPU,
    # a restarted server), so answers never depend on which copy served them. The caller's RNG is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return timm.create_model(cfg.arch, pretrained=pretrained, **cfg.model_kwargs, **extra).eval()


def check_models(config: ServingConfig) -> None:
    """Each model's arch and kwargs build a ViT (on the meta device: no memory, 0.08 s for ViT-B) deep enough
    for its variants: a ConfigError naming the key at start, not a traceback once loading has begun."""
    for name, cfg in config.models.items():
        try:
            with torch.device("meta"):
                model = timm.create_model(cfg.arch, pretrained=False, **cfg.model_kwargs)
        except Exception as exc:  # noqa: BLE001 - timm says "bad kwargs" with asserts and ZeroDivisionErrors too
            said = str(exc) or type(exc).__name__
            raise ConfigError(f"models.{name}: timm cannot build {cfg.arch!r}: {said}") from None
        try:
            check_supported(model)
        except TypeError as exc:
            raise ConfigError(f"models.{name}.arch: {cfg.arch!r} cannot merge tokens: {exc}") from None
        try:  # a device string torch does not know, or one this machine does not have
            resolve_devices(cfg.device)
        except ValueError as exc:
            raise ConfigError(f"models.{name}.device: {exc}") from None
        # What builds but cannot serve: crops are RGB, answers are classes, and a model needs blocks.
        in_chans = model.patch_embed.proj.in_channels
        if in_chans != 3:
            raise ConfigError(f"models.{name}.model_kwargs: in_chans {in_chans}; the server sends RGB crops (3)")
        if len(model.blocks) == 0:
            raise ConfigError(f"models.{name}.model_kwargs: depth 0; a model needs at least one block")
        if getattr(model, "num_classes", 0) < 1:
            raise ConfigError(f"models.{name}.model_kwargs: num_classes {model.num_classes}; the server answers "
                              "classes, so the model needs a classifier head")
        for variant, settings in cfg.variants.items():
            try:
                settings.check_depth(len(model.blocks))
            except ValueError as exc:
                raise ConfigError(f"models.{name}.variants.{variant}: {exc}") from None


def load_weights(name: str, cfg: ModelConfig) -> tuple[torch.nn.Module, str]:
    """The model with its weights and where they came from, never waiting on an unreachable hub."""
    if cfg.weights == "random":
        return _create(cfg, pretrained=False), "random-init"
    if cfg.weights != "auto":
        path = Path(cfg.weights).expanduser()
        model = _create(cfg, pretrained=False)
        try:
            load_checkpoint_file(model, str(path))
        except ValueError as exc:  # not a checkpoint, another model's shapes: the config's fault
            raise ConfigError(f"models.{name}.weights: cannot load {path} into {cfg.arch}: {exc}") from None
        return model, f"file:{path}"

    model, reason, cached = pretrained_or_cached(lambda pretrained, **extra: _create(cfg, pretrained, **extra))
    if model is not None:
        if cached is not None:
            log.info("model %s: %s; using the hub weights from the local cache %s", name, reason, cached)
        return model, "hub"
    log.warning(
        "\n%s\nWARNING: model %r (%s) has RANDOM weights: %s and no cached copy exists.\n"
        "Its predictions are meaningless. Answers say \"weights\": \"random-init\".\n%s",
        "!" * 78, name, cfg.arch, reason, "!" * 78,
    )
    return _create(cfg, pretrained=False), "random-init"


def class_labels(model: torch.nn.Module) -> list[str]:
    """ImageNet class names shipped with timm (offline); generic names for other heads."""
    num_classes = int(getattr(model, "num_classes", 0))
    subset = infer_imagenet_subset(model)
    if subset:
        info = ImageNetInfo(subset)
        if info.num_classes() == num_classes:
            return [info.index_to_description(i) for i in range(num_classes)]
    return [f"class_{i}" for i in range(num_classes)]


def preprocessing(model: torch.nn.Module) -> tuple[HostTransform, tuple[int, int, int]]:
    """timm's eval transform from the model's own data config, at the size the model was built for,
    split into its host half (uint8 crop) and its normalisation (done on the device)."""
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    overrides = {"input_size": (3, *img_size)} if img_size else {}
    data_config = resolve_data_config(overrides, model=model)
    input_size = tuple(data_config["input_size"])
    resize_edge = math.floor(max(input_size[1:]) / data_config["crop_pct"])  # as timm's eval transform
    timm_transform = create_transform(**data_config, is_training=False, use_prefetcher=True)
    host = HostTransform(timm_transform, tuple(data_config["mean"]), tuple(data_config["std"]), resize_edge,
                         fused_resize_crop(timm_transform))
    return host, input_size


def load_model(name: str, cfg: ModelConfig) -> LoadedModel:
    model, weights = load_weights(name, cfg)
    for variant, settings in cfg.variants.items():  # the model's depth is known only now
        try:
            settings.check_depth(len(model.blocks))
        except ValueError as exc:
            raise ValueError(f"model {name!r} ({cfg.arch}), variant {variant!r}: {exc}") from None
    transform, input_size = preprocessing(model)
    return LoadedModel(model, weights, class_labels(model), transform, input_size)
