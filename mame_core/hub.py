"""Whether timm's pretrained weights can come from the Hugging Face hub now, and where a cached copy is.

Shared by the command-line tools and the server: both decide in seconds instead of waiting for the hub
client's retries (about 45 s) on a machine without network access.
"""

from __future__ import annotations

import os
import socket
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
    """One TCP connect to the hub endpoint: decides in `timeout_s` instead of the hub client's ~45 s retries."""
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
