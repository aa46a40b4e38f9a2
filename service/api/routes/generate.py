"""`POST /v1/generate` (and its unversioned twin `POST /generate`): queue a job, or wait for it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response

from service import metrics
from service.api.auth import CallerDep
from service.api.deps import JsonBody, QueueDep, RegistryDep, SettingsDep
from service.api.routes.jobs import view
from service.api.submission import submit
from service.errors import ValidationError
from service.jobs import GenerateParams, JobView

router = APIRouter(tags=["generate"])


@router.post("/v1/generate", status_code=202, response_model=JobView, dependencies=[JsonBody],
             responses={200: {"model": JobView, "description": "finished job (with ?wait=true)"}})
@router.post("/generate", status_code=202, response_model=JobView, dependencies=[JsonBody],
             responses={200: {"model": JobView, "description": "finished job (with ?wait=true)"}},
             include_in_schema=True, summary="Generate (unversioned alias of /v1/generate)")
async def generate(
    params: GenerateParams,
    request: Request,
    response: Response,
    settings: SettingsDep,
    registry: RegistryDep,
    queue: QueueDep,
    caller: CallerDep,
    encoder: Annotated[str | None, Query(description="Registry name of the T5 encoder (e.g. t5-base).")] = None,
    wait: Annotated[bool, Query(description="Answer with the finished job (bounded by T2I_WAIT_TIMEOUT_S).")] = False,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JobView:
    """Queue a generation job. 202 with the job and its Location; with `?wait=true`, 200 with the finished job."""
    if encoder is not None:
        if params.encoder is not None and params.encoder != encoder:
            raise ValidationError(
                f"`encoder` given twice with different values: query {encoder!r}, body {params.encoder!r}",
                field="encoder",
            )
        params = params.model_copy(update={"encoder": encoder})
    try:
        job_id, created = await submit(params, registry=registry, queue=queue, settings=settings,
                                        idempotency_key=idempotency_key, caller=caller)
    except Exception as exc:
        metrics.REQUESTS.labels("generate", getattr(exc, "error_type", "internal")).inc()
        raise
    metrics.REQUESTS.labels("generate", "accepted").inc()
    response.headers["Location"] = f"/v1/jobs/{job_id}"
    fields = None  # read with the wait, in its round trip
    if wait:
        fields = await queue.wait(job_id, settings.wait_timeout_s, just_queued=created, owner=caller.owner)
    job = await view(queue, job_id, request, caller.owner, fields)
    if job.status.terminal:
        response.status_code = 200
    return job
