"""Liveness of the event loop: a task that ticks on it, and a thread that notices when the ticks stop.

Every request passes through the one event loop, so a call that blocks it (a blocking call in a handler, a
long computation holding the GIL) stalls the whole server while its threads (the forward passes, the
device watchdog) go on. The heartbeat task wakes every `interval_s`; how late each wake-up comes is the
loop's lag. `/healthz` and `/readyz` answer 503 `unresponsive` while the loop has not run for `stall_s`, or
when its last wake-up came that late: a probe that waited through the stall is failed, not answered 200.
A forward pass runs in a thread of its own and releases the GIL, so a long one delays no tick.
The thread logs, once per stall, where the loop is stuck (its Python stack), which no probe can say.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable

log = logging.getLogger("mame.server")

TICK_S = 0.5  # the heartbeat's interval, and the watching thread's


class LoopHeartbeat:
    """Ticks on the running event loop (`start` from it); `stalled()` says why it is not live, or None."""

    def __init__(self, stall_s: float, interval_s: float = TICK_S,
                 observe_lag: Callable[[float], None] | None = None):
        self.stall_s = stall_s
        self.interval_s = min(interval_s, stall_s / 2)
        self._observe_lag = observe_lag
        self.last_tick = time.monotonic()
        self.last_lag = 0.0  # how late the last tick came
        self._task: asyncio.Task | None = None
        self._loop_thread: int | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        self.last_tick, self._loop_thread = time.monotonic(), threading.get_ident()
        self._stop.clear()
        self._task = asyncio.get_running_loop().create_task(self._beat(), name="loop-heartbeat")
        threading.Thread(target=self._watch, name="loop-watchdog", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()

    def stalled(self, now: float | None = None) -> str | None:
        """Why the loop is not live: it has not run for `stall_s` (a probe answered now waited through
        that), or its last tick came `stall_s` late. None when live."""
        since = (time.monotonic() if now is None else now) - self.last_tick
        blocked_s = max(since - self.interval_s, self.last_lag)
        if blocked_s < self.stall_s:
            return None
        return (f"the server's event loop did not run for {blocked_s:.1f} s (health.loop_stall_s: "
                f"{self.stall_s:g}): a call blocks it")

    async def _beat(self) -> None:
        while True:
            expected = time.monotonic() + self.interval_s
            await asyncio.sleep(self.interval_s)
            now = time.monotonic()
            self.last_lag, self.last_tick = max(0.0, now - expected), now
            if self._observe_lag is not None:
                self._observe_lag(self.last_lag)

    def _watch(self) -> None:
        """Logs once per stall where the loop is (its thread's stack), as the stall goes on."""
        reported = None
        while not self._stop.wait(self.interval_s):
            tick = self.last_tick
            if reported == tick or time.monotonic() - tick < self.stall_s + self.interval_s:
                continue
            reported = tick
            frame = sys._current_frames().get(self._loop_thread) if self._loop_thread is not None else None
            stack = "".join(traceback.format_stack(frame)) if frame is not None else "(not found)\n"
            log.error("the event loop has not run for %.1f s (health.loop_stall_s: %g); it is at:\n%s",
                      time.monotonic() - tick, self.stall_s, stack.rstrip())
