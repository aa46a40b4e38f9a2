"""Compare runs: the same prompts and seeds through several T5 encoders, scored against a reference encoder.

The request and view models, the built-in prompt sets, and the image and vote statistics. No torch: the API computes
these with numpy from the images and embeddings the workers stored.

- PSNR and SSIM of each image against the reference encoder's image for the same prompt and seed (SSIM as torchmetrics
  computes it: 11x11 Gaussian window, sigma 1.5, reflect padding; the tests check that the two agree).
- Embedding cosine: the mean over the prompt's real tokens of the cosine between the encoder's and the reference's
  token embeddings (the tokenizers are equal, so the tokens line up).
- Evaluator accuracy, for prompts in the miniature world's grammar: the exact evaluator reads the image.
- Blind votes: win rate of encoder A over B (a tie counts half) with a 95% Wilson score interval.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from service.jobs import MAX_SEED, ControlRef, LoraRef

# -- built-in prompt sets ----------------------------------------------------------------------------------------
PROMPT_SETS: dict[str, str] = {
    "semantics": "compositional prompts (attributes, counts, spatial relations), paper criterion: semantics",
    "image-quality": "aesthetic captions, paper criterion: image quality",
    "text-rendering": "signs with words (CommonText style), paper criterion: text rendering",
    "miniature-semantics": "the miniature world's held-out colour/shape/position/count/relation prompts "
                           "(scored by the exact evaluator)",
    "miniature-text-rendering": "the miniature world's held-out sign prompts (scored by the exact evaluator)",
}


@lru_cache
def prompt_set(name: str) -> tuple[str, ...]:
    """The prompts of a built-in set (fixed: the same every time)."""
    from trainer import prompts as trainer_prompts
    from trainer.world.captions import held_out_prompts

    if name == "semantics":
        return tuple(p for p, _ in trainer_prompts.builtin("semantics"))[:8]
    if name == "image-quality":
        return tuple(p for p, _ in trainer_prompts.builtin("image_quality"))[:8]
    if name == "text-rendering":
        return tuple(p for p, _ in trainer_prompts.generate_text_rendering(8, seed=7))
    if name == "miniature-semantics":
        return tuple(held_out_prompts(8, kinds=("single", "count", "relation")))
    if name == "miniature-text-rendering":
        return tuple(held_out_prompts(4, kinds=("text",)))
    raise KeyError(name)


# -- requests and views ------------------------------------------------------------------------------------------
class CompareParams(BaseModel):
    """The body of `POST /v1/compare`."""

    model_config = ConfigDict(extra="forbid")

    prompts: list[str] | None = Field(None, max_length=64, description="The prompts; or name a `prompt_set`.")
    prompt_set: str | None = Field(None, description=f"A built-in set: {', '.join(PROMPT_SETS)}.")
    encoders: list[str] = Field(min_length=2, max_length=8, description="The encoders to compare (2 or more); a "
                                                                           "route (such as `auto`) is a column too.")
    reference: str | None = Field(None, description="Scored against this encoder (default: the teacher); it is "
                                                    "added to `encoders` when missing.")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, max_length=8,
                             description="Seeds; every encoder gets the same seeds, so the same initial noise.")
    pipeline: str = Field("flux", description="Registry name of the pipeline.")
    width: int | None = Field(None, ge=16, le=2048)
    height: int | None = Field(None, ge=16, le=2048)
    steps: int | None = Field(None, ge=1, le=100)
    guidance: float | None = Field(None, ge=0.0, le=30.0)
    loras: list[LoraRef] = Field(default_factory=list, max_length=4, description="LoRA adapters on every job.")
    control: ControlRef | None = Field(None, description="A ControlNet and control image on every job.")
    title: str | None = Field(None, max_length=200, description="A label for the run list.")

    @field_validator("prompts")
    @classmethod
    def _prompts_not_blank(cls, prompts: list[str] | None) -> list[str] | None:
        for i, prompt in enumerate(prompts or []):
            if not prompt.strip():
                raise ValueError(f"prompt {i} is blank")
        return prompts

    @field_validator("seeds")
    @classmethod
    def _seeds_in_range(cls, seeds: list[int]) -> list[int]:
        for seed in seeds:
            if not 0 <= seed <= MAX_SEED:
                raise ValueError(f"seed {seed} is out of range [0, {MAX_SEED}]")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds repeat: {seeds}")
        return seeds

    @field_validator("encoders")
    @classmethod
    def _encoders_distinct(cls, encoders: list[str]) -> list[str]:
        if len(set(encoders)) != len(encoders):
            raise ValueError(f"encoders repeat: {encoders}")
        return encoders

    @model_validator(mode="after")
    def _one_prompt_source(self) -> "CompareParams":
        if (self.prompts is None) == (self.prompt_set is None):
            raise ValueError("give exactly one of `prompts` and `prompt_set`")
        if self.prompts is not None and not self.prompts:
            raise ValueError("`prompts` is empty")
        return self


class EncoderResult(BaseModel):
    """One encoder's image for one prompt and seed, with its scores against the reference."""

    job_id: str
    status: str
    image: str | None = None
    error: str | None = None
    psnr: float | None = None
    ssim: float | None = None
    embedding_cosine: float | None = None
    evaluator: dict[str, bool] | None = Field(None, description="Miniature-world prompts: attribute -> correct.")
    encode_s: float | None = None
    total_s: float | None = None
    peak_memory_bytes: int | None = None
    ran_on: str | None = Field(None, description="A route's column: the encoder the route chose for this job.")


