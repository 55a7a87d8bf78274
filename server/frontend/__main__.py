"""One front-end process: `python -m server.frontend ...`, started by the engine's supervisor."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import threading
import time
from collections.abc import Sequence

import uvicorn

from server.frontend.app import FrontEnd
from server.frontend.sockets import port_socket
from server.wire.head_timeout import head_timeout_protocol

log = logging.getLogger("mame.frontend")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one HTTP front-end process of mame-serve (started by it)")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--engine-socket", required=True, help="the engine's Unix socket (HTTP)")
    parser.add_argument(
        "--channel-socket", required=True, help="the engine's Unix socket for decoded requests"
    )
    parser.add_argument("--threads", type=int, default=4, help="decoding threads")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--graceful-s", type=float, default=40.0)
    parser.add_argument(
        "--request-timeout-s",
        type=float,
        default=30.0,
        help="the serving config's limits.request_timeout_s: request heads and bodies arrive within it",
    )
    parser.add_argument("--max-connections", type=int,
                        help="the serving config's connections.max_connections (default: none)")
    parser.add_argument("--idle-timeout-s", type=float, default=5.0,
                        help="the serving config's connections.idle_timeout_s")
    parser.add_argument("--health-timeout-s", type=float, default=2.0,
                        help="the serving config's health.engine_timeout_s")
    parser.add_argument("--large-image-nice", type=int, default=10,
                        help="the serving config's limits.large_image_nice")
    parser.add_argument("--crops-dir", help="where to put the shared-memory file for crops (default: none)")
    parser.add_argument("--arena-slots", type=int, help="crops in shared memory (default: from the limits)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format=f"%(asctime)s %(levelname)s %(name)s[{os.getpid()}]: %(message)s"
    )
    # httpx logs each request at INFO: every probe and scrape passed to the engine would be a line.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
    sock = port_socket(args.host, args.port, listen=True)
    server = uvicorn.Server(uvicorn.Config(
        FrontEnd(args.engine_socket, args.channel_socket, args.threads, args.crops_dir, args.arena_slots,
                 args.request_timeout_s, args.health_timeout_s, args.large_image_nice),
        log_level=args.log_level, lifespan="on", timeout_keep_alive=args.idle_timeout_s,
        http=head_timeout_protocol(args.request_timeout_s, args.max_connections, args.idle_timeout_s),
        timeout_graceful_shutdown=int(args.graceful_s), access_log=args.log_level == "debug"))
    orphaned = threading.Event()
    threading.Thread(
        target=stop_when_orphaned, args=(server, orphaned), name="parent-watch", daemon=True
    ).start()
    server.run(sockets=[sock])
    if orphaned.is_set() and args.crops_dir:  # the server process could not clean up its directory
        shutil.rmtree(args.crops_dir, ignore_errors=True)


def stop_when_orphaned(server: uvicorn.Server, orphaned: threading.Event, interval_s: float = 0.5) -> None:
    """Stop when the server process is gone (killed: it could not stop us): otherwise this process would
    keep the port and answer 503 forever."""
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(interval_s)
    log.error("the server process %d is gone: stopping", parent)
    orphaned.set()
    server.should_exit = True


if __name__ == "__main__":
    main()
