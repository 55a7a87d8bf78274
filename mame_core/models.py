"""Building a timm ViT with its weights (random, the hub's, or a checkpoint file), and its data config: the
one loader of the command-line tools and the server."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.data import resolve_data_config

from mame_core.hub import load_checkpoint_file, pretrained_or_cached
from mame_core.patch import check_supported

# Random weights are drawn with this seed: every process that builds a model (a device process per GPU, a
# restarted server, two benchmark runs) holds the same weights, and how much merges depends on the draw.
RANDOM_INIT_SEED = 0


def create_model(
    arch: str, model_kwargs: dict | None = None, pretrained: bool = False, **extra
) -> torch.nn.Module:
    """timm's model in eval mode; its random initialisation is seeded, the caller's RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return timm.create_model(arch, pretrained=pretrained, **(model_kwargs or {}), **extra).eval()


@dataclass(frozen=True)
class Weights:
    """A model with its weights, where they came from (hub | file:<path> | random-init), and why, when the
    hub's weights were asked for ("auto") and came from the local cache or could not be had."""

    model: torch.nn.Module
    source: str
    note: str | None = None


def load_weights(arch: str, weights: str, model_kwargs: dict | None = None) -> Weights:
    """`weights`: "random", "hub" (a ValueError when the hub answers not and the cache has none), "auto" (the
    hub's, else random) or a checkpoint file (load_checkpoint_file's ValueError when it does not fit). The hub
    is never waited on when it is unreachable (mame_core.hub)."""
    if weights == "random":
        return Weights(create_model(arch, model_kwargs), "random-init")
    if weights in ("hub", "auto"):
        model, reason, cached = pretrained_or_cached(
            lambda pretrained, **extra: create_model(arch, model_kwargs, pretrained, **extra))
        if model is not None:
            return Weights(
                model,
                "hub",
                None if cached is None else f"{reason}; using the hub weights from the local cache {cached}",
            )
        if weights == "hub":
            raise ValueError(
                f"cannot load the pretrained weights of {arch}: {reason} and they are not in the "
                "local hub cache"
            )
        return Weights(create_model(arch, model_kwargs), "random-init", f"{reason} and no cached copy exists")
    path = Path(weights).expanduser()
    model = create_model(arch, model_kwargs)
    load_checkpoint_file(model, str(path))
    return Weights(model, f"file:{path}")


def load_model(arch: str, weights: str = "random", model_kwargs: dict | None = None) -> torch.nn.Module:
    """A timm ViT for the command-line tools. `weights`: "random" (warned), "hub" (needs network access or a
    filled cache) or the path of a checkpoint file. Every refusal is a one-line ValueError naming the flag."""
    kwargs = dict(model_kwargs or {})
    if weights not in ("random", "hub") and not Path(weights).is_file():
        raise ValueError(f"--weights: expected 'random', 'hub' or a checkpoint file, got {weights!r}")
    if weights == "random":
        warnings.warn(f"{arch}: random weights (seed {RANDOM_INIT_SEED}); accuracy figures are meaningless, "
                      "speed figures are not", stacklevel=2)
    try:
        model = load_weights(arch, weights, kwargs).model
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(f"unknown timm architecture {arch!r}") from err
        raise
    except TypeError as err:  # what timm's constructors say of a keyword they do not take
        raise ValueError(f"cannot build {arch} with --model-kwargs {json.dumps(kwargs)}: {err}") from err
    except ValueError as err:
        if weights == "random":
            raise
        if weights == "hub":
            raise ValueError(f"{err}; use --weights random or --weights FILE (a checkpoint file)") from err
        raise ValueError(f"--weights {weights}: cannot load it into {arch}: {err}") from err
    try:
        check_supported(model)  # before anything reads model.blocks: a ResNet is bad input, not a traceback
    except TypeError as err:
        raise ValueError(f"{arch}: {err}") from err
    return model


def data_config(model: torch.nn.Module) -> dict:
    """timm's data config for `model`, with the input size the model was actually built for: a model
    created with an `img_size` override keeps its pretrained config's size otherwise."""
    config = resolve_data_config({}, model=model)
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        config["input_size"] = (config["input_size"][0], *tuple(img_size))
    return config


def parse_model_kwargs(text: str | None) -> dict:
    """`--model-kwargs '{"img_size": 64}'` -> dict, for timm.create_model overrides."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--model-kwargs must be a JSON object: {err}") from err
    if not isinstance(value, dict):
        raise ValueError(f"--model-kwargs must be a JSON object, got {type(value).__name__}")  # noqa: TRY004 (user input)
    return value
