"""Control images for ControlNets: decoding, checking, and the built-in preprocessors that need no model.

The API decodes and checks an upload here (PIL only, no torch) so that a bad image is refused with 413/422 before a
job exists; the worker turns the stored bytes into the image the ControlNet was trained on (`canny` edges, or the
given map as is for depth and pose). The trainer uses the same `canny` so that training and serving agree.
"""

from __future__ import annotations

import io
import warnings
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from service.errors import PayloadTooLargeError, ValidationError

Preprocess = Literal["auto", "canny", "none"]
MAX_CONTROL_SIDE = 4096
CANNY_LOW, CANNY_HIGH = 100, 200


def decode_image(data: bytes, *, field: str, max_bytes: int, max_side: int = MAX_CONTROL_SIDE) -> Image.Image:
    """The image in `data`, fully decoded, as RGB. 413 over `max_bytes`; 422 when it is not a decodable image or a
    side exceeds `max_side` (checked from the header, before the pixels are decoded: no decompression bomb)."""
    if len(data) > max_bytes:
        raise PayloadTooLargeError(f"`{field}` is {len(data)} bytes; the limit is {max_bytes}", field=field)
    if not data:
        raise ValidationError(f"`{field}` is empty", field=field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if max(image.size) > max_side:
                raise ValidationError(f"`{field}` is {image.width}x{image.height}; each side must be at most "
                                      f"{max_side} pixels", field=field)
            image.load()
    except ValidationError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as exc:
        raise ValidationError(f"`{field}` is not a decodable image (PNG, JPEG or WebP): {exc}", field=field) from None
    return image.convert("RGB")


def canny(image: Image.Image, low: int = CANNY_LOW, high: int = CANNY_HIGH) -> Image.Image:
    """OpenCV's Canny edges (white on black), as the 3-channel image canny ControlNets are trained on."""
    import cv2

    edges = cv2.Canny(np.asarray(image.convert("RGB")), low, high)
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))


def prepare(image: Image.Image, preprocess: Preprocess, condition: str, *, low: int = CANNY_LOW,
            high: int = CANNY_HIGH) -> Image.Image:
    """The control image the ControlNet sees. `auto` runs the preprocessor matching the ControlNet's condition
    (canny for a canny model) and passes any other map (depth, pose, ...) through as given."""
    if preprocess == "canny" or (preprocess == "auto" and condition == "canny"):
        return canny(image, low, high)
    return image.convert("RGB")
