"""Decoding and preprocessing in child processes (the default when a model runs on a CUDA device).

Why: PIL parses headers, EXIF and quantisation tables in Python and copies pixels with the GIL held. In one
process the preprocessing threads then share one GIL with the event loop: measured with py-spy on 8-image
requests of 224 px JPEGs, 0.45 ms of GIL per image on this machine's CPU, which caps a server at a few
thousand images per second however many cores it has: far below what one H100 or H200 runs.

Each preprocessing thread owns one child process and hands it one image at a time: the bytes go in through
a pipe, the uint8 crop comes back as raw bytes straight into the tensor's memory. The thread waits in the
pipe with the GIL released, so the parent's cost per image is two small messages.
"""

from __future__ import annotations

import logging
import signal
import threading
from multiprocessing.connection import Connection

import torch
import torch.multiprocessing as mp

from server.errors import ApiError, internal
from server.imaging import decode_image
from server.models import HostTransform

log = logging.getLogger("mame.server")


def _decode_main(conn: Connection, transforms: dict[str, HostTransform]) -> None:
    # Stopped by its parent (end of the pipe), never by the signals meant for the server's graceful stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(1)
    while True:
        try:
            model, max_pixels, data = conn.recv()
        except EOFError:
            return
        try:
            transform = transforms[model]
            crop = transform(decode_image(data, max_pixels, needed_edge=transform.resize_edge))
            pixels = crop.permute(1, 2, 0).contiguous()  # [H, W, 3]: no copy for the fused resize and crop
        except ApiError as exc:
            conn.send(("api_error", exc.status, exc.code, exc.detail))
            continue
        except Exception as exc:  # noqa: BLE001 - reported to the request, the process carries on
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
            continue
        conn.send(("ok", tuple(pixels.shape)))
        conn.send_bytes(memoryview(pixels.numpy()).cast("B"))


class DecodeProcess:
    """One child process decoding for one thread of the parent (calls must not overlap)."""

    def __init__(self, transforms: dict[str, HostTransform]):
        self._transforms = transforms
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child_end = ctx.Pipe()
        self._process = ctx.Process(target=_decode_main, args=(child_end, self._transforms), daemon=True,
                                    name="mame-decode")
        self._process.start()
        child_end.close()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def __call__(self, model: str, data: bytes, max_pixels: int) -> torch.Tensor:
        """Image bytes -> uint8 [3, H, W], or the ApiError decoding raised in the child."""
        try:
            self._conn.send((model, max_pixels, data))
            answer = self._conn.recv()
            if answer[0] == "ok":
                height, width, channels = answer[1]
                pixels = bytearray(height * width * channels)
                self._conn.recv_bytes_into(pixels)
                return torch.frombuffer(pixels, dtype=torch.uint8).view(height, width, channels).permute(2, 0, 1)
        except (EOFError, OSError) as exc:
            log.error("decode process %s died (exit code %s); starting another", self._process.pid,
                      self._process.exitcode)
            self._restart()
            raise internal(f"the decoding process died: {type(exc).__name__}") from None
        if answer[0] == "api_error":
            raise ApiError(answer[1], answer[2], answer[3])
        raise internal(f"preprocessing failed: {answer[1]}")

    def _restart(self) -> None:
        self._process.kill()
        self._process.join(5)
        self._conn.close()
        self._start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._conn.close()  # the child reads the end of the pipe and returns
        self._process.join(timeout_s)
        if self._process.is_alive():
            self._process.kill()


class DecodeProcesses:
    """A fixed set of decode processes, each taken by the first preprocessing thread that needs one."""

    def __init__(self, transforms: dict[str, HostTransform], count: int):
        self._free = [DecodeProcess(transforms) for _ in range(count)]
        self._all = list(self._free)
        self._lock = threading.Lock()
        self._local = threading.local()

    def __call__(self, model: str, data: bytes, max_pixels: int) -> torch.Tensor:
        process = getattr(self._local, "process", None)
        if process is None:
            with self._lock:
                if not self._free:  # more threads than processes: a configuration error, not a request's
                    raise RuntimeError("more preprocessing threads than decode processes")
                process = self._local.process = self._free.pop()
        return process(model, data, max_pixels)

    def pids(self) -> list[int | None]:
        return [process.pid for process in self._all]

    def stop(self) -> None:
        for process in self._all:
            process.stop()
