"""Turning a validated request body into a queued job: registry names, pipeline limits, live workers.

Everything that can be refused is refused here, before a job exists: nothing invalid reaches a worker.
"""

from __future__ import annotations

import base64
import binascii

from service.api.auth import Caller, admit, track
from service.api.queue_client import ANONYMOUS, QueueClient
from service.errors import UnavailableError, ValidationError
from service.jobs import ControlRef, GenerateParams
from service.models.control import decode_image
from service.models.registry import Registry
from service.settings import Settings


async def submit(params: GenerateParams, *, registry: Registry, queue: QueueClient, settings: Settings,
                 idempotency_key: str | None, caller: Caller) -> tuple[str, bool]:
    """Validate against the registry and the live workers, admit against the caller's limits, then enqueue.
    Returns (job id, created)."""
    request = await prepare(params, registry=registry, queue=queue, settings=settings, owner=caller.owner)
    await admit(queue, settings, caller, jobs=1, pixel_steps=pixel_steps(params, registry))
    job_id, created = await queue.enqueue(request, idempotency_key, owner=caller.owner)
    if created:
        await track(queue, settings, caller, [job_id])
    return job_id, created


def pixel_steps(params: GenerateParams, registry: Registry) -> int:
    """What a request costs: width x height x images x steps, with the pipeline's defaults filled in."""
    spec = registry.pipeline(params.pipeline)
    return ((params.width or spec.width) * (params.height or spec.height) * params.num_images
            * (params.steps or spec.steps))


async def check(params: GenerateParams, *, registry: Registry, queue: QueueClient, settings: Settings) -> str:
    """Every check a job must pass before it is queued; returns the encoder name (the teacher when none is given)."""
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
    cost = pixel_steps(params, registry)
    if cost > settings.max_pixel_steps:
        raise ValidationError(
            f"{params.width or spec.width} x {params.height or spec.height} x {params.num_images} images x "
            f"{params.steps or spec.steps} steps = {cost:,} pixel-steps; the limit per request is "
            f"T2I_MAX_PIXEL_STEPS={settings.max_pixel_steps:,}", field="steps")
    names = [ref.name for ref in params.loras]
    if len(set(names)) != len(names):
        raise ValidationError(f"`loras` names an adapter twice: {names}", field="loras")
    for name in names:
        registry.lora(name, spec.name)
    if params.control is not None:
        control = registry.controlnet(params.control.name, spec.name)
        control.mode_index(params.control.mode)

    # 3. A live worker must serve this pipeline with this encoder; its facts give the size multiple.
    def serving_in(workers: list[dict]) -> list[dict]:
        return [w for w in workers if params.pipeline in w["pipelines"] and encoder in w["encoders"]]

    serving = serving_in(await queue.live_workers(max_age_s=1.0))
    if not serving:  # the list read a moment ago may predate a worker that has just started
        workers = await queue.live_workers()
        serving = serving_in(workers)
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
    return encoder


async def prepare(params: GenerateParams, *, registry: Registry, queue: QueueClient, settings: Settings,
                  owner: str = ANONYMOUS) -> dict:
    """The checked job request as it is queued. An inline control image is checked and stored as an upload, so the
    queued job carries an id only."""
    encoder = await check(params, registry=registry, queue=queue, settings=settings)
    if params.control is not None:
        params = params.model_copy(update={"control": await store_control(params.control, queue, settings, owner)})
    request = params.model_dump()
    request["encoder"] = encoder
    return request


def decode_base64_image(text: str, *, field: str, max_bytes: int) -> bytes:
    """The bytes of a base64 image (a `data:image/...;base64,` URL too), checked to be a decodable image."""
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if ";base64" not in header:
            raise ValidationError(f"`{field}`: a data URL must be base64-encoded", field=field)
    if len(text) > max_bytes * 4 // 3 + 4:
        decode_image(b"x" * (len(text) * 3 // 4), field=field, max_bytes=max_bytes)  # raises the 413
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValidationError(f"`{field}` is not valid base64", field=field) from None
    decode_image(data, field=field, max_bytes=max_bytes)
    return data


async def store_control(control: ControlRef, queue: QueueClient, settings: Settings,
                        owner: str = ANONYMOUS) -> ControlRef:
    if control.image is not None:
        data = decode_base64_image(control.image, field="control.image", max_bytes=settings.max_image_bytes)
        return control.model_copy(update={"image": None, "image_id": await queue.put_upload(data, owner)})
    if not await queue.keep_upload(control.image_id, owner):
        raise ValidationError(f"`control.image_id` {control.image_id!r} is unknown or has expired; upload the "
                              "image again with POST /v1/uploads", field="control.image_id")
    return control
