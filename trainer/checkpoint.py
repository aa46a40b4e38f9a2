"""Checkpoints: the student (Hugging Face format, safetensors), the optimizer state (safetensors + JSON), the position
in the data, and the config, written atomically (a temp dir renamed into place). No pickle anywhere.

    RUN/checkpoints/step-000200/
        model.safetensors, config.json, tokenizer files     the student, loadable by from_pretrained
        optimizer.safetensors, optimizer.json                AdamW moments and step counts; param groups
        state.json                                           step, batch, losses so far
        config.yaml                                          the run's config

The random state needs no file: noise, guidance and dropout are drawn from generators seeded by (seed, batch, rank),
so resuming at a batch boundary reproduces them exactly.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from service.errors import ConfigError
from trainer.config import to_yaml

# Settings a resumed run may change: how long it runs, how it logs, evaluates and saves, where its teacher's embeddings
# come from (a cache holds the same teacher's), threads. Any other change would silently continue a different run:
# the optimizer's state even carries the old learning rate.
RESUMABLE_CHANGES = {"max_steps", "threads", "log_every", "eval_every", "eval_prompts", "checkpoint_every",
                     "keep_checkpoints", "output_dir", "teacher_cache"}
PATHS = {"models_file", "student", "data"}


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())


def check_resumable(run_dir: Path, config) -> None:
    """Refuse to resume the run in `run_dir` under settings other than those its latest checkpoint was written with
    (bar `RESUMABLE_CHANGES`); paths compare resolved."""
    existing = checkpoint_dirs(run_dir)
    if not existing:
        return
    saved = yaml.safe_load((existing[-1] / "config.yaml").read_text()) or {}

    def same(key: str, a, b) -> bool:
        if key in PATHS and isinstance(a, str) and isinstance(b, str):
            return Path(a).resolve() == Path(b).resolve()
        return a == b

    now = dataclasses.asdict(config)
    changed = [k for k in now if k not in RESUMABLE_CHANGES and not same(k, saved.get(k), now[k])]
    if changed:
        diff = ", ".join(f"{k}={saved.get(k)!r} there, {now[k]!r} now" for k in changed)
        raise ConfigError(f"`output_dir` {run_dir} holds checkpoints of a run with other settings ({diff}): resume it "
                          "with the same settings, or give a new `output_dir`", field=changed[0])


def save(run_dir: Path, step: int, student, optimizer: torch.optim.Optimizer, tokenizer, config, state: dict,
         keep: int) -> Path:
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:07d}"
    tmp = root / f".step-{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    student.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    save_optimizer(tmp, optimizer)
    (tmp / "config.yaml").write_text(to_yaml(config))
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_optimizer(path: Path, optimizer: torch.optim.Optimizer) -> None:
    """The optimizer's moments as safetensors and its param groups as JSON, in the directory `path`."""
    tensors, meta = _flatten_optimizer(optimizer.state_dict())
    save_file(tensors, Path(path) / "optimizer.safetensors", metadata={"format": "pt"})
    (Path(path) / "optimizer.json").write_text(json.dumps(meta))


def load_optimizer(path: Path, optimizer: torch.optim.Optimizer) -> None:
    tensors = load_file(Path(path) / "optimizer.safetensors")
    meta = json.loads((Path(path) / "optimizer.json").read_text())
    state: dict = {}
    for key, tensor in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = tensor
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def read_state(path: Path) -> dict:
    return json.loads((Path(path) / "state.json").read_text())


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {}
    for index, entries in state_dict["state"].items():
        for name, value in entries.items():
            tensor = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{index}.{name}"] = tensor.detach().cpu().contiguous()
    return tensors, {"param_groups": state_dict["param_groups"]}
