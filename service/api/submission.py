"""Turning a validated request body into a queued job: registry names, pipeline limits, live workers.

Everything that can be refused is refused here, before a job exists: nothing invalid reaches a worker.
"""

from __future__ import annotations

import base64
import binascii

from service import metrics
from service.api.auth import Caller, admit, track
from service.api.queue_client import ANONYMOUS, Enqueued, QueueClient
from service.errors import UnavailableError, ValidationError
from service.jobs import ControlRef, GenerateParams
from service.models.control import decode_image
from service.models.registry import Registry
from service.models.routing import Decision, RouteSpec, decide
from service.settings import Settings


async def submit(params: GenerateParams, *, registry: Registry, queue: QueueClient, settings: Settings,
                 idempotency_key: str | None, caller: Caller) -> Enqueued:
    """Validate against the registry and the live workers, admit against the caller's limits, then enqueue."""
    request = await prepare(params, registry=registry, queue=queue, settings=settings, owner=caller.owner)
    await admit(queue, settings, caller, jobs=1, pixel_steps=pixel_steps(params, registry))
    queued = await queue.enqueue(request, idempotency_key, owner=caller.owner)
    if queued.created:
        await track(queue, settings, caller, [queued.id])
        if "routing" in request:
            decision = request["routing"]
            metrics.ROUTE_DECISIONS.labels(decision["route"], decision["encoder"], decision["reason"]).inc()
    return queued


def pixel_steps(params: GenerateParams, registry: Registry) -> int:
    """What a request costs: width x height x images x steps, with the pipeline's defaults filled in."""
    spec = registry.pipeline(params.pipeline)
    return ((params.width or spec.width) * (params.height or spec.height) * params.num_images
            * (params.steps or spec.steps))


async def check(params: GenerateParams, *, registry: Registry, queue: QueueClient,
                settings: Settings) -> tuple[str, Decision | None]:
    """Every check a job must pass before it is queued. Returns the encoder it runs on (the teacher when none is
    given) and, when the request named a route, the route's decision."""
    # 1. Names: registry names only (nothing from a request ever becomes a path or a source); a route is a name too.
    spec = registry.pipeline(params.pipeline)
    name = params.encoder or (registry.teacher.name if registry.teacher else None)
    if name is None:
        raise ValidationError("`encoder` is required: the registry has no teacher to default to", field="encoder")
    route = registry.route(name)

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
    for lora in names:
        registry.lora(lora, spec.name)
    if params.control is not None:
        control = registry.controlnet(params.control.name, spec.name)
        control.mode_index(params.control.mode)

    # 3. A live worker must serve this pipeline with the encoder (for a route: the encoder it decides on, from the
    #    prompt, the live workers and their queues); the worker's facts give the size multiple.
    workers = await queue.live_workers(max_age_s=1.0)
    decision, encoder = None, name
    for fresh in (False, True):  # the list read a moment ago may predate a worker that has just started
        if fresh:
            workers = await queue.live_workers()
        if route is not None:
            decision = await decide_route(route, params, workers, queue)
            if decision is None or (not fresh and not candidates_served(route, params, workers)):
                continue  # a candidate the list lacks may have just started: decide again on a fresh list
            encoder = decision.encoder
        serving = [w for w in workers if params.pipeline in w["pipelines"] and encoder in w["encoders"]]
        if serving:
            break
    else:
        what = (f"any encoder of route {name!r} ({', '.join(route.encoders)})" if route is not None
                else f"encoder {encoder!r}")
        raise UnavailableError(f"no live worker serves {what} with pipeline {params.pipeline!r} "
                               f"({len(workers)} live worker(s))", field="encoder")
    multiple = serving[0]["pipelines"][params.pipeline]["size_multiple"]
    for field in ("width", "height"):
        value = getattr(params, field)
        if value is not None and value % multiple:
            raise ValidationError(
                f"`{field}`={value} is not a multiple of {multiple}, which pipeline {params.pipeline!r} needs",
                field=field,
            )
    return encoder, decision


def candidates_served(route: RouteSpec, params: GenerateParams, workers: list[dict]) -> bool:
    """Whether some worker in `workers` serves each encoder this prompt could be routed to (its pick and the
    fallbacks) with the job's pipeline."""
    served = {name for w in workers if params.pipeline in w["pipelines"] for name in w["encoders"]}
    picked, _rule = route.pick(params.prompt)
    return all(name in served for name in (picked, *route.fallback))


async def decide_route(route: RouteSpec, params: GenerateParams, workers: list[dict],
                       queue: QueueClient) -> Decision | None:
    """The route's decision for this request, against these live workers (and the queue depths, read only when the
    route bounds them); None when no worker serves any of its encoders."""
    served = {name for w in workers if params.pipeline in w["pipelines"] for name in w["encoders"]}
    waiting = (await queue.waiting(params.pipeline, [n for n in route.encoders if n in served])
               if route.max_queue_depth is not None else {})
    return decide(route, params.prompt, serves=served.__contains__, depth=lambda n: waiting.get(n, 0))


async def prepare(params: GenerateParams, *, registry: Registry, queue: QueueClient, settings: Settings,
                  owner: str = ANONYMOUS) -> dict:
    """The checked job request as it is queued. An inline control image is checked and stored as an upload, so the
    queued job carries an id only."""
    encoder, decision = await check(params, registry=registry, queue=queue, settings=settings)
    if params.control is not None:
        params = params.model_copy(update={"control": await store_control(params.control, queue, settings, owner)})
    request = params.model_dump()
    request["encoder"] = encoder
    if decision is not None:
        request["routing"] = decision.model_dump()
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
