"""The exact evaluator: reads an image of the miniature world and scores it against what its prompt states.

Pixel analysis only: colour segmentation against the palette, connected components, shape by bounding-box fill
ratio, position from the bounding-box centre (a triangle's centroid sits low), count of components, relations from
centres, and glyph matching for the word on a sign. Validated on ground-truth renders (tests require >= 99%).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from trainer.world.font import GLYPH_H, GLYPH_W, read_glyph
from trainer.world.scene import PALETTE, POSITIONS, SIGN_COLOR

_COLORS = list(PALETTE) + ["sign"]
_RGB = np.array(list(PALETTE.values()) + [SIGN_COLOR], dtype=np.float32)
MIN_AREA = 6


@dataclass
class Blob:
    color: str
    area: int
    box: tuple[int, int, int, int]  # y0, x0, y1, x1 (inclusive)
    mask: np.ndarray

    @property
    def center(self) -> tuple[float, float]:
        y0, x0, y1, x1 = self.box
        return (x0 + x1) / 2 + 0.5, (y0 + y1) / 2 + 0.5

    @property
    def shape(self) -> str:
        y0, x0, y1, x1 = self.box
        fill = self.area / ((y1 - y0 + 1) * (x1 - x0 + 1))
        m = self.mask
        tl, tr, bl, br = m[y0, x0], m[y0, x1], m[y1, x0], m[y1, x1]
        if tl and tr and bl and br:
            return "square"
        if bl and br and not (tl or tr):
            return "triangle"  # a full base and an apex: an upward triangle
        return "square" if fill >= 0.92 else "circle" if fill >= 0.62 else "triangle"

    @property
    def position(self) -> str:
        cx, cy = self.center
        return min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask (a flood fill; images are 32x32)."""
    seen = np.zeros_like(mask)
    out = []
    h, w = mask.shape
    for sy, sx in zip(*np.nonzero(mask)):
        if seen[sy, sx]:
            continue
        comp = np.zeros_like(mask)
        stack = [(sy, sx)]
        seen[sy, sx] = True
        while stack:
            y, x = stack.pop()
            comp[y, x] = True
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        out.append(comp)
    return out


def blobs(image: np.ndarray) -> list[Blob]:
    """Foreground components by palette colour, largest first."""
    pixels = image.astype(np.float32)
    foreground = pixels.max(axis=-1) > 100
    nearest = np.argmin(((pixels[:, :, None, :] - _RGB[None, None]) ** 2).sum(-1), axis=-1)
    found = []
    for index, color in enumerate(_COLORS):
        for comp in _components(foreground & (nearest == index)):
            area = int(comp.sum())
            if area < MIN_AREA:
                continue
            ys, xs = np.nonzero(comp)
            found.append(Blob(color, area, (ys.min(), xs.min(), ys.max(), xs.max()), comp))
    return sorted(found, key=lambda b: -b.area)


def read_sign(image: np.ndarray, sign: Blob) -> str:
    """The word on a sign: dark pixels inside its box, cut into letter cells at blank columns, matched to glyphs."""
    y0, x0, y1, x1 = sign.box
    inner = image[y0:y1 + 1, x0:x1 + 1].astype(np.float32).max(axis=-1) < 100
    rows, cols = np.nonzero(inner.any(axis=1))[0], np.nonzero(inner.any(axis=0))[0]
    if len(rows) == 0:
        return ""
    ink = inner[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    scale = max(1, round(ink.shape[0] / GLYPH_H))
    cell_w = GLYPH_W * scale
    word, x = "", 0
    while x < ink.shape[1]:
        if not ink[:, x].any():
            x += 1
            continue
        cell = ink[:, x:x + cell_w]
        small = np.zeros((GLYPH_H, GLYPH_W), dtype=bool)
        for gy in range(GLYPH_H):
            for gx in range(GLYPH_W):
                block = cell[gy * scale:(gy + 1) * scale, gx * scale:(gx + 1) * scale]
                small[gy, gx] = block.size > 0 and block.mean() >= 0.5
        word += read_glyph(small)
        x += cell_w
    return word


def score(image: np.ndarray, truth: dict) -> dict[str, bool]:
    """Per attribute the prompt states: whether the image shows it."""
    found = blobs(image)
    kind = truth["kind"]
    if kind == "text":
        signs = [b for b in found if b.color == "sign"]
        return {"text": bool(signs) and read_sign(image, signs[0]) == truth["word"]}
    objects = [b for b in found if b.color != "sign"]
    result: dict[str, bool] = {}
    if kind == "single":
        main = objects[0] if objects else None
        of_color = [b for b in objects if b.color == truth["color"]]
        result["color"] = main is not None and main.color == truth["color"]
        result["shape"] = bool(of_color) and of_color[0].shape == truth["shape"]
        if "position" in truth:
            result["position"] = bool(of_color) and of_color[0].position == truth["position"]
        if "size" in truth:
            big = bool(of_color) and max(of_color[0].box[2] - of_color[0].box[0],
                                         of_color[0].box[3] - of_color[0].box[1]) + 1 >= 10
            result["size"] = bool(big == (truth["size"] == "large"))
        return result
    if kind == "count":
        of_color = [b for b in objects if b.color == truth["color"]]
        result["color"] = bool(of_color)
        result["shape"] = bool(of_color) and all(b.shape == truth["shape"] for b in of_color)
        result["count"] = len(of_color) == truth["count"]
        return result
    first = [b for b in objects if b.color == truth["color"]]
    second = [b for b in objects if b.color == truth["color2"]]
    result["color"] = bool(first) and bool(second)
    result["shape"] = result["color"] and first[0].shape == truth["shape"] and second[0].shape == truth["shape2"]
    if result["color"]:
        (ax, ay), (bx, by) = first[0].center, second[0].center
        result["relation"] = bool({"left of": ax < bx - 3, "right of": ax > bx + 3, "above": ay < by - 3,
                                   "below": ay > by + 3}[truth["relation"]])
    else:
        result["relation"] = False
    return result


def accuracy(results: list[dict[str, bool]]) -> dict[str, float]:
    """Mean correctness per attribute over many scored images."""
    totals: dict[str, list[bool]] = defaultdict(list)
    for r in results:
        for key, ok in r.items():
            totals[key].append(ok)
    return {key: float(np.mean(v)) for key, v in sorted(totals.items())}
