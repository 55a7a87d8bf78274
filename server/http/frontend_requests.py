"""The engine's side of requests that front-end processes decoded: the crops they made (in their
shared-memory arenas, or in the message), the errors they met, and re-routes."""

from __future__ import annotations

import mmap
import os
from collections.abc import Mapping

import torch

from server.wire.errors import ApiError, internal
from server.wire.protocol import FRONTEND_CROPS_AT, FRONTEND_ERROR, FRONTEND_IMAGES


class Reroute(Exception):
    """A front-end decoded a request's images for another model than its route's (an experiment's model it
    did not know yet): it sends the request again undecoded. Not an answer, not counted."""


def raise_frontend_error(headers: Mapping[str, str]) -> None:
    """The error a front-end process met reading or decoding the request's images, if any."""
    error = headers.get(FRONTEND_ERROR)
    if error is not None:
        raise ApiError.from_json(error)


class CropArenas:
    """The front-end processes' crop arenas (server/frontend/arena.py), each mapped here once."""

    def __init__(self) -> None:
        self._mapped: dict[str, torch.Tensor] = {}
        # A view per slot, made once: three tensor operations per image cost more than the rest of its path.
        self._views: dict[tuple[str, int, tuple[int, int, int]], torch.Tensor] = {}

    def crops(self, shared_at: list[tuple[str, int]], input_size: tuple[int, int, int]) -> list[torch.Tensor]:
        """The crops at (arena file, byte offset) each (`shared_crops_at`) as channels-last [3, H, W] views
        of the arena."""
        try:  # after the first requests, every slot's view is made
            return [self._views[path, offset, input_size] for path, offset in shared_at]
        except KeyError:
            pass
        channels, height, width = input_size
        size = channels * height * width
        for path, offset in shared_at:
            if (path, offset, input_size) not in self._views:
                memory = self._memory(path)  # may replace self._views (a front-end gone)
                self._views[path, offset, input_size] = \
                    memory[offset:offset + size].view(height, width, channels).permute(2, 0, 1)
        return [self._views[path, offset, input_size] for path, offset in shared_at]

    def _memory(self, path: str) -> torch.Tensor:
        memory = self._mapped.get(path)
        if memory is None:
            # A front-end that died left its file, which its supervisor deleted: let go of those mappings
            # (views still in a batch keep theirs alive until it is done).
            self._mapped = {p: m for p, m in self._mapped.items() if os.path.exists(p)}
            self._views = {key: view for key, view in self._views.items() if key[0] in self._mapped}
            with open(path, "r+b") as file:
                memory = self._mapped[path] = torch.frombuffer(mmap.mmap(file.fileno(), 0), dtype=torch.uint8)
        return memory


def shared_crops_at(headers: Mapping[str, str]) -> list[tuple[str, int]] | None:
    """Where a front-end's crops lie in its arena, (file, byte offset) each, read from the request's
    "<arena file> <offset> ..." header; None: they came in the body."""
    at = headers.get(FRONTEND_CROPS_AT)
    if at is None:
        return None
    path, *offsets = at.split(" ")
    return [(path, int(offset)) for offset in offsets]


def frontend_crops(headers: Mapping[str, str], body: bytes, input_size: tuple[int, int, int],
                   arenas: CropArenas, shared_at: list[tuple[str, int]] | None) -> list[torch.Tensor]:
    """The uint8 crops a front-end process made: in its shared-memory arena where `shared_at` (the request's
    `shared_crops_at`) says, or else in the body ([H, W, 3] each, back to back); as channels-last [3, H, W]
    views."""
    if shared_at is not None:
        return arenas.crops(shared_at, input_size)
    channels, height, width = input_size
    crop = channels * height * width
    expected = int(headers[FRONTEND_IMAGES]) * crop
    if len(body) != expected:
        raise internal(f"a front-end sent {len(body)} bytes for crops of {expected}")
    memory = (
        torch.frombuffer(bytearray(body), dtype=torch.uint8) if body else torch.empty(0, dtype=torch.uint8)
    )
    return [memory[i * crop:(i + 1) * crop].view(height, width, channels).permute(2, 0, 1)
            for i in range(expected // crop)]
