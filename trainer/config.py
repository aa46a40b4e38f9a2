"""Trainer configs: one dataclass per concern, read from YAML (or a named preset) plus `--key=value` overrides.

Unknown keys stop at once with the key named; every value is checked in `__post_init__`, naming the flag. The config
is saved inside every checkpoint. Presets live in `trainer/presets/*.yaml` and mirror `DistillConfig` one to one.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from service.errors import ConfigError

PRESETS_DIR = Path(__file__).parent / "presets"
CRITERIA = ("image_quality", "semantics", "text_rendering")
MODES = ("step-following", "random-timestep", "embedding-mse")


@dataclass
class SourceFile:
    """A user-provided prompt file: txt (one per line), jsonl, csv or parquet."""

    path: str
    column: str = "prompt"  # jsonl / csv / parquet column holding the prompt
    score_column: str | None = None  # e.g. an aesthetic score column
    min_score: float | None = None  # keep rows with score >= this (LAION-Aesthetics: 6.5)
    category: str | None = None  # e.g. a T2I-CompBench category; default: from the file name


@dataclass
class CriterionConfig:
    files: list[SourceFile] = field(default_factory=list)
    generated: int = 0  # prompts from the built-in generator (semantics, text_rendering); 0 = none
    builtin: bool = False  # include the small prompt set shipped with the project
    weight: float = 1.0  # share of the mixed set (weights are normalised)


@dataclass
class DatasetConfig:
    """`t2i dataset build CONFIG -o DIR`: the three-criteria prompt set."""

    image_quality: CriterionConfig = field(default_factory=lambda: CriterionConfig(builtin=True))
    semantics: CriterionConfig = field(default_factory=lambda: CriterionConfig(generated=600, builtin=True))
    text_rendering: CriterionConfig = field(default_factory=lambda: CriterionConfig(generated=300))
    total: int | None = None  # size of the mixed set; None = every prompt kept after filtering, no resampling
    max_tokens: int = 77  # drop prompts longer than this many teacher tokens
    tokenizer: str | None = None  # a tokenizer dir; None = the registry teacher's
    models_file: str | None = None
    validation_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self):
        for name in CRITERIA:
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, from_dict(CriterionConfig, value, prefix=f"{name}."))
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError(f"`validation_fraction`={self.validation_fraction} is out of range [0, 1)",
                              field="validation_fraction")
        if self.max_tokens < 4:
            raise ConfigError(f"`max_tokens`={self.max_tokens} is below 4", field="max_tokens")


@dataclass
class DistillConfig:
    """`t2i distill cache-teacher | train` and `t2i eval`: vision-based distillation of a T5 student."""

    # -- models
    models_file: str | None = None  # registry; None = T2I_MODELS_FILE or the demo kit
    pipeline: str = "flux"  # registry name of the frozen denoiser
    teacher: str | None = None  # registry name of the teacher encoder; None = the registry's teacher
    student: str = "t5-base"  # a registry encoder name, a student dir, or a plain T5 encoder dir (gets a projection)
    # -- data
    data: str = "data"  # a `t2i dataset build` output dir
    teacher_cache: str | None = None  # a `t2i distill cache-teacher` output dir; None = run the teacher live
    max_sequence_length: int = 77  # tokens; the paper's training used 77
    # -- objective
    mode: str = "step-following"  # step-following | random-timestep | embedding-mse
    trajectory_steps: int = 20
    guidance_choices: list[float] = field(default_factory=lambda: [2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0])
    resolution: int = 512
    high_resolution: int | None = None  # a second stage at this resolution ...
    high_resolution_from_step: int | None = None  # ... from this optimizer step on
    zero_pooled: bool = False  # zero the CLIP pooled vector in both passes (what the authors' code does)
    student_dropout: float | None = None  # override every dropout rate of the student (None: keep its own)
    # -- optimisation
    max_steps: int = 1000  # optimizer steps (one per denoising step in step-following mode)
    micro_batch_size: int = 4  # prompts per process per forward
    grad_accum_steps: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # clipping on the student's parameters
    mixed_precision: str = "no"  # no | bf16 (fp32 master weights under bf16 autocast)
    denoiser_dtype: str = "auto"  # auto = bf16 on CUDA, fp32 on CPU; the frozen denoiser only
    # -- bookkeeping
    output_dir: str = "runs/distill"
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_prompts: int = 16  # held-out prompts for the vision loss
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    threads: int = 1  # CPU threads per process

    def __post_init__(self):
        checks = [
            ("mode", self.mode in MODES, f"one of {', '.join(MODES)}"),
            ("mixed_precision", self.mixed_precision in ("no", "bf16"), "no or bf16"),
            ("denoiser_dtype", self.denoiser_dtype in ("auto", "float32", "bfloat16"), "auto, float32 or bfloat16"),
            ("max_steps", self.max_steps >= 1, ">= 1"),
            ("micro_batch_size", self.micro_batch_size >= 1, ">= 1"),
            ("grad_accum_steps", self.grad_accum_steps >= 1, ">= 1"),
            ("trajectory_steps", self.trajectory_steps >= 1, ">= 1"),
            ("lr", self.lr > 0, "> 0"),
            ("max_grad_norm", self.max_grad_norm > 0, "> 0"),
            ("guidance_choices", len(self.guidance_choices) > 0, "a non-empty list"),
            ("resolution", self.resolution >= 16, ">= 16"),
            ("max_sequence_length", 1 <= self.max_sequence_length <= 512, "in [1, 512]"),
            ("checkpoint_every", self.checkpoint_every >= 1, ">= 1"),
            ("eval_prompts", self.eval_prompts >= 1, ">= 1"),
        ]
        for name, ok, bound in checks:
            if not ok:
                raise ConfigError(f"`{name}`={getattr(self, name)!r} must be {bound}", field=name)
        if self.mode == "step-following" and self.checkpoint_every % self.trajectory_steps:
            raise ConfigError(
                f"`checkpoint_every`={self.checkpoint_every} must be a multiple of `trajectory_steps`="
                f"{self.trajectory_steps} in step-following mode (checkpoints fall between trajectories)",
                field="checkpoint_every",
            )

    @property
    def steps_per_batch(self) -> int:
        """Optimizer steps one batch of prompts gives."""
        return self.trajectory_steps if self.mode == "step-following" else 1


# -- reading -----------------------------------------------------------------------------------------------------
def from_dict(cls, raw: dict, prefix: str = ""):
    """Build a dataclass from a dict, refusing unknown keys by name and coercing simple types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"`{prefix.rstrip('.') or cls.__name__}` must be a mapping, got {raw!r}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown config key `{prefix}{unknown[0]}`; known keys: {', '.join(sorted(known))}",
            field=prefix + unknown[0],
        )
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, prefix + name) for name, value in raw.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{cls.__name__}: {exc}") from None