class Cell(BaseModel):
    prompt_index: int
    prompt: str
    seed: int
    done: bool
    results: dict[str, EncoderResult]


class EncoderSummary(BaseModel):
    encoder: str
    is_reference: bool
    jobs: int
    succeeded: int
    failed: int
    psnr: float | None = None
    ssim: float | None = None
    embedding_cosine: float | None = None
    accuracy: float | None = Field(None, description="Share of miniature-world images with every attribute right.")
    encode_p50_s: float | None = None
    encode_p95_s: float | None = None
    job_p50_s: float | None = None
    job_p95_s: float | None = None
    peak_memory_bytes: int | None = None
    params: int | None = None
    bytes: int | None = Field(None, description="The encoder's weights as held in memory (quantized ones as stored); "
                                                "for a route, the mean over its jobs of the encoder each ran on.")
    quantization: str | None = Field(None, description="The quantization method, for a quantized encoder.")
    routed: dict[str, int] | None = Field(None, description="A route's column: its jobs per encoder it chose.")


class PairSummary(BaseModel):
    a: str
    b: str
    votes: int
    a_wins: int
    b_wins: int
    ties: int
    a_win_rate: float | None = Field(None, description="(a wins + ties / 2) / votes")
    ci_low: float | None = None
    ci_high: float | None = None


class CompareSummary(BaseModel):
    id: str
    title: str | None
    status: Literal["running", "done"]
    created_at: float
    pipeline: str
    encoders: list[str]
    reference: str
    prompts: int
    seeds: list[int]
    jobs_total: int
    jobs_done: int
    jobs_failed: int


class CompareView(CompareSummary):
    prompt_set: str | None = None
    prompt_list: list[str]
    cells: list[Cell]
    summary: list[EncoderSummary]
    votes: list[PairSummary]


class PairView(BaseModel):
    """A blind pair: two images of one prompt and seed, sides randomised, encoders hidden."""

    token: str
    prompt: str
    seed: int
    left: str
    right: str
    remaining: int = Field(description="Pairs this voter has not voted on yet, this one included.")


class VoteParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$",
                       description="The pair's token from GET /v1/compare/{id}/pair.")
    choice: Literal["left", "right", "tie"]
    voter: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$",
                       description="Who votes; one vote per voter and pair counts.")


class VoteResult(BaseModel):
    counted: bool = Field(description="False when this voter had already voted on this pair (the first counts).")


# -- image and embedding metrics (numpy) -------------------------------------------------------------------------
PSNR_CAP_DB = 100.0  # identical images


def to_unit(image) -> np.ndarray:
    """An image as float64 in [0, 1], (H, W, 3)."""
    return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return PSNR_CAP_DB if mse == 0 else min(PSNR_CAP_DB, 10.0 * math.log10(1.0 / mse))


def _gaussian(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    dist = np.arange((1 - size) / 2, (1 + size) / 2, 1.0)
    g = np.exp(-((dist / sigma) ** 2) / 2)
    return g / g.sum()


def _filter(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Valid separable convolution over the first two axes of a (H, W, C) array."""
    k = len(kernel)
    rows = sum(kernel[i] * x[i:x.shape[0] - k + 1 + i] for i in range(k))
    return sum(kernel[j] * rows[:, j:rows.shape[1] - k + 1 + j] for j in range(k))


def ssim(a: np.ndarray, b: np.ndarray, size: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM of two (H, W, 3) images in [0, 1], computed as torchmetrics does (data_range 1)."""
    pad = (size - 1) // 2
    if min(a.shape[:2]) <= 2 * pad:
        raise ValueError(f"images of {a.shape[1]}x{a.shape[0]} are too small for SSIM's {size}x{size} window")
    kernel = _gaussian(size, sigma)
    c1, c2 = 0.01**2, 0.03**2
    a = np.pad(a, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    b = np.pad(b, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    mu_a, mu_b = _filter(a, kernel), _filter(b, kernel)
    var_a = np.maximum(_filter(a * a, kernel) - mu_a**2, 0.0)
    var_b = np.maximum(_filter(b * b, kernel) - mu_b**2, 0.0)
    cov = _filter(a * b, kernel) - mu_a * mu_b
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(index.mean())


def embedding_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over tokens of the cosine between two (tokens, width) embeddings."""
    n = min(len(a), len(b))
    a, b = a[:n].astype(np.float64), b[:n].astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(np.sum(a * b, axis=1) / np.maximum(norms, 1e-12)))


def evaluator_scores(prompt: str, image) -> dict[str, bool] | None:
    """The miniature world's exact evaluator on an image, when the prompt is in the world's grammar and the image
    has the world's size; else None."""
    from trainer.world.captions import parse
    from trainer.world.evaluator import score
    from trainer.world.scene import SIZE

    truth = parse(prompt)
    if truth is None or image.size != (SIZE, SIZE):
        return None
    return score(np.asarray(image.convert("RGB")), truth)


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (ties count as half a success)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # At p = 0 or 1 the bound is exactly the observed value (rounding would put it a hair inside).
    return (0.0 if p == 0 else max(0.0, centre - half)), (1.0 if p == 1 else min(1.0, centre + half))
