"""Scenes of the miniature world and their exact rendering (numpy, 32x32 RGB on black).

Four kinds, each with its ground truth:
- single:   one shape of a colour and size at a position ("a large red circle on the left")
- count:    one to three small shapes of one colour and shape ("two green triangles")
- relation: two shapes and how they sit ("a red circle left of a blue square")
- text:     a 2-4 letter word on a light sign ("a sign reading 'cat'")
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

from trainer.world.font import render_word

SIZE = 32
PALETTE = {
    "red": (255, 0, 0), "green": (0, 200, 0), "blue": (40, 80, 255),
    "yellow": (255, 230, 0), "purple": (200, 0, 220), "cyan": (0, 220, 220),
}
SIGN_COLOR = (210, 210, 210)
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"left": (8, 16), "right": (24, 16), "top": (16, 8), "bottom": (16, 24), "centre": (16, 16)}
OBJECT_SIZES = {"small": 8, "large": 12}
RELATIONS = ("left of", "right of", "above", "below")
WORDS = ("hi", "go", "no", "up", "ok", "yes", "sun", "cat", "dog", "top", "win", "fix", "bus", "zip", "joy",
         "sky", "box", "art", "fly", "red", "taxi", "cozy", "jump", "lazy", "quiz", "pity", "six")
KINDS = ("single", "count", "relation", "text")


@dataclass(frozen=True)
class Thing:
    shape: str
    color: str
    center: tuple[int, int]  # (x, y) pixel centre
    size: int  # bounding box side in pixels


@dataclass(frozen=True)
class Scene:
    kind: str
    things: tuple[Thing, ...] = ()
    word: str | None = None
    # the ground truth the caption states
    truth: dict = field(default_factory=dict, hash=False, compare=False)


def _mask(shape: str, center: tuple[int, int], size: int) -> np.ndarray:
    y, x = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    cx, cy, r = center[0], center[1], size / 2
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    if shape == "square":
        return (np.abs(x - cx) <= r) & (np.abs(y - cy) <= r)
    # an upward triangle: apex at the top centre, base along the bottom of the box
    top, bottom = cy - r, cy + r
    half_width = (y - top) / (bottom - top) * r
    return (y >= top) & (y <= bottom) & (np.abs(x - cx) <= half_width)


def render(scene: Scene) -> np.ndarray:
    image = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    for thing in scene.things:
        image[_mask(thing.shape, thing.center, thing.size)] = PALETTE[thing.color]
    if scene.word:
        letters = render_word(scene.word, scale=2)
        h, w = letters.shape
        sign_h, sign_w = h + 4, min(w + 4, SIZE)
        y0, x0 = (SIZE - sign_h) // 2, (SIZE - sign_w) // 2
        image[y0:y0 + sign_h, x0:x0 + sign_w] = SIGN_COLOR
        ly, lx = y0 + 2, (SIZE - w) // 2
        region = image[ly:ly + h, lx:lx + w]
        region[letters] = 0
    return image


def sample(rng: random.Random, kind: str | None = None) -> Scene:
    kind = kind or rng.choice(KINDS)
    jitter = lambda: rng.randint(-2, 2)  # noqa: E731
    if kind == "single":
        shape, color = rng.choice(SHAPES), rng.choice(list(PALETTE))
        size_name, position = rng.choice(list(OBJECT_SIZES)), rng.choice(list(POSITIONS))
        ax, ay = POSITIONS[position]
        thing = Thing(shape, color, (ax + jitter(), ay + jitter()), OBJECT_SIZES[size_name])
        return Scene(kind, (thing,), truth={"shape": shape, "color": color, "size": size_name,
                                            "position": position})
    if kind == "count":
        shape, color, count = rng.choice(SHAPES), rng.choice(list(PALETTE)), rng.randint(1, 3)
        slots = rng.sample([(x, y) for x in (6, 16, 26) for y in (6, 16, 26)], count)
        things = tuple(Thing(shape, color, (x + rng.randint(-1, 1), y + rng.randint(-1, 1)), 6) for x, y in slots)
        return Scene(kind, things, truth={"shape": shape, "color": color, "count": count})
    if kind == "relation":
        (c1, c2) = rng.sample(list(PALETTE), 2)
        s1, s2 = rng.choice(SHAPES), rng.choice(SHAPES)
        relation = rng.choice(RELATIONS)
        near, far, mid = 9, 23, 16
        first, second = {
            "left of": ((near, mid), (far, mid)), "right of": ((far, mid), (near, mid)),
            "above": ((mid, near), (mid, far)), "below": ((mid, far), (mid, near)),
        }[relation]
        things = (Thing(s1, c1, (first[0] + jitter(), first[1] + jitter()), 10),
                  Thing(s2, c2, (second[0] + jitter(), second[1] + jitter()), 10))
        return Scene(kind, things, truth={"shape": s1, "color": c1, "shape2": s2, "color2": c2,
                                          "relation": relation})
    word = rng.choice(WORDS)
    return Scene("text", (), word=word, truth={"word": word})
