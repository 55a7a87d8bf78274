"""The lane of large images: the threads that decode them, at a lower CPU priority.

A 36 Mpx PNG takes a core for a second or more. At the same priority, a flood of them shares the cores
evenly with the event loop, the small images' decoding and the forward passes, and small requests wait
their turn behind it. Linux keeps a nice value per thread, so the lane's threads can be niced alone: the
scheduler then gives the cores to the rest of the server first and the large images what is left. Raising
a nice value needs no privilege.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from PIL import Image

from server.decode.budget import LARGE_IMAGE_PIXELS, PixelBudget, held_pixels
from server.decode.imaging import pixels_of
from server.wire.pool import run_all_in_pool

T = TypeVar("T")

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


def lane_for(image: Image.Image, pool: ThreadPoolExecutor,
             large_pool: ThreadPoolExecutor | None) -> ThreadPoolExecutor:
    """The pool an opened image decodes in: `large_pool` for a large one (LARGE_IMAGE_PIXELS or more, as it
    will be decoded), so small ones never wait behind it for a thread; `pool` otherwise."""
    if large_pool is not None and pixels_of(image) >= LARGE_IMAGE_PIXELS:
        return large_pool
    return pool


async def decode_in_lanes(function: Callable[..., T], calls: list[tuple], budget: PixelBudget,
                          pool: ThreadPoolExecutor, large_pool: ThreadPoolExecutor | None,
                          timeout_s: float) -> list[T]:
    """`function(*call)` for each call, whose second argument is the opened image it decodes: each in its
    image's lane (`lane_for`), within the pixels decoded at once (`budget`: the large images hold it) and
    `timeout_s` (TimeoutError past it)."""
    async with asyncio.timeout(max(0.0, timeout_s)), \
            budget.hold(held_pixels(pixels_of(call[1]) for call in calls)):
        return await run_all_in_pool(pool, function, calls,
                                     pool_for=lambda call: lane_for(call[1], pool, large_pool))
