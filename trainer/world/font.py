"""A fixed 3x5 bitmap font for the lower-case letters drawn on signs (and read back by the evaluator)."""

from __future__ import annotations

import numpy as np

_ROWS = {
    "a": ["111", "101", "111", "101", "101"], "b": ["110", "101", "110", "101", "110"],
    "c": ["111", "100", "100", "100", "111"], "d": ["110", "101", "101", "101", "110"],
    "e": ["111", "100", "110", "100", "111"], "f": ["111", "100", "110", "100", "100"],
    "g": ["111", "100", "101", "101", "111"], "h": ["101", "101", "111", "101", "101"],
    "i": ["111", "010", "010", "010", "111"], "j": ["001", "001", "001", "101", "111"],
    "k": ["101", "110", "100", "110", "101"], "l": ["100", "100", "100", "100", "111"],
    "m": ["101", "111", "111", "101", "101"], "n": ["110", "101", "101", "101", "101"],
    "o": ["111", "101", "101", "101", "111"], "p": ["111", "101", "111", "100", "100"],
    "q": ["111", "101", "101", "111", "001"], "r": ["110", "101", "110", "101", "101"],
    "s": ["111", "100", "111", "001", "111"], "t": ["111", "010", "010", "010", "010"],
    "u": ["101", "101", "101", "101", "111"], "v": ["101", "101", "101", "101", "010"],
    "w": ["101", "101", "111", "111", "101"], "x": ["101", "101", "010", "101", "101"],
    "y": ["101", "101", "010", "010", "010"], "z": ["111", "001", "010", "100", "111"],
}
GLYPHS: dict[str, np.ndarray] = {
    ch: np.array([[c == "1" for c in row] for row in rows], dtype=bool) for ch, rows in _ROWS.items()
}
GLYPH_W, GLYPH_H = 3, 5


def render_word(word: str, scale: int) -> np.ndarray:
    """A boolean mask of the word, letters `scale` pixels per font pixel, one font pixel apart."""
    cols = []
    for i, ch in enumerate(word):
        if i:
            cols.append(np.zeros((GLYPH_H, 1), dtype=bool))
        cols.append(GLYPHS[ch])
    mask = np.concatenate(cols, axis=1)
    return mask.repeat(scale, axis=0).repeat(scale, axis=1)


def read_glyph(cell: np.ndarray) -> str:
    """The letter whose bitmap is nearest (Hamming) to a 5x3 boolean cell."""
    return min(GLYPHS, key=lambda ch: int(np.sum(GLYPHS[ch] != cell)))
