"""The pixels a process decodes at once, bounded; and the memory of a burst of large images given back.

A decoded image holds several bytes per pixel (a 36 Mpx 16-bit PNG about 340 MB while it converts): a
few large images decoded in parallel would take gigabytes, and glibc's allocator keeps much of it after
they are freed. A counting semaphore of pixels (threading.Condition: the stdlib's semaphores count one
unit at a time) bounds what is decoded at once; once a burst is over, `malloc_trim` returns the freed
heap to the system.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from PIL import Image

from server.decode.imaging import open_image
from server.wire.errors import timeout, too_large

TRIM_AFTER_PIXELS = 8_000_000  # decoded since the last trim, before an idle budget trims the heap


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
    """At most `limit` pixels being decoded at once; an image over the limit is decoded alone (it waits
    until nothing else is being decoded), so any image within `limits.max_pixels` is still served."""

    def __init__(self, limit: int, trim: bool = True):
        self.limit = limit
        self._cond = threading.Condition()
        self._in_use = 0
        self._since_trim = 0
        self._trim = trim

    @property
    def in_use(self) -> int:
        return self._in_use

    @contextmanager
    def hold(self, pixels: int, deadline: float) -> Iterator[None]:
        """Hold `pixels` (capped at the limit) while the block decodes; 504 `timeout` when they are not
        free by `deadline` (time.monotonic())."""
        pixels = min(pixels, self.limit)
        with self._cond:
            if not self._cond.wait_for(lambda: self._in_use + pixels <= self.limit,
                                       timeout=max(0.0, deadline - time.monotonic())):
                raise timeout("the request's deadline passed while its images waited to be decoded "
                              f"({self._in_use} pixels were being decoded, limit {self.limit})")
            self._in_use += pixels
        try:
            yield
        finally:
            with self._cond:
                self._in_use -= pixels
                self._since_trim += pixels
                trim = self._trim and self._in_use == 0 and self._since_trim >= TRIM_AFTER_PIXELS
                if trim:
                    self._since_trim = 0
                self._cond.notify_all()
            if trim:
                _malloc_trim()


def open_all(images: list[bytes], max_pixels: int, max_request_pixels: int,
             needed_edge: int | None = None) -> list[Image.Image]:
    """Each image's header (`open_image`: its pixel limit, JPEG draft), and the request's pixel budget:
    413 `too_large` when its images together would decode to more than `max_request_pixels`."""
    opened = [open_image(data, max_pixels, needed_edge) for data in images]
    total = sum(img.size[0] * img.size[1] for img in opened)
    if total > max_request_pixels:
        raise too_large(f"the request's {len(opened)} images hold {total} pixels; the limit of one request "
                        f"is {max_request_pixels} (limits.max_request_pixels)")
    return opened


def pixels_of(img: Image.Image) -> int:
    return img.size[0] * img.size[1]
