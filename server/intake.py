"""The server process's side of its HTTP front-end processes (server/frontend.py): the crops they made,
in their shared-memory arenas or in the message, the errors they met, and re-routes."""

from __future__ import annotations

import mmap
import os

import numpy as np
import torch
from starlette.requests import Request

from server.errors import ApiError, internal
from server.frontend import FRONTEND_CROPS_AT, FRONTEND_ERROR, FRONTEND_IMAGES


class Reroute(Exception):
    """A front-end decoded a request's images for another model than its route's (an experiment's model it
    did not know yet): it sends the request again undecoded. Not an answer, not counted."""


def raise_frontend_error(request: Request) -> None:
    """The error a front-end process met reading or decoding the request's images, if any."""
    error = request.headers.get(FRONTEND_ERROR)
    if error is not None:
        raise ApiError.from_json(error)


class CropArenas:
    """The front-end processes' crop arenas (server/frontend.py `CropArena`), each mapped here once."""

    def __init__(self) -> None:
        self._mapped: dict[str, torch.Tensor] = {}
        # A view per slot, made once: three tensor operations per image cost more than the rest of its path.
        self._views: dict[tuple[str, str, tuple[int, int, int]], torch.Tensor] = {}

    def crops(self, at: str, input_size: tuple[int, int, int]) -> list[torch.Tensor]:
        """The crops at "<arena file> <offset> ..." as channels-last [3, H, W] views of the arena."""
        path, *offsets = at.split(" ")
        views = [self._views.get((path, start, input_size)) for start in offsets]
        if all(view is not None for view in views):
            return views
        memory = self._mapped.get(path)
        if memory is None:
            # A front-end that died left its file, which its supervisor deleted: let go of those mappings
            # (views still in a batch keep theirs alive until it is done).
            self._mapped = {p: m for p, m in self._mapped.items() if os.path.exists(p)}
            self._views = {key: view for key, view in self._views.items() if key[0] in self._mapped}
            with open(path, "r+b") as file:
                memory = self._mapped[path] = torch.frombuffer(mmap.mmap(file.fileno(), 0), dtype=torch.uint8)
        channels, height, width = input_size
        size = channels * height * width
        for start in offsets:
            self._views[path, start, input_size] = \
                memory[int(start):int(start) + size].view(height, width, channels).permute(2, 0, 1)
        return [self._views[path, start, input_size] for start in offsets]


async def frontend_crops(request: Request, input_size: tuple[int, int, int], arenas: CropArenas) -> list[torch.Tensor]:
    """The uint8 crops a front-end process made: in its shared-memory arena, or else in the body ([H, W, 3]
    each, back to back); as channels-last [3, H, W] views (the decode processes' layout)."""
    at = request.headers.get(FRONTEND_CROPS_AT)
    if at is not None:
        return arenas.crops(at, input_size)
    channels, height, width = input_size
    crop = channels * height * width
    memory = torch.empty(int(request.headers[FRONTEND_IMAGES]) * crop, dtype=torch.uint8)
    view, filled = memory.numpy(), 0
    async for chunk in request.stream():  # copied straight into the tensor: no join of the chunks
        if filled + len(chunk) > len(view):
            raise internal("a front-end sent more bytes than its images' crops")
        view[filled:filled + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
        filled += len(chunk)
    if filled != len(view):
        raise internal(f"a front-end sent {filled} bytes for crops of {len(view)}")
    return [memory[i * crop:(i + 1) * crop].view(height, width, channels).permute(2, 0, 1)
            for i in range(len(view) // crop)]
