"""Decoding of untrusted image bytes: every mode converted, every bad input a specific error."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from server.decode.imaging import decode_image
from server.decode.resize import ResizeCrop
from server.wire.body import check_content_type
from server.wire.errors import ApiError

LIMIT = 10_000_000


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def rgb_gradient(w: int = 40, h: int = 30) -> Image.Image:
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    arr[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    return Image.fromarray(arr)


@pytest.mark.parametrize(
    ("make", "fmt"),
    [
        (lambda: rgb_gradient().convert("L"), "PNG"),
        (lambda: rgb_gradient().convert("1"), "PNG"),
        (lambda: rgb_gradient().convert("RGBA"), "PNG"),
        (lambda: rgb_gradient().convert("LA"), "PNG"),
        (lambda: rgb_gradient().convert("P"), "PNG"),
        (lambda: rgb_gradient().convert("CMYK"), "JPEG"),
        (lambda: rgb_gradient(), "WEBP"),
        (lambda: rgb_gradient(), "BMP"),
        (lambda: rgb_gradient(), "TIFF"),
    ],
)
def test_modes_are_converted_to_rgb(make, fmt):
    img = decode_image(encode(make(), fmt), LIMIT)
    assert img.mode == "RGB" and img.size == (40, 30)


def test_16_bit_grey_is_scaled_not_clipped():
    arr = np.tile(np.linspace(0, 65535, 40).astype(np.uint16), (30, 1))
    img = decode_image(encode(Image.fromarray(arr), "PNG"), LIMIT)
    out = np.asarray(img)
    assert img.mode == "RGB"
    assert out[0, 0, 0] == 0 and out[0, -1, 0] == 255 and 100 < out[0, 20, 0] < 155


def test_dark_16_bit_grey_is_scaled_whatever_its_brightest_pixel():
    # Scaled only when a pixel passed 255, a dark picture came out bright: max 255 -> mid-grey, max 256 ->
    # black.
    for brightest in (255, 256):
        arr = np.tile(np.linspace(0, 255, 40).astype(np.uint16), (30, 1))
        arr[0, 0] = brightest
        out = np.asarray(decode_image(encode(Image.fromarray(arr), "PNG"), LIMIT))
        assert out.max() <= 1, brightest


def test_transparency_is_composited_over_white():
    img = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    assert decode_image(encode(img, "PNG"), LIMIT).getpixel((5, 5)) == (255, 255, 255)
    palette = Image.new("P", (10, 10), 0)
    palette.putpalette([0, 0, 0] * 256)
    assert decode_image(encode(palette, "PNG", transparency=0), LIMIT).getpixel((5, 5)) == (255, 255, 255)


def test_animated_image_gives_its_first_frame():
    frames = [Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    r, g, b = decode_image(data, LIMIT).getpixel((10, 10))
    assert r > 200 and g < 50 and b < 50


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    decoded = decode_image(encode(img, "JPEG", exif=exif.tobytes(), quality=95), LIMIT)
    assert decoded.size == (20, 40)
    assert decoded.getpixel((10, 5))[0] > 200 and decoded.getpixel((10, 35))[0] < 50  # white on top


def expect_error(data: bytes, status: int, code: str, limit: int = LIMIT) -> ApiError:
    with pytest.raises(ApiError) as err:
        decode_image(data, limit)
    assert (err.value.status, err.value.code) == (status, code), err.value.detail
    return err.value


def test_truncated_and_garbage_bytes_are_400():
    data = encode(rgb_gradient(200, 200), "JPEG")
    expect_error(data[: len(data) // 2], 400, "bad_image")
    png = encode(rgb_gradient(200, 200), "PNG")
    expect_error(png[: len(png) // 2], 400, "bad_image")
    expect_error(b"this is not an image at all", 400, "bad_image")
    expect_error(b"", 400, "bad_image")


def test_pixel_limit_is_checked_before_decoding():
    # A 12000 x 12000 bilevel PNG is tiny compressed but 430 MB decoded: refused from its header alone.
    err = expect_error(encode(Image.new("1", (12000, 12000)), "PNG"), 413, "too_large", limit=LIMIT)
    assert "12000x12000" in err.detail
    # Past PIL's own bomb limit (~179 M pixels): ours is the only limit, whichever is larger.
    expect_error(encode(Image.new("1", (20000, 20000)), "PNG"), 413, "too_large", limit=LIMIT)
    expect_error(encode(rgb_gradient(200, 100), "PNG"), 413, "too_large", limit=19_999)
    # A config allowing more than PIL's limit decodes such a picture (PIL used to refuse it: a 413 saying
    # "over the limit of 200000000 pixels" for 190 M). A 1-bit 19000 x 10000 PNG: 24 MB decoded.
    assert decode_image(encode(Image.new("1", (19000, 10000)), "PNG"), 200_000_000).size == (19000, 10000)


def test_an_image_pil_cannot_decode_is_400_whatever_pil_raises():
    # A 4x4 DDS whose pixel format flags PIL does not know: PIL raises NotImplementedError, which was a 500.
    header = (
        b"DDS "
        + (124).to_bytes(4, "little")
        + (0x1007).to_bytes(4, "little")
        + (4).to_bytes(4, "little")
        + (4).to_bytes(4, "little")
        + bytes(4 * 14)
        + (32).to_bytes(4, "little")
        + (0x80000000).to_bytes(4, "little")
        + b"ZZZZ"
        + bytes(4 * 10)
    )
    expect_error(header + bytes(64), 400, "bad_image")


@pytest.mark.parametrize("content_type", ["image/jpeg", "image/png; charset=x", "IMAGE/WEBP",
                                          "application/octet-stream", None])
def test_image_content_types_pass(content_type):
    check_content_type(content_type)


@pytest.mark.parametrize("content_type", ["text/plain", "application/json", "video/mp4"])
def test_other_content_types_are_415(content_type):
    with pytest.raises(ApiError) as err:
        check_content_type(content_type)
    assert (err.value.status, err.value.code) == (415, "unsupported_media_type")


def photo(w: int, h: int) -> Image.Image:
    """A smooth picture (like a photograph, unlike noise) that survives reduced-scale JPEG decoding."""
    return rgb_gradient(w, h).resize((w, h))


def test_large_jpeg_is_decoded_at_reduced_scale_but_no_smaller_than_twice_the_needed_edge():
    data = encode(photo(1600, 1200), "JPEG", quality=90)
    reduced = decode_image(data, LIMIT, needed_edge=140)
    assert reduced.size == (400, 300)  # 1/4 scale: 1/8 would leave 150 < 2 x 140 on the short side
    full = decode_image(data, LIMIT)
    assert full.size == (1600, 1200)
    same_view = np.asarray(full.resize(reduced.size, Image.BICUBIC), dtype=np.int16)
    assert np.abs(np.asarray(reduced, dtype=np.int16) - same_view).mean() < 2  # the same picture


def test_small_images_are_decoded_whole():
    assert decode_image(encode(photo(300, 200), "JPEG"), LIMIT, needed_edge=140).size == (300, 200)
    assert decode_image(encode(photo(559, 600), "PNG"), LIMIT, needed_edge=140).size == (559, 600)


def textured(w: int, h: int, mode: str) -> Image.Image:
    """Detail a few output pixels across once resized, in `mode` (16-bit: the full range used)."""
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 255, (h // 40, w // 40, 3), dtype=np.uint8)).resize(
        (w, h), Image.BICUBIC)
    if mode == "I;16":
        return Image.fromarray(np.asarray(picture.convert("L"), dtype=np.uint16) * 257)
    return picture.convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "L", "I;16", "RGBA", "P", "1"])
def test_other_large_images_are_reduced_by_a_whole_factor_to_the_same_picture(mode):
    """Any format other than JPEG is averaged down by a whole factor after decoding (before converting where
    the mode allows it), its shorter side kept at least twice the needed edge; the model's crop differs
    from a whole decode's by a fraction of a grey level."""
    img = textured(2400, 1800, mode)
    data = encode(img, "PNG")
    reduced = decode_image(data, LIMIT, needed_edge=248)
    assert reduced.size == (800, 600) and reduced.mode == "RGB"  # by 3: 1800 // (2 x 248)
    resize_crop = ResizeCrop(248, (224, 224), Image.Resampling.BICUBIC)
    crop = np.asarray(resize_crop(reduced), dtype=np.int16)
    whole = np.asarray(resize_crop(decode_image(data, LIMIT)), dtype=np.int16)
    # 1-bit: a dithered picture, whose dots average to greys either way
    assert np.abs(crop - whole).mean() < (2.5 if mode == "1" else 0.75), np.abs(crop - whole).mean()


