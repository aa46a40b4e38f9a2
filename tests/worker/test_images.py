"""The bytes a job stores for its images: PNG through libpng is lossless for every mode a pipeline can return, at
every zlib level, with one row filter; WebP and JPEG keep their formats."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from service.worker.main import encode_image


def picture(mode: str) -> Image.Image:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:48, 0:80]
    rgb = np.stack([x * 3, y * 5, (x + y) * 2], -1) + rng.integers(0, 9, (48, 80, 3))
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    if mode == "RGBA":
        image.putalpha(Image.fromarray(np.clip(x * 3, 0, 255).astype(np.uint8)))
    return image if mode in ("RGB", "RGBA") else image.convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "LA", "I;16"])
@pytest.mark.parametrize("level", [0, 1, 9])
def test_png_is_lossless_for_every_mode_and_level(mode, level):
    image = picture(mode)
    data = encode_image(image, "png", png_compress_level=level)
    back = Image.open(io.BytesIO(data))
    assert back.format == "PNG" and back.size == image.size
    # what a PNG of this image must hold: the same pixels, in its own mode or the RGB(A) it was widened to
    expected = image if image.mode in ("RGB", "RGBA", "L") else image.convert("RGBA" if "A" in image.getbands()
                                                                               else "RGB")
    assert back.mode == expected.mode
    assert np.array_equal(np.asarray(back), np.asarray(expected))


def test_higher_png_levels_make_no_larger_files_and_other_formats_keep_theirs():
    image = picture("RGB")
    sizes = [len(encode_image(image, "png", png_compress_level=level)) for level in (0, 9)]
    assert sizes[1] < sizes[0]
    for fmt, name in (("webp", "WEBP"), ("jpeg", "JPEG")):
        assert Image.open(io.BytesIO(encode_image(image, fmt))).format == name


def row_filters(data: bytes, width: int, channels: int) -> list[int]:
    """The filter type byte of each row of an 8-bit, non-interlaced PNG (its IDAT chunks, inflated)."""
    pos, idat = 8, b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + length]
        pos += 12 + length
    rows = zlib.decompress(idat)
    stride = 1 + width * channels
    return [rows[i] for i in range(0, len(rows), stride)]


def test_png_rows_are_filtered_by_up_alone_and_stored_unfiltered_at_level_0():
    image = picture("RGB")
    up, none = 2, 0
    assert set(row_filters(encode_image(image, "png", png_compress_level=1), 80, 3)[1:]) == {up}
    assert set(row_filters(encode_image(image, "png", png_compress_level=0), 80, 3)) == {none}
