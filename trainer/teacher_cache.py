"""`t2i distill cache-teacher CONFIG`: the teacher's embeddings of every prompt, once, in sharded safetensors.

Training then never needs the teacher encoder in memory (T5-XXL is 9.5 GB in bf16). Each shard holds, for a run of
prompts: `t5` (n, max_sequence_length, width), `pooled` (n, pooled width) and, for SD3, `clip` (n, 77, clip width),
plus `index` (their rows in the split). `cache.json` says what made it; a cache made for another teacher, pipeline,
sequence length or prompt set is refused by name. Shards are read lazily (memory-mapped slices).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from service.errors import ConfigError
from trainer.config import DistillConfig, to_yaml

SHARD_SIZE = 512


def prompts_fingerprint(rows: list[dict]) -> str:
    return hashlib.sha256("\n".join(r["prompt"] for r in rows).encode()).hexdigest()[:16]


def build_cache(config: DistillConfig, components, splits: dict[str, list[dict]], out_dir: str | Path,
                batch_size: int = 16, show_progress: bool = True) -> Path:
    """Encode every prompt of every split with the teacher (T5 and the pipeline's CLIP) and write the shards."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = {"pipeline": config.pipeline, "teacher": components.teacher.name,
                "max_sequence_length": config.max_sequence_length, "splits": {}, "config": to_yaml(config)}
    total = sum(len(rows) for rows in splits.values())
    bar = tqdm(total=total, desc="teacher cache", unit="prompt", disable=not show_progress)
    for split, rows in splits.items():
        shards = []
        for start in range(0, len(rows), SHARD_SIZE):
            chunk = rows[start:start + SHARD_SIZE]
            parts: dict[str, list[torch.Tensor]] = {"t5": [], "pooled": [], "clip": []}
            for b in range(0, len(chunk), batch_size):
                prompts = [r["prompt"] for r in chunk[b:b + batch_size]]
                t5, clip, pooled = components.teacher_conditioning(prompts)
                parts["t5"].append(t5.cpu())
                parts["pooled"].append(pooled.cpu())
                if clip is not None:
                    parts["clip"].append(clip.cpu())
                bar.update(len(prompts))
            tensors = {k: torch.cat(v).contiguous() for k, v in parts.items() if v}
            tensors["index"] = torch.arange(start, start + len(chunk), dtype=torch.int64)
            name = f"{split}-{len(shards):05d}.safetensors"
            save_file(tensors, out_dir / name, metadata={"format": "pt"})
            shards.append(name)
        manifest["splits"][split] = {"shards": shards, "count": len(rows), "prompts": prompts_fingerprint(rows)}
    bar.close()
    (out_dir / "cache.json").write_text(json.dumps(manifest, indent=2))
    return out_dir


class TeacherCache:
    """Reads cached teacher conditioning by row index, shard slices loaded on demand."""

    def __init__(self, cache_dir: str | Path, config: DistillConfig, teacher_name: str,
                 splits: dict[str, list[dict]]):
        self.dir = Path(cache_dir)
        path = self.dir / "cache.json"
        if not path.is_file():
            raise ConfigError(f"teacher cache {str(self.dir)!r} has no cache.json: run `t2i distill cache-teacher`",
                              field="teacher_cache")
        self.manifest = json.loads(path.read_text())
        expected = {"pipeline": config.pipeline, "teacher": teacher_name,
                    "max_sequence_length": config.max_sequence_length}
        for key, value in expected.items():
            if self.manifest[key] != value:
                raise ConfigError(f"teacher cache {str(self.dir)!r} was made with {key}={self.manifest[key]!r}, "
                                  f"this run uses {value!r}", field="teacher_cache")
        for split, rows in splits.items():
            entry = self.manifest["splits"].get(split)
            if entry is None or entry["prompts"] != prompts_fingerprint(rows):
                raise ConfigError(f"teacher cache {str(self.dir)!r} does not match the {split} prompts of "
                                  f"{config.data!r}: rebuild it", field="teacher_cache")

    def get(self, split: str, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(t5, clip or None, pooled) for these rows of the split, in order."""
        shards = self.manifest["splits"][split]["shards"]
        by_shard: dict[int, list[tuple[int, int]]] = {}
        for position, i in enumerate(indices):
            shard, row = divmod(i, SHARD_SIZE)
            by_shard.setdefault(shard, []).append((position, row))
        rows: dict[str, list[torch.Tensor | None]] = {k: [None] * len(indices) for k in ("t5", "clip", "pooled")}
        for shard, wanted in by_shard.items():  # each shard opened once per call
            with safe_open(self.dir / shards[shard], framework="pt") as f:
                for key in [k for k in rows if k in f.keys()]:
                    tensor = f.get_slice(key)
                    for position, row in wanted:
                        rows[key][position] = tensor[row:row + 1]
        out = {k: [t for t in v if t is not None] for k, v in rows.items()}
        clip = torch.cat(out["clip"]) if out["clip"] else None
        return torch.cat(out["t5"]), clip, torch.cat(out["pooled"])
