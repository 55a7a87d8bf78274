"""A front-end process's crop arena: slots in a shared-memory file that the engine maps too."""

from __future__ import annotations

import mmap
import os
import tempfile
from pathlib import Path

from PIL import Image

from server.decode.crops import Decoder, crop_bytes

ARENA_MIN_SLOTS = 256  # crops in shared memory per front-end (37 MiB at 224 px); more in flight: in messages


class CropArena:
    """Slots for crops in a file in shared memory (/dev/shm) that the engine maps too, so crops reach it
    without passing through its event loop (sent in a message, copying them in is most of the engine's
    work per image).

    Allocated at once (posix_fallocate): a full /dev/shm fails here, at start, and not as a SIGBUS later.
    Slots are taken and given back on the event loop only; a request that finds too few free slots sends
    its crops in the body. Slots are reused last-freed first, so a light load touches few pages."""

    def __init__(self, directory: str, slot_bytes: int, slots: int):
        fd, self.path = tempfile.mkstemp(prefix=f"crops-{os.getpid()}-", dir=directory)
        try:
            os.posix_fallocate(fd, 0, slot_bytes * slots)
            self.memory = mmap.mmap(fd, slot_bytes * slots)
        except OSError:
            os.unlink(self.path)
            raise
        finally:
            os.close(fd)
        self.slot_bytes = slot_bytes
        self._free = list(range(slots - 1, -1, -1))

    def take(self, count: int) -> list[int] | None:
        if count > len(self._free):
            return None
        taken = self._free[-count:]
        del self._free[-count:]
        return taken

    def give_back(self, slots: list[int]) -> None:
        self._free.extend(reversed(slots))

    def close(self) -> None:
        self.memory.close()
        # missing_ok: an orphaned front-end that stopped first removes the whole directory
        Path(self.path).unlink(missing_ok=True)


def decode_crop(decoder: Decoder, data: bytes | Image.Image, max_pixels: int, arena: CropArena | None = None,
                slot: int = 0) -> bytes:
    """Image bytes -> the model's uint8 crop as [H, W, 3] bytes (server/decode/crops.py), or
    written into the arena's `slot` (then b"")."""
    crop = crop_bytes(decoder, data, max_pixels)
    if arena is None:
        return crop
    start = slot * arena.slot_bytes
    arena.memory[start:start + len(crop)] = crop
    return b""
