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
        queued = await submit(params, registry=registry, queue=queue, settings=settings,
                              idempotency_key=idempotency_key, caller=caller)
    except Exception as exc:
        metrics.REQUESTS.labels("generate", getattr(exc, "error_type", "internal")).inc()
        raise
    metrics.REQUESTS.labels("generate", "accepted").inc()
    response.headers["Location"] = f"/v1/jobs/{queued.id}"
    # The view needs no read of its own: a wait reads the job in its round trip, and a new job is what was just
    # stored (an Idempotency-Key that names an existing job reads that job).
    fields, position = queued.fields, queued.position
    if wait:
        fields = await queue.wait(queued.id, settings.wait_timeout_s, just_queued=queued.created,
                                  owner=caller.owner)
        position = None
    job = await view(queue, queued.id, request, caller.owner, fields, position)
    if job.status.terminal:
        response.status_code = 200
    return job
