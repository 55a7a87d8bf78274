"""A decode process: `python -m server.decode_child FD` (started by server/decode_process.py).

Imports PIL and numpy only (no torch, no timm, not the server's __main__), so each process adds ~30 MiB,
not the ~400 MiB of a multiprocessing child that re-imports the server.
"""

from __future__ import annotations

import signal
import sys
from multiprocessing.connection import Connection

from server.errors import ApiError
from server.imaging import ResizeCrop, decode_image


def serve(conn: Connection) -> None:
    """First message: {model: (resize_edge, ResizeCrop)}; then per image (model, max_pixels, bytes) in, and
    ("ok", (H, W, 3)) plus the RGB bytes, or ("api_error", status, code, detail), or ("error", text) out."""
    transforms: dict[str, tuple[int, ResizeCrop]] = conn.recv()
    while True:
        try:
            model, max_pixels, data = conn.recv()
        except EOFError:  # the server closed its end: stop
            return
        try:
            resize_edge, resize_crop = transforms[model]
            picture = resize_crop(decode_image(data, max_pixels, needed_edge=resize_edge))
        except ApiError as exc:
            conn.send(("api_error", exc.status, exc.code, exc.detail))
            continue
        except Exception as exc:  # noqa: BLE001 - reported to the request; the process carries on
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
            continue
        conn.send(("ok", (picture.height, picture.width, 3)))
        conn.send_bytes(picture.tobytes())


def main() -> None:
    # Stopped by the server closing its end, never by the signals meant for the server's graceful stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    serve(Connection(int(sys.argv[1])))  # one end of a socket pair


if __name__ == "__main__":
    main()
