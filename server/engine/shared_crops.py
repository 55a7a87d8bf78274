"""A device process's reading of crops that lie in shared memory (the front-ends' crop arenas,
server/frontend/arena.py): each file is mapped once, and a batch's crops are copied from there into the
slab that its forward reads, so the server process, whose one interpreter runs every request, copies none.
"""

from __future__ import annotations

import mmap
import os

import numpy as np
import torch


class SharedCrops:
    """Arena files mapped read-only, by path."""

    def __init__(self) -> None:
        self._mapped: dict[str, np.ndarray] = {}

    def gather(self, shared_at: list[tuple[str, int]], crop_bytes: int, slab: torch.Tensor) -> None:
        """Copy the crops at (file, byte offset) one after the other into the start of `slab` (their [H, W, 3]
        layout kept). Raises OSError for a file that cannot be mapped (its front-end has ended and its file
        is gone) and ValueError for a crop outside its file."""
        out = slab.numpy()
        for i, (path, offset) in enumerate(shared_at):
            memory = self._mapped.get(path)
            if memory is None:
                memory = self._map(path)
            if offset < 0 or offset + crop_bytes > memory.size:
                raise ValueError(f"a crop at byte {offset} of {path} lies outside its {memory.size} bytes")
            # numpy copies without the GIL: the forward of the batch before goes on meanwhile
            np.copyto(out[i * crop_bytes:(i + 1) * crop_bytes], memory[offset:offset + crop_bytes])

    def _map(self, path: str) -> np.ndarray:
        # A new file is a new front-end; the files of ended ones are gone: let go of their mappings.
        self._mapped = {p: m for p, m in self._mapped.items() if os.path.exists(p)}
        with open(path, "rb") as file:
            memory = self._mapped[path] = np.frombuffer(mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ),
                                                        dtype=np.uint8)
        return memory
