"""Prompt sources for the three criteria: built-in generators, the small built-in set, and user files.

- semantics: compositional prompts in the T2I-CompBench categories (color, shape, texture, spatial, non_spatial,
  complex) from attribute/relation templates;
- text_rendering: CommonText-style prompts ("A {subject} holding a sign reading '{word}'") from subject and word lists;
- image_quality: user caption files (e.g. LAION-Aesthetics >= 6.5) and a small built-in set of captions.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterator
from pathlib import Path

from service.errors import ConfigError
from trainer.config import SourceFile

BUILTIN_DIR = Path(__file__).parent / "builtin"

COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "pink", "black", "white", "brown", "gray", "gold"]
SHAPES = ["round", "square", "triangular", "oval", "rectangular", "hexagonal", "cylindrical", "heart-shaped"]
TEXTURES = ["wooden", "metallic", "glass", "fluffy", "leather", "plastic", "rubber", "fabric", "stone", "ceramic"]
OBJECTS = ["car", "bench", "cup", "book", "chair", "lamp", "vase", "bowl", "clock", "bag", "hat", "bird", "apple",
           "table", "bottle", "plate", "pillow", "balloon", "box", "flower", "dog", "cat", "horse", "boat", "kite"]
RELATIONS = ["on the left of", "on the right of", "on top of", "under", "next to", "behind", "in front of", "near"]
ACTIONS = ["a man is holding", "a woman is painting", "a child is chasing", "a dog is carrying", "a cat is watching",
           "a robot is repairing", "a chef is cooking", "a girl is reading"]
PLACES = ["in a sunny park", "on a busy street", "in a quiet library", "at the beach", "in a snowy forest",
          "in a modern kitchen", "on a wooden table", "under a starry sky"]

SUBJECTS = ["man", "woman", "child", "robot", "astronaut", "chef", "teacher", "dog", "cat", "bear", "penguin",
            "wizard", "knight", "farmer", "student", "doctor", "pirate", "clown", "monkey", "owl", "fox", "panda",
            "baker", "painter", "sailor", "firefighter", "scientist", "musician", "dragon", "ghost"]
SIGN_TEMPLATES = [
    "A {subject} holding a sign reading '{word}'",
    "A {subject} holding a sign that says '{word}'",
    "A poster with the word '{word}' next to a {subject}",
    "A {subject} standing under a neon sign reading '{word}'",
    "A t-shirt with '{word}' printed on it, worn by a {subject}",
]
WORDS = """open closed sale hello welcome love peace hope dream coffee pizza books music art exit stop go slow
danger sun moon star rain snow cloud happy smile party yes no maybe now later home cafe bakery shop market
free fresh hot cold new old big small fast win lose play read write learn think build code data model train
relax focus enjoy explore create share vote help thanks sorry tasty magic power energy ocean forest river city
""".split()


def generate_semantics(count: int, seed: int) -> list[tuple[str, str]]:
    """(prompt, category) pairs, spread evenly over the six categories."""
    rng = random.Random(seed)
    makers = {
        "color": lambda: f"a {rng.choice(COLORS)} {rng.choice(OBJECTS)} and a {rng.choice(COLORS)} {rng.choice(OBJECTS)}",
        "shape": lambda: f"a {rng.choice(SHAPES)} {rng.choice(OBJECTS)} and a {rng.choice(SHAPES)} {rng.choice(OBJECTS)}",
        "texture": lambda: f"a {rng.choice(TEXTURES)} {rng.choice(OBJECTS)} and a {rng.choice(TEXTURES)} "
                           f"{rng.choice(OBJECTS)}",
        "spatial": lambda: f"a {rng.choice(OBJECTS)} {rng.choice(RELATIONS)} a {rng.choice(OBJECTS)}",
        "non_spatial": lambda: f"{rng.choice(ACTIONS)} a {rng.choice(OBJECTS)} {rng.choice(PLACES)}",
        "complex": lambda: f"a {rng.choice(COLORS)} {rng.choice(TEXTURES)} {rng.choice(OBJECTS)} "
                           f"{rng.choice(RELATIONS)} a {rng.choice(SHAPES)} {rng.choice(COLORS)} {rng.choice(OBJECTS)}",
    }
    names = list(makers)
    return [(makers[names[i % len(names)]](), names[i % len(names)]) for i in range(count)]


def generate_text_rendering(count: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [
        (rng.choice(SIGN_TEMPLATES).format(subject=rng.choice(SUBJECTS), word=rng.choice(WORDS)), "sign")
        for _ in range(count)
    ]


def builtin(criterion: str) -> list[tuple[str, str]]:
    path = BUILTIN_DIR / f"{criterion}.txt"
    if not path.exists():
        return []
    return [(line.strip(), "builtin") for line in path.read_text().splitlines() if line.strip()]


def read_file(source: SourceFile) -> Iterator[tuple[str, str, float | None]]:
    """(prompt, category, score) rows of a user file; a missing or unreadable file stops with its name."""
    path = Path(source.path).expanduser()
    if not path.is_file():
        raise ConfigError(f"prompt file {str(path)!r} does not exist or is not a file", field="files.path")
    category = source.category or path.stem.removesuffix("_train").removesuffix("_val")
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            for line in path.read_text().splitlines():
                if line.strip():
                    yield line.strip(), category, None
            return
        if suffix == ".jsonl":
            rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
        elif suffix == ".csv":
            rows = csv.DictReader(path.read_text().splitlines())
        elif suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise ConfigError(f"reading {str(path)!r} needs pyarrow: pip install 't2i-slim[parquet]'",
                                  field="files.path") from None
            rows = iter(pq.read_table(path).to_pylist())
        else:
            raise ConfigError(f"prompt file {str(path)!r}: unknown format {suffix!r} (txt, jsonl, csv, parquet)",
                              field="files.path")
        for n, row in enumerate(rows, start=1):
            if source.column not in row:
                raise ConfigError(f"{str(path)!r} row {n} has no column {source.column!r} "
                                  f"(columns: {', '.join(row)})", field="files.column")
            score = None
            if source.score_column is not None:
                if source.score_column not in row:
                    raise ConfigError(f"{str(path)!r} row {n} has no score column {source.score_column!r}",
                                      field="files.score_column")
                score = float(row[source.score_column])
            yield str(row[source.column]).strip(), category, score
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as exc:
        raise ConfigError(f"prompt file {str(path)!r} is unreadable: {exc}", field="files.path") from None
