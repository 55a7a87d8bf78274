"""A decode process: `python -m server.decode_child FD` (started by server/decode_process.py).

Imports PIL and numpy only (no torch, no timm, not the server's __main__), so each process adds ~17 MiB,
not the ~400 MiB of a multiprocessing child that re-imports the server.

Protocol over one end of a socket pair, with fixed binary headers so that each side spends a few system
calls per image and no pickling (the parent's share of the GIL is what limits a server's throughput):
  plan      parent -> child once: 4-byte length + JSON [[resize_edge, resize, crop_h, crop_w, resample], ...],
            one per model, in the order REQUEST's model index counts
  request   parent -> child: REQUEST header (model index, max_pixels, length) + the image bytes
  answer    child -> parent: ANSWER header (status, length) + RGB bytes [H, W, 3] (status 0), or the UTF-8
            JSON {"status", "code", "detail"} of an error (status 1)
"""

from __future__ import annotations

import json
import signal
import socket
import struct
import sys

from PIL import Image

from server.errors import ApiError, internal
from server.imaging import ResizeCrop, decode_image

REQUEST = struct.Struct("!IQI")  # model index, max_pixels, image bytes
ANSWER = struct.Struct("!BI")  # status (0 ok, 1 error), payload bytes
OK, ERROR = 0, 1


def recv_into_exactly(sock: socket.socket, buffer) -> None:
    """Fill a writable buffer (one system call in the common case); EOFError if the other side closed."""
    view = memoryview(buffer).cast("B")
    received, size = 0, len(view)
    while received < size:
        n = sock.recv_into(view[received:], size - received, socket.MSG_WAITALL)
        if n == 0:
            raise EOFError("the other side closed the socket")
        received += n


def recv_exactly(sock: socket.socket, size: int) -> bytearray:
    buffer = bytearray(size)
    recv_into_exactly(sock, buffer)
    return buffer


Decoder = tuple[int, ResizeCrop]  # the edge the resize aims for (decoding may draft down to it), resize + crop


def decoder_to_list(decoder: Decoder) -> list[int]:
    """[resize_edge, resize, crop_h, crop_w, resample]: a decoder as JSON (here and for front-end processes)."""
    edge, rc = decoder
    return [edge, rc.edge, *rc.crop, int(rc.resample)]


def decoder_from_list(values: list[int]) -> Decoder:
    edge, rc_edge, crop_h, crop_w, resample = values
    return edge, ResizeCrop(rc_edge, (crop_h, crop_w), Image.Resampling(resample))


def crop_bytes(decoder: Decoder, data: bytes, max_pixels: int) -> bytes:
    """Image bytes -> the model's uint8 crop as [H, W, 3] bytes."""
    resize_edge, resize_crop = decoder
    return resize_crop(decode_image(data, max_pixels, needed_edge=resize_edge)).tobytes()


def plan_to_json(plan: list[Decoder]) -> bytes:
    return json.dumps([decoder_to_list(decoder) for decoder in plan]).encode()


def plan_from_json(data: bytes) -> list[Decoder]:
    return [decoder_from_list(values) for values in json.loads(data)]


def serve(sock: socket.socket) -> None:
    (length,) = struct.unpack("!I", recv_exactly(sock, 4))
    plan = plan_from_json(recv_exactly(sock, length))
    while True:
        try:
            model, max_pixels, size = REQUEST.unpack(recv_exactly(sock, REQUEST.size))
            data = bytes(recv_exactly(sock, size))
        except EOFError:  # the server closed its end: stop
            return
        try:
            pixels = crop_bytes(plan[model], data, max_pixels)
            sock.sendall(ANSWER.pack(OK, len(pixels)) + pixels)
        except ApiError as exc:
            error = exc.to_json()
            sock.sendall(ANSWER.pack(ERROR, len(error)) + error)
        except Exception as exc:  # noqa: BLE001 - reported to the request; the process carries on
            error = internal(f"preprocessing failed: {type(exc).__name__}: {exc}").to_json()
            sock.sendall(ANSWER.pack(ERROR, len(error)) + error)


def main() -> None:
    # Stopped by the server closing its end, never by the signals meant for the server's graceful stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    serve(socket.socket(fileno=int(sys.argv[1])))


if __name__ == "__main__":
    main()
