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

KIND_CRITERIA = {"single": "semantics", "count": "semantics", "relation": "semantics", "text": "text_rendering"}


def write_prompts(out_dir: str | Path, train: int = 4000, validation: int = 200, seed: int = 0) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, n, split_seed in (("train", train, seed), ("validation", validation, seed + 5_000)):
        rng = random.Random(split_seed)
        rows, seen = [], set()
        while len(rows) < n:
            scene, text = training_scene(rng)  # never a held-out combination
            if text in seen:
                continue
            seen.add(text)
            criterion = KIND_CRITERIA[scene.kind]
            if scene.kind == "single" and scene.truth["size"] == "large":
                criterion = "image_quality"
            rows.append({"prompt": text, "criterion": criterion, "source": "world", "category": scene.kind})
        with open(out / f"{split}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        counts[split] = dict(Counter(r["criterion"] for r in rows))
    manifest = {"counts": counts, "source": "miniature world", "seed": seed}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest
