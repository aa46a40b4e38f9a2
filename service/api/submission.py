"""Turning a validated request body into a queued job: registry names, pipeline limits, live workers.

Everything that can be refused is refused here, before a job exists: nothing invalid reaches a worker.
"""

from __future__ import annotations

from service.api.queue_client import QueueClient
from service.errors import UnavailableError, ValidationError
from service.jobs import GenerateParams
from service.models.registry import Registry
from service.settings import Settings


async def submit(params: GenerateParams, *, registry: Registry, queue: QueueClient, settings: Settings,
                 idempotency_key: str | None) -> tuple[str, bool]:
    """Validate against the registry and the live workers, then enqueue. Returns (job id, created)."""
    # 1. Names: both must be registry names (nothing from a request ever becomes a path or a source).
    spec = registry.pipeline(params.pipeline)
    encoder = params.encoder or (registry.teacher.name if registry.teacher else None)
    if encoder is None:
        raise ValidationError("`encoder` is required: the registry has no teacher to default to", field="encoder")
    registry.encoder(encoder)

    # 2. Bounds that depend on settings or the pipeline.
    if len(params.prompt) > settings.max_prompt_chars:
        raise ValidationError(
            f"`prompt` has {len(params.prompt)} characters; the limit is {settings.max_prompt_chars}", field="prompt"
        )
    spec.check_request(params.prompt, params.negative_prompt)
    names = [ref.name for ref in params.loras]
    if len(set(names)) != len(names):
        raise ValidationError(f"`loras` names an adapter twice: {names}", field="loras")
    for name in names:
        registry.lora(name, spec.name)

    # 3. A live worker must serve this pipeline with this encoder; its facts give the size multiple.
    workers = await queue.live_workers()
    serving = [w for w in workers if params.pipeline in w["pipelines"] and encoder in w["encoders"]]
    if not serving:
        raise UnavailableError(
            f"no live worker serves encoder {encoder!r} with pipeline {params.pipeline!r} "
            f"({len(workers)} live worker(s))", field="encoder",
        )
    multiple = serving[0]["pipelines"][params.pipeline]["size_multiple"]
    for field in ("width", "height"):
        value = getattr(params, field)
        if value is not None and value % multiple:
            raise ValidationError(
                f"`{field}`={value} is not a multiple of {multiple}, which pipeline {params.pipeline!r} needs",
                field=field,
            )

    # 4. Enqueue (atomic; 429 when the queue is full).
    request = params.model_dump()
    request["encoder"] = encoder
    return await queue.enqueue(request, idempotency_key)
