"""Decoding and preprocessing in child processes (the default when a model runs on a CUDA device).

Why: PIL parses headers, EXIF and quantisation tables in Python and copies pixels with the GIL held. In one
process the preprocessing threads share one GIL with the event loop, which caps the server at a few
thousand images per second however many cores it has: below what one H100 or H200 runs. Measured on an
H200 host (ViT-B/16 fp16, batch 64, 16-image requests of 224 px JPEGs): 1,472 img/s served with decoding
in threads, 2,189 img/s with decoding in processes.

Each preprocessing thread owns one child process (`server/decode_child.py`, which imports no torch) and
hands it one image at a time over a socket pair with fixed binary headers: the bytes go in, the crop comes
back as raw RGB bytes that become the tensor's memory. The thread waits with the GIL released; the
parent's cost per image is a few system calls, no pickling. Models whose timm transform is not the usual resize + centre crop decode in the thread.
"""

from __future__ import annotations

import logging
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import torch

from server.decode_child import ANSWER, ERROR, OK, REQUEST, plan_to_json, recv_exactly, recv_into_exactly
from server.errors import ApiError, internal
from server.models import HostTransform

log = logging.getLogger("mame.server")
REPO_ROOT = Path(__file__).resolve().parent.parent


class DecodeProcess:
    """One child process decoding for one thread of the parent (calls must not overlap)."""

    def __init__(self, transforms: dict[str, HostTransform]):
        fused = {name: t for name, t in transforms.items() if t.resize_then_crop is not None}
        self._index = {name: i for i, name in enumerate(fused)}
        self._crop = {name: t.resize_then_crop.crop for name, t in fused.items()}  # (height, width)
        self._plan = plan_to_json([(t.resize_edge, t.resize_then_crop) for t in fused.values()])
        self._start()

    def _start(self) -> None:
        ours, theirs = socket.socketpair()
        with theirs:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "server.decode_child", str(theirs.fileno())], pass_fds=[theirs.fileno()],
                cwd=REPO_ROOT)  # the checkout or the installed package: `server` imports either way
        self._sock = ours
        self._sock.sendall(struct.pack("!I", len(self._plan)) + self._plan)

    def __call__(self, model: str, data: bytes, max_pixels: int) -> torch.Tensor:
        """Image bytes -> uint8 [3, H, W], or the ApiError decoding raised in the child."""
        try:
            self._sock.sendall(REQUEST.pack(self._index[model], max_pixels, len(data)) + data)
            status, size = ANSWER.unpack(recv_exactly(self._sock, ANSWER.size))
            height, width = self._crop[model]
            if status == OK and size == height * width * 3:
                # Straight into the tensor's memory (torch.empty: no zero-filling under the GIL).
                pixels = torch.empty((height, width, 3), dtype=torch.uint8)
                recv_into_exactly(self._sock, pixels.numpy())
                return pixels.permute(2, 0, 1)
            payload = recv_exactly(self._sock, size)
        except (EOFError, OSError) as exc:
            try:
                exitcode = self._process.wait(1)  # reaped: its exit code, not None
            except subprocess.TimeoutExpired:
                exitcode = None
            log.error("decode process %s died (exit code %s); starting another", self._process.pid, exitcode)
            self._restart()
            raise internal(f"the decoding process died: {type(exc).__name__}") from None
        if status == ERROR:
            raise ApiError.from_json(payload)
        raise internal(f"the decoding process sent {size} bytes for a {height}x{width} crop")

    def _restart(self) -> None:
        self._process.kill()
        self._process.wait(5)
        self._sock.close()
        self._start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._sock.close()  # the child reads the end of its socket and returns
        try:
            self._process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


class DecodeProcesses:
    """A fixed set of decode processes, each taken by the first preprocessing thread that needs one."""

    def __init__(self, transforms: dict[str, HostTransform], count: int):
        self._all = [DecodeProcess(transforms) for _ in range(count)]
        self._free = list(self._all)
        self._lock = threading.Lock()
        self._local = threading.local()

    def __call__(self, model: str, data: bytes, max_pixels: int) -> torch.Tensor:
        process = getattr(self._local, "process", None)
        if process is None:
            with self._lock:
                if not self._free:
                    raise RuntimeError("more preprocessing threads than decode processes")
                process = self._local.process = self._free.pop()
        return process(model, data, max_pixels)

    def stop(self) -> None:
        for process in self._all:
            process.stop()
