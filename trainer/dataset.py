"""`t2i dataset build CONFIG -o DIR`: the training prompt set from three criteria, with a manifest.

Writes DIR/train.jsonl and DIR/validation.jsonl (one {"prompt", "criterion", "source", "category"} per line) and
DIR/manifest.json (counts per criterion and source, filter and dedup statistics, the split seed). Deterministic: the
same config gives the same files.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

from service.errors import ConfigError
from trainer import prompts
from trainer.config import CRITERIA, DatasetConfig


def _teacher_tokenizer(config: DatasetConfig):
    from service.models.encoder import load_tokenizer
    from service.models.registry import Registry, Source, load_registry

    if config.tokenizer:
        return load_tokenizer(Source(source=config.tokenizer), "tokenizer")
    registry = Registry.from_file(config.models_file) if config.models_file else load_registry()
    if registry.teacher is None:
        raise ConfigError("the models file registers no teacher; set `tokenizer`", field="tokenizer")
    return load_tokenizer(registry.teacher.tokenizer_source, f"encoder {registry.teacher.name!r}")


def build(config: DatasetConfig, out_dir: str | Path, tokenizer=None) -> dict:
    out_dir = Path(out_dir)
    stats: dict = {"read": Counter(), "below_min_score": Counter(), "too_long": Counter(), "duplicates": Counter(),
                   "empty": Counter()}

    # 1. Collect every candidate per criterion, with where it came from.
    candidates: dict[str, list[dict]] = {c: [] for c in CRITERIA}
    for criterion in CRITERIA:
        spec = getattr(config, criterion)
        rows: list[tuple[str, str, str]] = []
        if spec.builtin:
            rows += [(p, c, "builtin") for p, c in prompts.builtin(criterion)]
        if spec.generated:
            generator = {"semantics": prompts.generate_semantics, "text_rendering": prompts.generate_text_rendering}
            if criterion not in generator:
                raise ConfigError(f"`{criterion}.generated`: no built-in generator for {criterion}; use files",
                                  field=f"{criterion}.generated")
            rows += [(p, c, "generated") for p, c in generator[criterion](spec.generated, config.seed)]
        for source in spec.files:
            for prompt, category, score in prompts.read_file(source):
                stats["read"][criterion] += 1
                if source.min_score is not None and (score is None or score < source.min_score):
                    stats["below_min_score"][criterion] += 1
                    continue
                rows.append((prompt, category, Path(source.path).name))
        for prompt, category, source in rows:
            candidates[criterion].append({"prompt": prompt, "criterion": criterion, "source": source,
                                          "category": category})

    # 2. Clean, filter by teacher token length, and dedup across criteria (first occurrence wins).
    tokenizer = tokenizer or _teacher_tokenizer(config)
    seen: set[str] = set()
    kept: dict[str, list[dict]] = {c: [] for c in CRITERIA}
    for criterion in CRITERIA:
        for row in candidates[criterion]:
            row["prompt"] = re.sub(r"\s+", " ", row["prompt"]).strip()
            if not row["prompt"]:
                stats["empty"][criterion] += 1
                continue
            if len(tokenizer(row["prompt"]).input_ids) > config.max_tokens:
                stats["too_long"][criterion] += 1
                continue
            key = row["prompt"].lower()
            if key in seen:
                stats["duplicates"][criterion] += 1
                continue
            seen.add(key)
            kept[criterion].append(row)
    if not any(kept.values()):
        raise ConfigError("the prompt set is empty after filtering (check the files, `min_score` and `max_tokens`)")

    # 3. Mix by weight (only when a total is asked for), then split each criterion deterministically.
    rng = random.Random(config.seed)
    weights = {c: getattr(config, c).weight for c in CRITERIA if kept[c]}
    shortfall = {}
    if config.total is not None:
        norm = sum(weights.values())
        for criterion, weight in weights.items():
            want = round(config.total * weight / norm)
            if want < len(kept[criterion]):
                kept[criterion] = rng.sample(kept[criterion], want)
            elif want > len(kept[criterion]):
                shortfall[criterion] = want - len(kept[criterion])
    train, validation = [], []
    for criterion in CRITERIA:
        rows = sorted(kept[criterion], key=lambda r: r["prompt"])
        rng.shuffle(rows)
        n_val = round(len(rows) * config.validation_fraction)
        if config.validation_fraction > 0 and len(rows) >= 2:
            n_val = max(n_val, 1)
        validation += rows[:n_val]
        train += rows[n_val:]
    rng.shuffle(train)

    # 4. Write the splits and the manifest.
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("validation", validation)):
        with open(out_dir / f"{name}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    manifest = {
        "counts": {split: {c: sum(r["criterion"] == c for r in rows) for c in CRITERIA}
                   for split, rows in (("train", train), ("validation", validation))},
        "sources": {c: dict(Counter(r["source"] for r in kept[c])) for c in CRITERIA},
        "categories": {c: dict(Counter(r["category"] for r in kept[c])) for c in CRITERIA},
        "filtered": {k: dict(v) for k, v in stats.items()},
        "shortfall": shortfall,
        "max_tokens": config.max_tokens,
        "split_seed": config.seed,
        "validation_fraction": config.validation_fraction,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def read_split(data_dir: str | Path, split: str) -> list[dict]:
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise ConfigError(f"{str(path)!r} does not exist: build the prompt set with `t2i dataset build`",
                          field="data")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ConfigError(f"{str(path)!r} is empty", field="data")
    return rows
