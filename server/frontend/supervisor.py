"""The engine's side of its front-end processes: starts them, replaces one that dies, stops them."""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("mame.frontend")
QUICK_DEATH_S = 10.0  # a front-end that exits this soon after starting counts as a quick death ...
QUICK_DEATHS_FATAL = 3  # ... and this many in a row stop the server


class FrontEndProcesses:
    """The engine's side: starts `count` front-end processes listening on the port `reserved` holds, replaces
    one that dies, and stops them (each drains: it answers what it accepted) before the engine stops."""

    def __init__(
        self,
        count: int,
        reserved: socket.socket,
        engine_socket: str,
        channel_socket: str,
        threads: int,
        log_level: str,
        graceful_s: float,
        crops_dir: str | None,
        arena_slots: int | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
        request_timeout_s: float = 30.0,
        max_connections: int | None = None,
        idle_timeout_s: float = 5.0,
        health_timeout_s: float = 2.0,
        large_image_nice: int = 10,
    ):
        self.health_timeout_s = health_timeout_s
        self.large_image_nice = large_image_nice
        self.max_connections = max_connections  # each front-end's (docs/server.md)
        self.idle_timeout_s = idle_timeout_s
        self.on_fatal = on_fatal or (lambda exc: None)
        self._quick_deaths = 0
        self.channel_socket = channel_socket
        self.crops_dir = crops_dir
        self.arena_slots = arena_slots
        self.count = count
        self.reserved = reserved
        self.host, self.port = reserved.getsockname()[:2]
        self.engine_socket = engine_socket
        self.threads = threads
        self.log_level = log_level
        self.graceful_s = graceful_s
        self.request_timeout_s = request_timeout_s
        self.processes: list[subprocess.Popen] = []
        self._stopping = threading.Event()
        self._stopped = False
        self._lock = threading.Lock()
        self._monitor = threading.Thread(target=self._watch, name="frontend-monitor", daemon=True)

    def start(self) -> None:
        with self._lock:
            self.processes = [self._spawn() for _ in range(self.count)]
            self._started = [time.monotonic()] * self.count
        self._monitor.start()
        log.info(
            "%d HTTP front-end process(es) on %s port %d, %d decoding threads each",
            self.count,
            self.host,
            self.port,
            self.threads,
        )

    def _spawn(self) -> subprocess.Popen:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "server.frontend",
                "--host",
                self.host,
                "--port",
                str(self.port),
                "--engine-socket",
                self.engine_socket,
                "--channel-socket",
                self.channel_socket,
                "--threads",
                str(self.threads),
                "--log-level",
                self.log_level,
                "--graceful-s",
                str(self.graceful_s),
                "--request-timeout-s",
                str(self.request_timeout_s),
                *(["--max-connections", str(self.max_connections)] if self.max_connections else []),
                "--idle-timeout-s",
                str(self.idle_timeout_s),
                "--health-timeout-s",
                str(self.health_timeout_s),
                "--large-image-nice",
                str(self.large_image_nice),
                *(["--crops-dir", self.crops_dir] if self.crops_dir else []),
                *(["--arena-slots", str(self.arena_slots)] if self.arena_slots is not None else []),
            ],
            cwd=Path(__file__).resolve().parents[2],
        )  # `server` imports from the checkout too

    def _watch(self) -> None:
        while not self._stopping.wait(0.5):
            try:
                with self._lock:
                    for i, process in enumerate(self.processes):
                        if process.poll() is not None and not self._stopping.is_set():
                            self._replace(i, process)
            except Exception:  # a failed replacement is retried on the next round
                log.exception("replacing a front-end process failed")

    def _replace(self, i: int, process: subprocess.Popen) -> None:
        for leftover in Path(self.crops_dir or ".").glob(f"crops-{process.pid}-*"):
            leftover.unlink(missing_ok=True)  # its crop arena (the engine lets go of its mapping)
        # One that dies within seconds of starting will again (a port it cannot bind, a broken install):
        # after a few in a row the server stops, for its supervisor to see, rather than serve without them.
        self._quick_deaths = (
            self._quick_deaths + 1 if time.monotonic() - self._started[i] < QUICK_DEATH_S else 0
        )
        if self._quick_deaths >= QUICK_DEATHS_FATAL:
            log.error("front-end process %d exited with %s; not replaced: stopping the server", process.pid,
                      process.returncode)
            self._stopping.set()
            self.on_fatal(
                RuntimeError(
                    f"{self._quick_deaths} front-end processes in a row exited within "
                    f"{QUICK_DEATH_S:g} s of starting (the last with {process.returncode})"
                )
            )
            return
        log.error("front-end process %d exited with %s; starting another", process.pid, process.returncode)
        self.processes[i] = self._spawn()
        self._started[i] = time.monotonic()

    def stop(self) -> None:
        """Stop accepting (each front-end closes its listening socket), let each answer what it accepted,
        then return. Idempotent."""
        with self._lock:
            # Its own flag: _stopping (no more replacements) is also set by the "keep dying" path, after
            # which the surviving front-ends must still be stopped and drained here.
            if self._stopped:
                return
            self._stopped = True
            self._stopping.set()
            self.reserved.close()
            for process in self.processes:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.graceful_s + 5
        for process in self.processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("front-end process %d did not stop in time: killed", process.pid)
                process.kill()
                process.wait()