def _coerce(hint, value, name: str):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, prefix=name + ".")
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.startswith("[") else [v for v in value.split(",") if v]
        return [_coerce(args[0], v, name) for v in value]
    try:
        if hint is bool and isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        if hint in (int, float) and isinstance(value, bool):
            raise ValueError(value)
        return hint(value) if hint in (int, float, str) else value
    except (TypeError, ValueError):
        raise ConfigError(f"`{name}`={value!r} is not a valid {getattr(hint, '__name__', hint)}", field=name) from None


def load_yaml(source: str) -> dict:
    """A preset name (see `trainer/presets/`) or a YAML file path."""
    path = Path(source)
    if not path.exists() and (PRESETS_DIR / f"{source}.yaml").exists():
        path = PRESETS_DIR / f"{source}.yaml"
    if not path.exists():
        presets = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
        raise ConfigError(f"config {source!r} is neither a file nor a preset ({presets})", field="CONFIG")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {str(path)!r} is not valid YAML: {exc}", field="CONFIG") from None
    return raw


def parse_overrides(pairs: list[str]) -> dict:
    """`--key=value` (or `key=value`) pairs; dotted keys reach nested dataclasses."""
    out: dict = {}
    for pair in pairs:
        key, sep, value = pair.removeprefix("--").partition("=")
        if not sep:
            raise ConfigError(f"override {pair!r} is not of the form --key=value", field=key)
        node = out
        parts = key.replace("-", "_").split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value) if value else value
    return out


def merge(base: dict, over: dict) -> dict:
    merged = dict(base)
    for key, value in over.items():
        merged[key] = merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def load_config(cls, source: str | None, overrides: list[str] = ()):
    raw = load_yaml(source) if source else {}
    return from_dict(cls, merge(raw, parse_overrides(list(overrides))))


def to_yaml(config) -> str:
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)
