"""Where a model's weights come from: timm's pretrained weights from the Hugging Face hub or its local cache,
or a checkpoint file.

Shared by the command-line tools and the server: both decide in seconds instead of waiting for the hub
client's retries (about 45 s) on a machine without network access.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from urllib.parse import urlparse

import torch

HUB_PROBE_TIMEOUT_S = 2.0
_TRUE = {"1", "on", "yes", "true"}


def hub_disabled_by_env(env: dict[str, str] | None = None) -> str | None:
    """The offline variable that switches the Hugging Face hub off, if one is set."""
    env = os.environ if env is None else env
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if env.get(name, "").strip().lower() in _TRUE:
            return name
    return None


def hub_reachable(timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """One TCP connect to the hub endpoint: decides in `timeout_s` instead of the hub client's ~45 s
    retries."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def hub_unavailable_reason() -> str | None:
    """Why the hub cannot be used now (an offline variable, no connection), or None when it can."""
    offline_var = hub_disabled_by_env()
    if offline_var:
        return f"{offline_var} is set"
    if not hub_reachable():
        return f"the hub ({os.environ.get('HF_ENDPOINT', 'huggingface.co')}) is unreachable"
    return None


def cached_hub_file(model: torch.nn.Module) -> str | None:
    """The model's weights file in the local hub cache, if an earlier run downloaded it."""
    from huggingface_hub import try_to_load_from_cache

    repo = model.pretrained_cfg.get("hf_hub_id")
    if not repo:
        return None
    for filename in ("model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin"):
        path = try_to_load_from_cache(repo, filename)
        if isinstance(path, str):
            return path
    return None


def pretrained_or_cached(
    build: Callable[..., torch.nn.Module],
) -> tuple[torch.nn.Module | None, str | None, str | None]:
    """timm's pretrained weights through `build(pretrained, **extra)`: downloaded when the hub can be used,
    else the local cache's copy. Returns (the model or None, why the hub was not used or None, the cached file
    used or None)."""
    reason = hub_unavailable_reason()
    if reason is None:
        try:
            return build(True), None, None
        except Exception as exc:  # noqa: BLE001 - any download failure (HTTP, not found, connection) falls back
            reason = f"downloading from the hub failed ({type(exc).__name__}: {exc})"
    cached = cached_hub_file(build(False))  # an unpretrained build knows its hub repo
    if cached is None:
        return None, reason, None
    return build(True, pretrained_cfg_overlay={"file": cached}), reason, cached


def load_checkpoint_file(model: torch.nn.Module, path: str) -> None:
    """A local checkpoint into `model`; a ValueError saying in one line why it does not fit (not a checkpoint,
    another model's shapes), instead of torch's multi-line report."""
    from timm.models import load_checkpoint

    try:
        load_checkpoint(model, path, strict=True)
    except Exception as exc:  # unpickling, OSError, size mismatches: all "does not fit"
        said = " ".join(str(exc).split()) or type(exc).__name__
        raise ValueError(said if len(said) <= 300 else said[:300] + " ...") from exc
