"""The lane of large images: the threads that decode them, at a lower CPU priority.

A 36 Mpx PNG takes a core for a second or more. At the same priority, a flood of them shares the cores
evenly with the event loop, the small images' decoding and the forward passes, and small requests wait
their turn behind it. Linux keeps a nice value per thread, so the lane's threads can be niced alone: the
scheduler then gives the cores to the rest of the server first and the large images what is left. Raising
a nice value needs no privilege.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger("mame.decode")

MAX_NICE = 19  # Linux's lowest priority


def lower_thread_priority(nice: int) -> None:
    """The calling thread's nice value raised by `nice` (at most to MAX_NICE), on Linux; elsewhere a nice
    value is the whole process's, so nothing changes. 0: nothing changes."""
    if nice <= 0 or not sys.platform.startswith("linux"):
        return
    thread_id = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, thread_id)
        os.setpriority(os.PRIO_PROCESS, thread_id, min(MAX_NICE, current + nice))
    except OSError as exc:  # e.g. a seccomp profile forbids it: large images decode at full priority
        log.warning("could not lower the priority of a large-image decoding thread: %s", exc)


def large_image_pool(threads: int, nice: int, initializer: Callable[[], None] | None = None
                     ) -> ThreadPoolExecutor:
    """The large-image lane: `threads` threads (named decode-large), each niced by `nice`
    (`limits.large_image_nice`), each running `initializer` first if given."""
    def start_thread() -> None:
        lower_thread_priority(nice)
        if initializer is not None:
            initializer()

    return ThreadPoolExecutor(threads, thread_name_prefix="decode-large", initializer=start_thread)
