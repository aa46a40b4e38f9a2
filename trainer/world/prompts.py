"""The miniature world's prompt set in the trainer's dataset format: `t2i world prompts -o DIR`.

Criteria in miniature: semantics (single, count and relation scenes), text rendering (signs) and image quality
(single scenes of large shapes: clean, centred drawings).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

from trainer.world.captions import training_scene
from trainer.world.scene import KINDS

KIND_CRITERIA = {"single": "semantics", "count": "semantics", "relation": "semantics", "text": "text_rendering"}


def write_prompts(out_dir: str | Path, train: int = 4000, validation: int = 200, seed: int = 0,
                  even_kinds: bool = False) -> dict:
    """Distinct captions as training draws them, kinds at random. The world has few distinct sign captions (about 60
    outside the held-out combinations), so sign prompts come out about 1% of the set rather than a quarter.
    `even_kinds` gives each kind a quarter of the rows, repeating a kind's captions once its distinct ones run out
    (the paper's set has 50 K text-rendering prompts beside about 100 K others)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts, distinct = {}, {}
    for split, n, split_seed in (("train", train, seed), ("validation", validation, seed + 5_000)):
        rng = random.Random(split_seed)
        rows, seen, misses = [], set(), 0
        while len(rows) < n:
            kind = KINDS[len(rows) % len(KINDS)] if even_kinds else None
            scene, text = training_scene(rng, kind)  # never a held-out combination
            if text in seen and (not even_kinds or misses < 200):
                misses += 1
                continue
            seen.add(text)
            misses = 0
            criterion = KIND_CRITERIA[scene.kind]
            if scene.kind == "single" and scene.truth["size"] == "large":
                criterion = "image_quality"
            rows.append({"prompt": text, "criterion": criterion, "source": "world", "category": scene.kind})
        with open(out / f"{split}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        counts[split] = dict(Counter(r["criterion"] for r in rows))
        distinct[split] = dict(Counter(r["criterion"] for r in {r["prompt"]: r for r in rows}.values()))
    manifest = {"counts": counts, "distinct": distinct, "even_kinds": even_kinds, "source": "miniature world",
                "seed": seed}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest
