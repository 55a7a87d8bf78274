"""`mame-serve` / `python -m server`: load the serving config and run the HTTP server."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import uvicorn

from server.app import create_app
from server.config import ConfigError, load_config
from server.settings import parse_settings

# Answers to accepted requests may take this long beyond the request timeout during a graceful stop.
SHUTDOWN_GRACE_S = 10.0


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(settings.config)
    except ConfigError as exc:
        print(f"mame-serve: {exc}", file=sys.stderr)
        return 2

    failure: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_fatal(exc: BaseException) -> None:
        failure.append(exc)
        if server is not None:
            server.should_exit = True

    app = create_app(config, preprocess_threads=settings.preprocess_threads, warmup=settings.warmup,
                     torch_threads=settings.torch_threads, device_process=settings.device_process,
                     decode_processes=settings.decode_processes,
                     on_fatal=on_fatal)
    server = uvicorn.Server(uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level,
        timeout_graceful_shutdown=int(config.limits.request_timeout_s + SHUTDOWN_GRACE_S),
        access_log=settings.log_level == "debug",
    ))
    server.run()
    if failure:
        print(f"mame-serve: stopped on a fatal error: {failure[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
