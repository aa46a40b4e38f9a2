"""Image comparisons with tolerances (outputs are bit-identical only at equal thread counts)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def pixel_diff(a: Image.Image, b: Image.Image) -> tuple[float, float]:
    """(mean, max) absolute difference in 0..255 units."""
    x = np.asarray(a.convert("RGB"), dtype=np.float64)
    y = np.asarray(b.convert("RGB"), dtype=np.float64)
    assert x.shape == y.shape, f"image shapes differ: {x.shape} vs {y.shape}"
    d = np.abs(x - y)
    return float(d.mean()), float(d.max())
