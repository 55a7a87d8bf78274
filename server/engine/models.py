"""One served model: its config checked before loading (on the meta device), then built with its weights,
class labels and preprocessing."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.data import ImageNetInfo, infer_imagenet_subset

from mame_core.models import load_weights as load_weights_of
from mame_core.patch import check_supported
from server.config import ConfigError, ModelConfig, ServingConfig
from server.decode.transforms import HostTransform, preprocessing
from server.engine.devices import resolve_devices

log = logging.getLogger("mame.server")


@dataclass(frozen=True)
class LoadedModel:
    """A timm model on the CPU with everything needed to serve it."""

    model: torch.nn.Module
    weights: str  # hub | file:<path> | random-init (docs/api.md)
    labels: list[str]
    transform: HostTransform
    input_size: tuple[int, int, int]


def check_models(config: ServingConfig) -> None:
    """Each model's arch and kwargs build a ViT (on the meta device: no memory, no weights) deep enough
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
            raise ConfigError(
                f"models.{name}.model_kwargs: in_chans {in_chans}; the server sends RGB crops (3)"
            )
        if len(model.blocks) == 0:
            raise ConfigError(f"models.{name}.model_kwargs: depth 0; a model needs at least one block")
        if getattr(model, "num_classes", 0) < 1:
            raise ConfigError(
                f"models.{name}.model_kwargs: num_classes {model.num_classes}; the server answers "
                "classes, so the model needs a classifier head"
            )
        for variant, settings in cfg.variants.items():
            try:
                settings.check_depth(len(model.blocks))
            except ValueError as exc:
                raise ConfigError(f"models.{name}.variants.{variant}: {exc}") from None


def load_weights(name: str, cfg: ModelConfig) -> tuple[torch.nn.Module, str]:
    """The model with its weights and where they came from (mame_core.models.load_weights), never waiting on
    an unreachable hub; a checkpoint that does not fit is the config's fault."""
    try:
        loaded = load_weights_of(cfg.arch, cfg.weights, cfg.model_kwargs)
    except ValueError as exc:  # only a weights file raises it: not a checkpoint, another model's shapes
        path = Path(cfg.weights).expanduser()
        raise ConfigError(f"models.{name}.weights: cannot load {path} into {cfg.arch}: {exc}") from None
    if loaded.source == "hub" and loaded.note:
        log.info("model %s: %s", name, loaded.note)
    elif loaded.source == "random-init" and cfg.weights == "auto":
        log.warning(
            "\n%s\nWARNING: model %r (%s) has RANDOM weights: %s.\n"
            "Its predictions are meaningless. Answers say \"weights\": \"random-init\".\n%s",
            "!" * 78, name, cfg.arch, loaded.note, "!" * 78,
        )
    return loaded.model, loaded.source


def class_labels(model: torch.nn.Module) -> list[str]:
    """ImageNet class names shipped with timm (offline); generic names for other heads."""
    num_classes = int(getattr(model, "num_classes", 0))
    subset = infer_imagenet_subset(model)
    if subset:
        info = ImageNetInfo(subset)
        if info.num_classes() == num_classes:
            return [info.index_to_description(i) for i in range(num_classes)]
    return [f"class_{i}" for i in range(num_classes)]


def load_model(name: str, cfg: ModelConfig) -> LoadedModel:
    model, weights = load_weights(name, cfg)
    for variant, settings in cfg.variants.items():  # the model's depth is known only now
        try:
            settings.check_depth(len(model.blocks))
        except ValueError as exc:
            raise ValueError(f"model {name!r} ({cfg.arch}), variant {variant!r}: {exc}") from None
    transform, input_size = preprocessing(model)
    return LoadedModel(model, weights, class_labels(model), transform, input_size)
