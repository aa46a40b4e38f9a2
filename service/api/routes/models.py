"""`GET /v1/encoders`, `/v1/pipelines`, `/v1/loras`, `/v1/controlnets`: the registry, with what the live
workers report about each model."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from service.api.deps import QueueDep, RegistryDep

router = APIRouter(prefix="/v1", tags=["models"])


class RouteInfo(BaseModel):
    rules: list[str]  # in order: "name: condition -> encoder"
    default: str
    fallback: list[str]
    max_queue_depth: int | None = None


class ModelInfo(BaseModel):
    name: str
    kind: str  # teacher | student | route for encoders; the family for pipelines
    source: str
    params: int | None = None
    bytes: int | None = None
    width: int | None = None
    dtype: str | None = None
    device: str | None = None
    max_sequence_length: int | None = None
    quantization: str | None = None  # encoders: the method (and options) their weights are quantized with
    served_by: list[str] = []
    resident_on: list[str] = []
    route: RouteInfo | None = None  # kind `route`: its rules, default and fallbacks (name it as an encoder)


def _merge(info: ModelInfo, worker: dict, facts: dict) -> None:
    info.served_by.append(worker["id"])
    if facts.get("resident", True):
        info.resident_on.append(worker["id"])
    for key in ("params", "bytes", "width", "dtype", "device", "quantization"):
        if getattr(info, key) is None and facts.get(key) is not None:
            setattr(info, key, facts[key])


@router.get("/encoders", response_model=list[ModelInfo])
async def encoders(registry: RegistryDep, queue: QueueDep) -> list[ModelInfo]:
    """Every registered T5 encoder, then every route (`kind: route`, named like an encoder in a request); sizes come
    from the workers that serve an encoder (none: not served now); a route is served by the workers of its
    encoders."""
    workers = await queue.live_workers()
    out = []
    for spec in registry.encoders.values():
        info = ModelInfo(name=spec.name, kind=spec.kind, source=spec.describe(),
                         max_sequence_length=spec.max_sequence_length,
                         quantization=spec.quantization.describe() if spec.quantization else None)
        for worker in workers:
            if spec.name in worker["encoders"]:
                _merge(info, worker, worker["encoders"][spec.name])
        out.append(info)
    for route in registry.routes.values():
        out.append(ModelInfo(
            name=route.name, kind="route", source=f"route over {', '.join(route.encoders)}",
            served_by=[w["id"] for w in workers if any(name in w["encoders"] for name in route.encoders)],
            route=RouteInfo(rules=[rule.describe() for rule in route.rules], default=route.default,
                            fallback=route.fallback, max_queue_depth=route.max_queue_depth)))
    return out


@router.get("/pipelines", response_model=list[ModelInfo])
async def pipelines(registry: RegistryDep, queue: QueueDep) -> list[ModelInfo]:
    """Every registered pipeline (the denoiser: transformer, VAE, CLIP), with the workers that hold it."""
    workers = await queue.live_workers()
    out = []
    for spec in registry.pipelines.values():
        info = ModelInfo(name=spec.name, kind=spec.family, source=spec.describe())
        for worker in workers:
            if spec.name in worker["pipelines"]:
                _merge(info, worker, worker["pipelines"][spec.name])
        out.append(info)
    return out


class LoraInfo(BaseModel):
    name: str
    pipeline: str
    source: str
    scale: float


@router.get("/loras", response_model=list[LoraInfo])
async def loras(registry: RegistryDep) -> list[LoraInfo]:
    """Every registered LoRA adapter, with its pipeline and default scale; name them in `loras` of a request."""
    return [LoraInfo(name=s.name, pipeline=s.pipeline, source=s.describe(), scale=s.scale)
            for s in registry.loras.values()]


class ControlNetInfo(BaseModel):
    name: str
    pipeline: str
    source: str
    condition: str
    modes: list[str]
    scale: float


@router.get("/controlnets", response_model=list[ControlNetInfo])
async def controlnets(registry: RegistryDep) -> list[ControlNetInfo]:
    """Every registered ControlNet: its pipeline, what its control images are, its modes (union models only) and its
    default conditioning scale; name one in `control` of a request."""
    return [ControlNetInfo(name=s.name, pipeline=s.pipeline, source=s.describe(), condition=s.condition,
                           modes=s.modes, scale=s.scale) for s in registry.controlnets.values()]
