"""The pixels a process decodes at once, bounded; and the memory of a burst of large images given back.

A decoded image holds several bytes per pixel (a 36 Mpx 16-bit PNG about 340 MB while it converts): a
few large images decoded in parallel would take gigabytes, and glibc's allocator keeps much of it after
they are freed. A counting semaphore of pixels (asyncio's semaphores count one unit at a time) bounds what
is decoded at once; `malloc_trim` returns the freed heap to the system as large images go.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

TRIM_AFTER_PIXELS = 8_000_000  # decoded since the last trim, before the heap is trimmed again
# An image of this many pixels or more (as decoded: after a JPEG's draft scaling) takes a tenth of a second or
# more of a core to decode: it decodes in the lane of large images (server/http/app.py).
LARGE_IMAGE_PIXELS = 4_000_000


def held_pixels(pixel_counts: Iterable[int]) -> int:
    """The pixels a request holds in the budget while its images decode: its large images' (LARGE_IMAGE_PIXELS
    or more). Small images are not counted: they decode in their own lane, whose threads bound their memory
    (each image under LARGE_IMAGE_PIXELS), so a small image never waits for pixels that large ones hold."""
    return sum(n for n in pixel_counts if n >= LARGE_IMAGE_PIXELS)


def _find_malloc_trim():
    """glibc's malloc_trim, or None (another C library: nothing to do)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _find_malloc_trim()


def _malloc_trim() -> None:
    """Give the heap's free memory back to the system."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class PixelBudget:
    """At most `limit` pixels being decoded at once in a process, held per request from the event loop (so
    no decoding thread waits: a small image is never stuck in the pool behind large ones waiting for
    pixels). A request over the limit is decoded alone (it waits until nothing else is being decoded), so
    any image within `limits.max_pixels` is still served. Every TRIM_AFTER_PIXELS released, the heap is
    trimmed in a thread (a decoding thread's malloc arena otherwise keeps its peak)."""

    def __init__(self, limit: int, trim: bool = True):
        self.limit = limit
        self._in_use = 0
        self._since_trim = 0
        self._trim = trim
        self._waiters: list[tuple[int, asyncio.Future]] = []

    @property
    def in_use(self) -> int:
        return self._in_use

    @asynccontextmanager
    async def hold(self, pixels: int) -> AsyncIterator[None]:
        """Hold `pixels` (capped at the limit) while the block decodes; waits, cancellable (the request's
        deadline), until they fit."""
        pixels = min(pixels, self.limit)
        if self._in_use + pixels <= self.limit:
            self._in_use += pixels
        else:
            granted = asyncio.get_running_loop().create_future()
            entry = (pixels, granted)
            self._waiters.append(entry)
            try:
                await granted
            except BaseException:
                if granted.done() and not granted.cancelled():  # granted just as the request gave up
                    self._release(pixels)
                elif entry in self._waiters:
                    self._waiters.remove(entry)
                raise
        try:
            yield
        finally:
            self._release(pixels)

    def _release(self, pixels: int) -> None:
        self._in_use -= pixels
        self._since_trim += pixels
        for entry in list(self._waiters):  # the oldest first, and any that fits
            wanted, granted = entry
            if granted.done():  # its request gave up (cancelled) and has not yet left the list
                self._waiters.remove(entry)
            elif self._in_use + wanted <= self.limit:
                self._waiters.remove(entry)
                self._in_use += wanted
                granted.set_result(None)
        # Under a steady flood the budget is never idle: trim by pixels decoded, not only once it is.
        if self._trim and self._since_trim >= TRIM_AFTER_PIXELS:
            self._since_trim = 0
            asyncio.get_running_loop().run_in_executor(None, _malloc_trim)