def test_reduced_decoding_keeps_exif_orientation_and_the_pixel_limit():
    img = photo(1600, 800)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = decode_image(encode(img, "JPEG", exif=exif.tobytes()), LIMIT, needed_edge=100)
    assert rotated.size == (200, 400)  # 1/4 scale, then turned upright
    # The limit counts the pixels the file declares, not the fewer pixels a reduced decode would make.
    with pytest.raises(ApiError) as err:
        decode_image(encode(img, "JPEG"), 1600 * 800 - 1, needed_edge=100)
    assert err.value.status == 413


@pytest.mark.parametrize("mode", ["RGB", "I;16"])
def test_an_opened_image_lets_go_of_its_pixels_once_its_crop_is_made(mode):
    """The crop is made in a decoding thread: the full-size pixels go there and then, not when the request
    is answered (its pixel budget is given back as decoding ends)."""
    from server.decode.crops import crop_bytes
    from server.decode.imaging import open_image

    decoder = (64, ResizeCrop(64, (64, 64), Image.Resampling.BICUBIC))
    data = encode(textured(900, 700, mode), "PNG")
    opened = open_image(data, LIMIT, needed_edge=64)
    expected = crop_bytes(decoder, data, LIMIT)
    assert crop_bytes(decoder, opened, LIMIT) == expected and len(expected) == 64 * 64 * 3
    with pytest.raises(ValueError, match="closed image"):
        opened.getpixel((0, 0))
