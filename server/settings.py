"""Process settings: command-line flags over `MAME_*` environment variables over defaults."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServerSettings(BaseSettings):
    """Serve timm ViTs accelerated by MaMe token merging over HTTP. Every flag can also be set as
    MAME_<FLAG> in the environment (e.g. MAME_PORT=9000); a flag wins over its variable."""

    model_config = SettingsConfigDict(
        env_prefix="MAME_", extra="forbid", cli_prog_name="mame-serve", cli_kebab_case=True,
        cli_implicit_flags="toggle", cli_hide_none_type=True, cli_avoid_json=True,
        cli_exit_on_error=True, cli_use_class_docs_for_groups=False,
        cli_parse_none_str="none")

    config: Path | None = Field(None, description="serving config YAML; none: the one shipped in the package")
    host: str = Field("0.0.0.0", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads on CPU workers")
    preprocess_threads: int = Field(
        4, ge=1, description="threads that decode and preprocess images: of the server process in the single "
        "layout, of each front-end in the frontends layout")
    no_warmup: bool = Field(False, description="skip running each variant once before /readyz says ready")
    layout: Literal["auto", "single", "frontends"] = Field(
        "auto",
        description="single: one process does it all (the default without a CUDA device); frontends: HTTP "
        "front-end processes read and decode requests, this process routes and batches them, and each device "
        "runs its batches in a process of its own (the default with a CUDA device). See docs/architecture.md",
    )
    http_processes: Literal["auto"] | Annotated[int, Field(ge=1)] = Field(
        "auto",
        description="front-end processes in the frontends layout (auto: a quarter of the CPU cores, 1 to 8)",
    )
    crop_arena_slots: int | None = Field(
        None, ge=0, description="crops each front-end can hold in shared memory (/dev/shm) for this process "
        "(default: 4 x max_images_per_request, at least 256; 0: crops travel in the messages)")
    split_store: Path | None = Field(
        None, description="the fleet's split document (a file, e.g. a mounted ConfigMap), polled: every "
        "replica takes its experiments' splits from it, and admin split changes are written there "
        "(docs/ab_testing.md)")
    split_store_write: str | None = Field(
        None, description="where admin split changes are written when split_store is a read-only mount: "
        "configmap:NAMESPACE/NAME[:KEY] or file:PATH (default: the split_store file)")
    split_poll_s: float = Field(1.0, gt=0, le=60, description="seconds between looks at split_store")
    judge_url: str | None = Field(
        None, description="mame-judge's HTTP address (e.g. http://mame-judge:9180): experiment reports add "
        "its fleet-wide view")


def parse_settings(argv: Sequence[str] | None = None) -> ServerSettings:
    """The settings from `argv` (None: sys.argv), the MAME_* variables and the defaults. A flag that does not
    exist is argparse's usage error (exit 2); a bad value is a pydantic ValidationError."""
    return ServerSettings(_cli_parse_args=list(sys.argv[1:] if argv is None else argv))


# MAME_* variables read elsewhere (server/wire/admin.py), not settings of this process's start.
OTHER_VARIABLES = {"MAME_ADMIN_TOKEN"}
# Kubernetes gives every pod variables for each Service of its namespace: for a Service mame-serve,
# MAME_SERVE_SERVICE_HOST always, with MAME_SERVE_SERVICE_PORT[_<name>] and
# MAME_SERVE_PORT[_<n>_<proto>[_...]].
_SERVICE_HOST = "_SERVICE_HOST"


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """MAME_* variables that set nothing (MAME_PROT=9000 for MAME_PORT): said at start, not silently ignored.
    Warned about rather than refused, since a platform may set variables of its own (Kubernetes service links,
    recognised by their <SERVICE>_SERVICE_HOST). Names match settings whatever their case, as
    pydantic-settings
    reads them."""
    known = {f"MAME_{name.upper()}" for name in ServerSettings.model_fields} | OTHER_VARIABLES
    names = {name.upper(): name for name in environ if name.upper().startswith("MAME_")}
    services = [name[:-len(_SERVICE_HOST)] for name in names if name.endswith(_SERVICE_HOST)]
    return sorted(original for upper, original in names.items() if upper not in known and not any(
        upper.startswith((f"{service}_SERVICE_", f"{service}_PORT")) for service in services))
