"""Process settings: command-line flags over `MAME_*` environment variables over defaults."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MAME_", extra="forbid")

    config: Path | None = Field(None, description="serving config YAML; default: the one shipped in the package")
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads on CPU workers")
    preprocess_threads: int = Field(4, ge=1, description="threads that decode and preprocess images")
    no_warmup: bool = Field(False, description="skip running each variant once before /readyz says ready")
    decode_processes: Literal["auto", "on", "off"] = Field(
        "auto", description="decode images in processes (one per preprocessing thread): auto = on with CUDA")
    device_process: Literal["auto", "on", "off"] = Field(
        "auto", description="run each device's batches in a process of its own: auto = on for CUDA devices")
    http_processes: Literal["auto"] | Annotated[int, Field(ge=0)] = Field(
        "auto", description="HTTP front-end processes that read and decode requests for this process (0: this "
        "process does it all; auto: 0 without a CUDA device, else a quarter of the CPU cores, 1 to 8)")
    crop_arena_slots: int | None = Field(
        None, ge=0, description="crops each front-end can hold in shared memory for this process (default: "
        "4 x max_images_per_request, at least 256; 0: crops travel in request bodies)")


def parse_settings(argv: Sequence[str] | None = None) -> ServerSettings:
    parser = argparse.ArgumentParser(
        prog="mame-serve",
        description="Serve timm ViTs accelerated by MaMe token merging over HTTP. "
        "Every flag can also be set as MAME_<FLAG> in the environment (e.g. MAME_PORT=9000).",
    )
    parser.add_argument("--config", type=Path, help="serving config YAML (default: the shipped default.yaml)")
    parser.add_argument("--host", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--port", type=int, help="port to listen on (default 8000)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--torch-threads", type=int, help="torch intra-op threads on CPU workers")
    parser.add_argument("--preprocess-threads", type=int, help="threads that decode and preprocess images")
    parser.add_argument("--no-warmup", action="store_const", const=True,
                        help="skip the warm-up forward passes")
    parser.add_argument("--decode-processes", choices=["auto", "on", "off"],
                        help="decode and preprocess images in child processes, one per preprocessing thread, so "
                        "that PIL's Python work does not share the GIL with HTTP (auto, the default: on when a "
                        "model runs on a CUDA device)")
    parser.add_argument("--device-process", choices=["auto", "on", "off"],
                        help="run each device's batches in a child process of its own, so the forward does not "
                        "share the GIL with HTTP and decoding (auto, the default: on for CUDA devices, off on CPU)")
    parser.add_argument("--http-processes",
                        help="HTTP front-end processes: each accepts connections on the port and decodes images, "
                        "and this process (one copy of the weights per device, the batching, the A/B registry and "
                        "the metrics) takes their crops over a private Unix socket; 0: this process does it all; "
                        "auto (the default): 0 without a CUDA device, else a quarter of the CPU cores (1 to 8). "
                        "See docs/server.md, Processes")
    parser.add_argument("--crop-arena-slots", type=int,
                        help="with --http-processes: crops each front-end holds in shared memory (/dev/shm) for "
                        "this process (default 4 x max_images_per_request, at least 256; 0: in request bodies)")
    given = {key: value for key, value in vars(parser.parse_args(argv)).items() if value is not None}
    return ServerSettings(**given)


# MAME_* variables read elsewhere (server/experiments.py), not settings of this process's start.
OTHER_VARIABLES = {"MAME_ADMIN_TOKEN"}
# Kubernetes gives every pod variables for each Service of its namespace: for a Service mame-serve,
# MAME_SERVE_SERVICE_HOST always, with MAME_SERVE_SERVICE_PORT[_<name>] and MAME_SERVE_PORT[_<n>_<proto>[_...]].
_SERVICE_HOST = "_SERVICE_HOST"


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """MAME_* variables that set nothing (MAME_PROT=9000 for MAME_PORT): said at start, not silently ignored.
    Warned about rather than refused, since a platform may set variables of its own (Kubernetes service links,
    recognised by their <SERVICE>_SERVICE_HOST). Names match settings whatever their case, as pydantic-settings
    reads them."""
    known = {f"MAME_{name.upper()}" for name in ServerSettings.model_fields} | OTHER_VARIABLES
    names = {name.upper(): name for name in environ if name.upper().startswith("MAME_")}
    services = [name[:-len(_SERVICE_HOST)] for name in names if name.endswith(_SERVICE_HOST)]
    return sorted(original for upper, original in names.items() if upper not in known and not any(
        upper.startswith((f"{service}_SERVICE_", f"{service}_PORT")) for service in services))
