"""Decoding untrusted image bytes into RGB pictures, with clear errors for every way they can be bad.

No torch here: front-end processes import it and stay small.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from server.wire.errors import ApiError, bad_image, too_large

# A truncated file is an error, never a half-grey picture.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# A JPEG is decoded at 1/2, 1/4 or 1/8 scale (in the DCT, far cheaper than decoding it whole) while it
# stays at least this many times the size the model's resize step needs; any other image is reduced by box
# averages to the same bound right after decoding, before it is converted. Pillow's thumbnail() uses the same
# gap: the crop then differs from a full decode by a fraction of a grey level on average.
DRAFT_GAP = 2

# Our limit (limits.max_pixels, checked from the header before decoding) is the only one: PIL's own bomb check
# (about 179 M pixels) refused images a config allowing more had accepted, with a 413 that contradicted it.
Image.MAX_IMAGE_PIXELS = None

# Pillow allocates an image's pixels in blocks (16 MiB by default) that it zeroes with the GIL held. In a
# thread, glibc serves blocks of that size from memory freed (or trimmed) before and zeroes it there: 10-30
# ms per 36 Mpx 16-bit image during which no other thread of the process runs Python. A block over glibc's
# largest mmap threshold (32 MiB) is mapped afresh instead: its pages are zeroed by the kernel as the
# decoder first writes them (the GIL released), and freeing it gives the memory straight back. Blocks of
# LARGE_BLOCK_BYTES hold any image within the default pixel limit whole; small images are one block of their
# own size either way. PILLOW_BLOCK_SIZE, when set, is the operator's choice and wins.
LARGE_BLOCK_BYTES = 256 << 20
if "PILLOW_BLOCK_SIZE" not in os.environ:
    Image.core.set_block_size(LARGE_BLOCK_BYTES)


def reduce_factor(size: tuple[int, int], needed_edge: int | None) -> int:
    """The whole factor a decoded image of `size` can shrink by while its shorter side stays at least
    DRAFT_GAP x `needed_edge` (1: not at all)."""
    return max(1, min(size) // (DRAFT_GAP * needed_edge)) if needed_edge else 1


def _reduced(img: Image.Image, factor: int) -> Image.Image:
    """Each `factor` x `factor` block averaged, as a JPEG's reduced-scale decoding averages in the DCT: a box
    filter at a whole ratio, in the image's own mode (16-bit too), into a small image, the GIL released.
    The columns and rows short of a whole block (fewer than `factor`) are left out evenly on both sides, so
    every pixel left is a whole block's average."""
    if factor <= 1:
        return img
    width, height = img.size
    left, top = width % factor // 2, height % factor // 2
    box = (left, top, left + width - width % factor, top + height - height % factor)
    return img.resize((width // factor, height // factor), Image.Resampling.BOX, box=box)


def _to_8bit(img: Image.Image, reduce_by: int = 1) -> Image.Image:
    """16-bit and 32-bit grey (modes I, I;16*, F) scaled down to 8-bit grey, reduced by `reduce_by` first."""
    sixteen_bit = img.mode.startswith("I;16")
    img = _reduced(img, reduce_by)
    arr = np.array(img, dtype=np.float32)  # one copy, then worked in place: a 36 Mpx image is 144 MB of it
    # I;16 is known to be 16-bit: always scaled, or a dark picture (max <= 255) would come out bright. I and F
    # say nothing of their range: scaled as 16-bit when they pass 8 bits.
    if sixteen_bit or (arr.size and float(arr.max()) > 255.0):
        arr *= 255.0 / 65535.0
    np.clip(arr, 0, 255, out=arr)
    return Image.fromarray(arr.astype(np.uint8), mode="L")


def to_rgb(img: Image.Image, reduce_by: int = 1) -> Image.Image:
    """Any PIL mode to RGB; transparency is composited over white. Reduced by `reduce_by` (`_reduced`): before
    converting where averaging and converting commute (grey, RGB, 16-bit: far less to convert, and no
    full-size copy allocated), after it otherwise (a palette, 1-bit, CMYK, alpha)."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img, reduce_by = _to_8bit(img, reduce_by), 1
    elif img.mode in ("L", "RGB"):
        img, reduce_by = _reduced(img, reduce_by), 1
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return _reduced(Image.alpha_composite(background, rgba).convert("RGB"), reduce_by)
    return _reduced(img if img.mode == "RGB" else img.convert("RGB"), reduce_by)


def open_image(data: bytes, max_pixels: int, needed_edge: int | None = None) -> Image.Image:
    """The image's header only (PIL opens lazily): the pixel limit checked, the first frame chosen, and a
    JPEG much larger than `needed_edge` (the shortest edge the caller will resize to) set to decode at a
    reduced scale (never below DRAFT_GAP x `needed_edge` on either side). `img.size` is then what decoding
    will hold: O(header) work, so a request can be refused before any decoding."""
    if not data:
        raise bad_image("the image is empty (0 bytes)")
    with _pil_errors():
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        if width * height > max_pixels:
            raise too_large(f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
        if width == 0 or height == 0:
            raise bad_image(f"image has no pixels ({width}x{height})")
        img.seek(0)  # first frame of an animated image
        if needed_edge:
            img.draft(img.mode, (DRAFT_GAP * needed_edge, DRAFT_GAP * needed_edge))  # no-op unless JPEG
        return img


def decode_opened(img: Image.Image, needed_edge: int | None = None) -> Image.Image:
    """An image from `open_image` decoded to RGB, EXIF orientation applied; one much larger than
    `needed_edge` reduced by a whole factor (`reduce_factor`: its shorter side at least DRAFT_GAP x
    `needed_edge`), as a JPEG's draft decoding does."""
    with _pil_errors():
        img.load()
        ImageOps.exif_transpose(img, in_place=True)  # without in_place it copies even unrotated images
        return to_rgb(img, reduce_factor(img.size, needed_edge))


def release_pixels(img: Image.Image) -> None:
    """Let go of an image's decoded pixels once its crop is made, in the decoding thread: the pixels decoded
    at once are then bounded by the budget that decoding held, not held until the request is answered (a
    36 Mpx image's hundreds of MB), and they are not unmapped on the event loop."""
    img.close()


def decode_image(data: bytes, max_pixels: int, needed_edge: int | None = None) -> Image.Image:
    """Bytes -> RGB image: first frame of an animation, EXIF orientation applied, pixel limit before decoding,
    reduced towards `needed_edge` (`open_image`, then `decode_opened`)."""
    return decode_opened(open_image(data, max_pixels, needed_edge), needed_edge)


@contextmanager
def _pil_errors() -> Iterator[None]:
    """PIL's ways of saying that bytes are not a good image, as the contract's 400 `bad_image`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies
            yield
    except ApiError:
        raise
    except UnidentifiedImageError:
        raise bad_image("the bytes are not an image format we can decode") from None
    except (OSError, ValueError, SyntaxError, EOFError, NotImplementedError) as exc:
        # PIL reports truncated or corrupt data with these (NotImplementedError: a DDS variant it lacks).
        raise bad_image(f"the image could not be decoded (truncated or corrupt): {exc}") from None


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
