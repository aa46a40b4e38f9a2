"""`POST /v1/images/generations`, compatible with the OpenAI Images API, so existing clients work unchanged.

`model` is the pipeline, `size` is "WxH"; the encoder and the other t2i-slim parameters (seed, steps, guidance,
negative_prompt, loras, control) come as extra fields:

    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.images.generate(model="flux", prompt="a red fox", size="1024x1024", extra_body={"encoder": "t5-base"})
"""

from __future__ import annotations

import base64
import re
import time
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from service import metrics
from service.api.auth import CallerDep
from service.api.deps import JsonBody, QueueDep, RegistryDep, SettingsDep
from service.api.submission import submit
from service.errors import GenerationError, T2IError, UnavailableError, ValidationError
from service.jobs import MAX_SEED, ControlRef, GenerateParams, JobStatus, LoraRef

router = APIRouter(tags=["openai"])


class ImagesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    model: str = Field("flux", description="The pipeline's registry name.")
    n: int = Field(1, ge=1, le=8)
    size: str | None = Field(None, description='"WIDTHxHEIGHT", e.g. "1024x1024"; default: the pipeline\'s.')
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Literal["png", "webp", "jpeg"] = "png"
    quality: str | None = Field(None, description="Accepted for compatibility; ignored.")
    style: str | None = Field(None, description="Accepted for compatibility; ignored.")
    user: str | None = Field(None, description="Accepted for compatibility; ignored.")
    # t2i-slim extras
    encoder: str | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    steps: int | None = Field(None, ge=1, le=100)
    guidance: float | None = Field(None, ge=0.0, le=30.0)
    negative_prompt: str | None = None
    loras: list[LoraRef] = Field(default_factory=list, max_length=4)
    control: ControlRef | None = None


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    if size is None or size == "auto":
        return None, None
    match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", size)
    if not match:
        raise ValidationError(f'`size`={size!r} is not "WIDTHxHEIGHT" (e.g. "1024x1024")', field="size")
    return int(match.group(1)), int(match.group(2))


@router.post("/v1/images/generations", response_model=ImagesResponse, dependencies=[JsonBody])
async def images_generations(body: ImagesRequest, request: Request, settings: SettingsDep, registry: RegistryDep,
                             queue: QueueDep, caller: CallerDep) -> ImagesResponse:
    """Generate and wait (bounded by T2I_WAIT_TIMEOUT_S); images as base64 or as URLs of the job's images."""
    width, height = parse_size(body.size)
    try:
        params = GenerateParams(
            prompt=body.prompt, pipeline=body.model, encoder=body.encoder, width=width, height=height,
            steps=body.steps, guidance=body.guidance, seed=body.seed, negative_prompt=body.negative_prompt,
            num_images=body.n, output_format=body.output_format, loras=body.loras, control=body.control,
        )
    except Exception as exc:  # pydantic bounds on width/height from `size`
        raise ValidationError(f"`size`={body.size!r} is out of range [16, 2048] per side", field="size") from exc
    try:
        queued = await submit(params, registry=registry, queue=queue, settings=settings, idempotency_key=None,
                              caller=caller)
    except T2IError as exc:
        metrics.REQUESTS.labels("images_generations", exc.error_type).inc()
        raise
    metrics.REQUESTS.labels("images_generations", "accepted").inc()
    job_id = queued.id
    fields = await queue.wait(job_id, settings.wait_timeout_s, just_queued=queued.created)
    status = JobStatus(fields["status"])
    if status != JobStatus.succeeded:
        if not status.terminal:
            raise UnavailableError(f"job {job_id} did not finish within {settings.wait_timeout_s:.0f}s; "
                                   f"poll /v1/jobs/{job_id}")
        raise GenerationError(f"job {job_id} {status.value}: {fields.get('error', '')}")
    base = str(request.base_url).rstrip("/")
    data = []
    for n in range(int(fields.get("images", 0))):
        if body.response_format == "url":
            data.append(ImageData(url=f"{base}/v1/jobs/{job_id}/images/{n}"))
        else:
            data.append(ImageData(b64_json=base64.b64encode(await queue.image(job_id, n)).decode()))
    return ImagesResponse(created=int(time.time()), data=data)
