"""`mame-serve` / `python -m server`: load the serving config and run the HTTP server."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError

from server.config import ConfigError, ServingConfig, load_config
from server.engine.devices import resolve_devices
from server.engine.metrics import Metrics
from server.engine.models import check_models
from server.engine.service import InferenceService
from server.experiments.fleet import FleetOptions
from server.frontend.sockets import port_socket
from server.frontend.supervisor import FrontEndProcesses
from server.http.app import create_app
from server.settings import ServerSettings, parse_settings, unknown_variables
from server.wire.head_timeout import head_timeout_protocol

# Answers to accepted requests may take this long beyond the request timeout during a graceful stop.
SHUTDOWN_GRACE_S = 10.0

log = logging.getLogger("mame.server")


class EngineServer(uvicorn.Server):
    """The server process behind front-end processes: on SIGTERM or Ctrl-C the front-ends stop first (they
    stop accepting and wait for their answers, which come from here); then this process drains and stops."""

    def __init__(self, config: uvicorn.Config, frontends: FrontEndProcesses, workdir: str):
        super().__init__(config)
        self.frontends = frontends
        self.workdir = workdir
        self._draining = False

    async def shutdown(self, sockets=None) -> None:
        # After a fatal error the front-ends stop first, while this loop still answers what they hold (after
        # a signal they have stopped already); off the loop, which must go on answering meanwhile.
        await asyncio.to_thread(self.frontends.stop)
        await super().shutdown(sockets)
        # Here, not after run(): uvicorn re-raises a caught SIGTERM when serve() ends, which ends the process.
        shutil.rmtree(self.workdir, ignore_errors=True)

    def handle_exit(self, sig, frame) -> None:
        if self._draining:  # a second signal: the usual handling (a second Ctrl-C forces the exit)
            super().handle_exit(sig, frame)
            return
        self._draining = True

        def drain() -> None:
            self.frontends.stop()
            super(EngineServer, self).handle_exit(sig, frame)

        threading.Thread(target=drain, name="drain-frontends", daemon=True).start()


def resolve_layout(setting: str, config: ServingConfig) -> str:
    """auto: front-ends and device processes when a model runs on a CUDA device (one process keeps up with
    CPU inference, and the GIL it shares with decoding and HTTP limits a GPU's), else one process."""
    if setting != "auto":
        return setting
    try:
        devices = [d for cfg in config.models.values() for d in resolve_devices(cfg.device)]
    except ValueError:  # a device that is not there: check_models (or loading) says so, and the server stops
        return "single"
    return "frontends" if any(d.type == "cuda" for d in devices) else "single"


def resolve_http_processes(setting: str | int) -> int:
    """auto: a quarter of the cores this process may use, 1 to 8 (each decodes in --preprocess-threads
    threads)."""
    return min(8, max(1, available_cpus() // 4)) if setting == "auto" else int(setting)


def large_image_threads(preprocess_threads: int) -> int:
    """Threads that decode large images: at most half the cores, so that large images never take the cores
    the event loop and the forward passes need (on two cores: one)."""
    return max(1, min(preprocess_threads, available_cpus() // 2))


def available_cpus() -> int:
    """CPUs this process may use: its affinity, and a container's CPU quota (cgroup v2) when lower."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return cpus


def read_settings(argv: Sequence[str] | None) -> ServerSettings | None:
    """The settings, or None after saying in one line what is wrong with them."""
    try:
        settings = parse_settings(argv)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        print(f"mame-serve: bad setting (flag or MAME_* variable): {problems}", file=sys.stderr)
        return None
    unknown = unknown_variables(os.environ)
    if unknown:
        print(
            f"mame-serve: warning: ignoring {', '.join(unknown)}: no such setting (the settings are "
            f"{', '.join(f'MAME_{name.upper()}' for name in ServerSettings.model_fields)})",
            file=sys.stderr,
        )
    return settings


def read_config(settings: ServerSettings) -> ServingConfig | None:
    try:
        config = load_config(settings.config)
        check_models(config)
    except ConfigError as exc:
        print(f"mame-serve: {exc}", file=sys.stderr)
        return None
    return config


class Fatal:
    """The first fatal error met while serving (a device process died, a weights file would not load), which
    stops the server."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.server: uvicorn.Server | None = None

    def __call__(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        if self.server is not None:
            self.server.should_exit = True

    def exit_code(self) -> int:
        if isinstance(self.error, ConfigError):  # found only when loading (a weights file): as before loading
            print(f"mame-serve: {self.error}", file=sys.stderr)
            return 2
        if self.error is not None:
            print(f"mame-serve: stopped on a fatal error: {self.error}", file=sys.stderr)
            return 1
        return 0


def uvicorn_options(settings: ServerSettings, config: ServingConfig) -> dict:
    graceful_s = config.limits.request_timeout_s + SHUTDOWN_GRACE_S
    return {"log_level": settings.log_level, "timeout_graceful_shutdown": int(graceful_s),
            "access_log": settings.log_level == "debug"}


def fleet_options(settings: ServerSettings) -> FleetOptions:
    return FleetOptions(settings.split_store, settings.split_store_write, settings.split_poll_s,
                        settings.judge_url)


def build_service(
    settings: ServerSettings, config: ServingConfig, device_processes: bool
) -> InferenceService:
    """The models' service: loading starts with the app's lifespan."""
    return InferenceService(config, Metrics(), warmup=not settings.no_warmup,
                            torch_threads=settings.torch_threads or torch.get_num_threads(),
                            device_processes=device_processes)


def serve_single(
    settings: ServerSettings, config: ServingConfig, public: socket.socket, fatal: Fatal
) -> FastAPI:
    """One process: HTTP, decoding, batching and the device workers (threads)."""
    app = create_app(config, build_service(settings, config, device_processes=False),
                     preprocess_threads=settings.preprocess_threads,
                     large_image_threads=large_image_threads(settings.preprocess_threads), on_fatal=fatal,
                     fleet=fleet_options(settings))
    fatal.server = uvicorn.Server(uvicorn.Config(
        app, host=settings.host, port=settings.port, **uvicorn_options(settings, config),
        timeout_keep_alive=config.connections.idle_timeout_s,
        http=head_timeout_protocol(config.limits.request_timeout_s, config.connections.max_connections,
                                   config.connections.idle_timeout_s)))
    # uvicorn says not, given a socket
    log.info("listening on http://%s:%d", settings.host, public.getsockname()[1])
    fatal.server.run(sockets=[public])
    return app


def serve_frontends(
    settings: ServerSettings, config: ServingConfig, public: socket.socket, fatal: Fatal
) -> FastAPI:
    """Front-end processes on the public port; this process (the engine) on private Unix sockets; a process
    per device."""
    # The engine's sockets and the front-ends' crop arenas, in shared memory where there is some.
    workdir = tempfile.mkdtemp(prefix="mame-engine-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    channel_socket, engine_socket = (
        os.path.join(workdir, "channel.sock"),
        os.path.join(workdir, "engine.sock"),
    )
    # Here only the requests the front-ends cannot decode for are decoded (in threads).
    app = create_app(
        config,
        build_service(settings, config, device_processes=True),
        preprocess_threads=settings.preprocess_threads,
        large_image_threads=large_image_threads(settings.preprocess_threads),
        on_fatal=fatal,
        frontend_channel=channel_socket,
        fleet=fleet_options(settings),
    )
    options = uvicorn_options(settings, config)
    processes = FrontEndProcesses(resolve_http_processes(settings.http_processes), public, engine_socket,
                                  channel_socket, settings.preprocess_threads, settings.log_level,
                                  config.limits.request_timeout_s + SHUTDOWN_GRACE_S, crops_dir=workdir,
                                  arena_slots=settings.crop_arena_slots, on_fatal=fatal,
                                  request_timeout_s=config.limits.request_timeout_s,
                                  max_connections=config.connections.max_connections,
                                  idle_timeout_s=config.connections.idle_timeout_s,
                                  health_timeout_s=config.health.engine_timeout_s,
                                  large_image_nice=config.limits.large_image_nice)
    fatal.server = EngineServer(uvicorn.Config(app, uds=engine_socket, **options), processes, workdir)
    processes.start()
    try:
        fatal.server.run()
    finally:  # when it did not get as far as its shutdown
        processes.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return app


def main(argv: Sequence[str] | None = None) -> int:
    settings = read_settings(argv)
    if settings is None:
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = read_config(settings)
    if config is None:
        return 2
    # Ctrl-C as SIGTERM: uvicorn drains, then re-raises the signal it caught. Under Python's handler that was
    # a KeyboardInterrupt traceback, and an exit that finalised the interpreter while the model loader thread
    # was inside torch (C++ terminate, SIGABRT). With the default action the process ends by the signal.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    layout = resolve_layout(settings.layout, config)
    # Bound before anything loads: a port in use is one line and exit 2 in every layout. With front-ends it is
    # held here (not listening) and each front-end listens on it too (SO_REUSEPORT).
    try:
        public = port_socket(settings.host, settings.port, listen=False, shared=layout == "frontends")
    except OSError as exc:
        print(f"mame-serve: cannot listen on {settings.host}:{settings.port}: {exc}", file=sys.stderr)
        return 2
    fatal = Fatal()
    app = (serve_frontends if layout == "frontends" else serve_single)(settings, config, public, fatal)
    code = fatal.exit_code()
    if app.state.service.loading:  # finalising the interpreter under the loader thread in torch aborts it
        logging.shutdown()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
