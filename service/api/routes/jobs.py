"""Jobs by id: status, images, server-sent progress events, cancellation."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import StreamingResponse

from service.api.auth import CallerDep
from service.api.deps import QueueDep
from service.api.queue_client import QueueClient
from service.errors import NotFoundError
from service.jobs import CONTENT_TYPES, JobView, job_view

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

JobId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


async def view(queue: QueueClient, job_id: str, request: Request, owner: str,
               fields: dict[str, str] | None = None, position: int | None = None) -> JobView:
    """The job as the API shows it, from `fields` (and a queued job's `position`) when the caller has them."""
    fields = fields if fields is not None else await queue.fields(job_id, owner)
    if fields["status"] == "queued" and position is None:
        position = await queue.position(job_id)
    return job_view(fields, position=position, base_url=str(request.base_url).rstrip("/"))


@router.get("/{job_id}", response_model=JobView)
async def get_job(job_id: JobId, request: Request, queue: QueueDep, caller: CallerDep) -> JobView:
    """Status, queue position, seed, encoder, worker and per-stage timings (seconds)."""
    return await view(queue, job_id, request, caller.owner)


@router.get("/{job_id}/images/{n}", response_class=Response,
            responses={200: {"content": {"image/png": {}, "image/webp": {}, "image/jpeg": {}}}})
async def get_image(job_id: JobId, n: Annotated[int, Path(ge=0, le=63)], queue: QueueDep,
                    caller: CallerDep) -> Response:
    fields = await queue.fields(job_id, caller.owner)
    data = await queue.image(job_id, n)
    if data is None:
        raise NotFoundError(
            f"job {job_id!r} has no image {n} (status {fields['status']}, {fields.get('images', 0)} image(s))",
            field="n",
        )
    return Response(content=data, media_type=CONTENT_TYPES[fields.get("content_type", "png")])


@router.get("/{job_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}})
async def job_events(job_id: JobId, queue: QueueDep, caller: CallerDep) -> StreamingResponse:
    """Server-sent events: `progress` (step, steps) and `status` until the job ends."""
    await queue.fields(job_id, caller.owner)  # 404 before the stream starts

    async def stream():
        async for data in queue.events(job_id):
            yield ": keep-alive\n\n" if data is None else f"data: {data}\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.delete("/{job_id}", status_code=202, response_model=JobView)
async def cancel_job(job_id: JobId, request: Request, queue: QueueDep, caller: CallerDep) -> JobView:
    """Cancel: a queued job never runs; a running one stops at its next denoising step. 409 once finished."""
    await queue.fields(job_id, caller.owner)
    await queue.cancel(job_id)
    return await view(queue, job_id, request, caller.owner)
