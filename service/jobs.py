"""A generation job: the request a client sends, its status, and the view clients get back.

Shared by the API (validation, views) and the worker (it parses the stored request). JSON only: nothing here is ever
pickled. No torch.
"""

from __future__ import annotations

import json
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_SEED = 2**63 - 1


class JobStatus(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


OutputFormat = Literal["png", "webp", "jpeg"]
CONTENT_TYPES = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}


class LoraRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, description="A registered LoRA (see GET /v1/loras).")
    scale: float | None = Field(None, ge=-4.0, le=4.0, description="Default: the LoRA's registered scale.")


class ControlRef(BaseModel):
    """A ControlNet for one job: a registered ControlNet, its control image, and how strongly and when it acts."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, description="A registered ControlNet (see GET /v1/controlnets).")
    image: str | None = Field(None, description="The control image, base64 (a `data:image/...;base64,` URL is "
                                                "accepted too). Give this or `image_id`.")
    image_id: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$",
                                 description="An image uploaded with POST /v1/uploads.")
    mode: str | None = Field(None, max_length=40, description="Union ControlNets only: the control mode (e.g. canny).")
    preprocess: Literal["auto", "canny", "none"] = Field(
        "auto", description="auto: canny edges for a canny ControlNet, other maps (depth, pose) as given; "
                            "canny: always; none: the image is already the control map.")
    canny_low: int = Field(100, ge=0, le=1000, description="Canny lower hysteresis threshold.")
    canny_high: int = Field(200, ge=0, le=1000, description="Canny upper hysteresis threshold.")
    scale: float | None = Field(None, ge=0.0, le=4.0, description="Conditioning scale; default: the registered one.")
    start: float = Field(0.0, ge=0.0, le=1.0, description="Fraction of the steps at which the ControlNet starts.")
    end: float = Field(1.0, ge=0.0, le=1.0, description="Fraction of the steps at which it stops.")

    @model_validator(mode="after")
    def _consistent(self) -> "ControlRef":
        if (self.image is None) == (self.image_id is None):
            raise ValueError("give exactly one of `image` (base64) and `image_id` (from POST /v1/uploads)")
        if self.start >= self.end:
            raise ValueError(f"`start` ({self.start}) must be below `end` ({self.end})")
        if self.canny_low > self.canny_high:
            raise ValueError(f"`canny_low` ({self.canny_low}) must not exceed `canny_high` ({self.canny_high})")
        return self


class UploadView(BaseModel):
    """What `POST /v1/uploads` returns."""

    id: str
    width: int
    height: int
    bytes: int
    expires_at: float
    url: str


class GenerateParams(BaseModel):
    """The body of `POST /v1/generate`. The encoder comes as the `encoder` query parameter (or this field)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, description="What to draw.")
    pipeline: str = Field("flux", description="Registry name of the pipeline (see GET /v1/pipelines).")
    encoder: str | None = Field(None, description="Registry name of the T5 encoder, or of a route such as `auto` "
                                                  "(an encoder per prompt); default: the teacher.")
    width: int | None = Field(None, ge=16, le=2048, description="Pixels; default: the pipeline's.")
    height: int | None = Field(None, ge=16, le=2048, description="Pixels; default: the pipeline's.")
    steps: int | None = Field(None, ge=1, le=100, description="Denoising steps; default: the pipeline's.")
    guidance: float | None = Field(None, ge=0.0, le=30.0, description="Guidance scale; default: the pipeline's.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Same seed + encoder => same image.")
    negative_prompt: str | None = Field(None, description="SD3 pipelines only.")
    num_images: int = Field(1, ge=1, le=8, description="Images for this prompt, each from its own noise.")
    output_format: OutputFormat = Field("png", description="png | webp | jpeg")
    loras: list[LoraRef] = Field(default_factory=list, max_length=4,
                                 description="LoRA adapters for this job, by registry name, with scales.")
    control: ControlRef | None = Field(None, description="A ControlNet and its control image for this job.")


class Routing(BaseModel):
    """What a route decided for a job (see service.models.routing.Decision, which the API stores)."""

    route: str
    encoder: str = Field(description="The encoder the job runs on.")
    picked: str = Field(description="What the route's rules (or its default) chose, before any fallback.")
    rule: str = Field(description="The rule that matched, or `default`.")
    reason: str = Field(description="The rule's name, `default`, `fallback-no-worker` or `fallback-queue-depth`.")
    detail: str | None = Field(None, description="Why the encoders before it were passed over.")


class JobError(BaseModel):
    error: str
    error_type: str


class JobView(BaseModel):
    """What `GET /v1/jobs/{id}` returns."""

    id: str
    status: JobStatus
    position: int | None = Field(None, description="Jobs ahead of this one in the queue (0 = next); queued only.")
    pipeline: str
    encoder: str
    routing: Routing | None = Field(None, description="Set when the request named a route: what it decided, and why.")
    seed: int | None = None
    worker: str | None = None
    attempts: int = 0
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    progress: dict[str, int] | None = None
    timings: dict[str, float] = Field(default_factory=dict, description="Seconds per stage.")
    peak_memory_bytes: int | None = Field(None, description="Peak device memory of the job (CUDA; RSS on a CPU).")
    device: str | None = Field(None, description="Device the denoiser ran on.")
    batch_size: int | None = Field(None, description="Jobs denoised together with this one (dynamic batching).")
    images: list[str] = Field(default_factory=list, description="URLs of the images.")
    warnings: list[str] = Field(default_factory=list)
    error: JobError | None = None


def decode_hash(raw: dict[bytes | str, bytes | str]) -> dict[str, str]:
    return {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in raw.items()
    }


def job_view(fields: dict[str, str], *, position: int | None, base_url: str) -> JobView:
    """Build the client view from a job's stored fields."""
    request = json.loads(fields["request"])
    status = JobStatus(fields["status"])
    n_images = int(fields.get("images", 0) or 0)
    job_id = fields["id"]
    progress = None
    if "step" in fields:
        progress = {"step": int(fields["step"]), "steps": int(fields["steps"])}
    error = None
    if fields.get("error"):
        error = JobError(error=fields["error"], error_type=fields.get("error_type", "internal"))
    return JobView(
        id=job_id,
        status=status,
        position=position if status == JobStatus.queued else None,
        pipeline=request["pipeline"],
        encoder=request["encoder"],
        routing=request.get("routing"),
        seed=int(fields["seed"]) if fields.get("seed") else request.get("seed"),
        worker=fields.get("worker"),
        attempts=int(fields.get("attempts", 0)),
        created_at=float(fields["created_at"]),
        started_at=float(fields["started_at"]) if fields.get("started_at") else None,
        finished_at=float(fields["finished_at"]) if fields.get("finished_at") else None,
        progress=progress,
        timings=json.loads(fields.get("timings", "{}")),
        peak_memory_bytes=int(fields["peak_memory_bytes"]) if fields.get("peak_memory_bytes") else None,
        device=fields.get("device"),
        batch_size=int(fields["batch_size"]) if fields.get("batch_size") else None,
        images=[f"{base_url}/v1/jobs/{job_id}/images/{n}" for n in range(n_images)],
        warnings=json.loads(fields.get("warnings", "[]")),
        error=error,
    )


def event(kind: str, **data: Any) -> str:
    """A progress/status event as published on a job's channel and sent over SSE."""
    return json.dumps({"type": kind, **data})
