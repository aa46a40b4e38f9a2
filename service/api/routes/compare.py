"""Compare runs of encoders and blind votes: `POST/GET /v1/compare`, `GET /v1/compare/{id}` (.csv, .json), pairs
and votes. The web dashboard at `/ab` is built on these routes only."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response

from service.api.auth import Caller, CallerDep, admit, track
from service.api.compare_runs import CompareRuns
from service.api.deps import JsonBody, QueueDep, RegistryDep, SettingsDep
from service.api.submission import check, pixel_steps, store_control
from service.compare import PROMPT_SETS, CompareParams, CompareSummary, CompareView, PairView, VoteParams, \
    VoteResult, prompt_set
from service.errors import OverloadedError, T2IError, UnknownNameError, ValidationError
from service.jobs import GenerateParams

router = APIRouter(prefix="/v1/compare", tags=["compare"])

RunId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


def _runs(request: Request, caller: Caller) -> CompareRuns:
    return CompareRuns(request.app.state.queue, ttl_s=request.app.state.settings.compare_ttl_s, owner=caller.owner)


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


@router.get("/prompt-sets")
async def prompt_sets() -> list[dict]:
    """The built-in prompt sets a compare run can name, with their prompts."""
    return [{"name": name, "description": text, "prompts": list(prompt_set(name))} for name, text in
            PROMPT_SETS.items()]


@router.post("", status_code=202, response_model=CompareView, dependencies=[JsonBody])
async def create(params: CompareParams, request: Request, response: Response, settings: SettingsDep,
                 registry: RegistryDep, queue: QueueDep, caller: CallerDep) -> CompareView:
    """Start a compare run: every prompt x seed x encoder as a job, the same seed (so the same initial noise) for
    every encoder. 202 with the run; poll `GET /v1/compare/{id}` for progress and scores."""
    # 1. Prompts, encoders and the reference, by name; the size of the run against its cap.
    if params.prompt_set is not None:
        if params.prompt_set not in PROMPT_SETS:
            raise UnknownNameError("prompt set", params.prompt_set, list(PROMPT_SETS), field="prompt_set")
        prompts = list(prompt_set(params.prompt_set))
    else:
        prompts = params.prompts
    reference = params.reference or (registry.teacher.name if registry.teacher else None)
    if reference is None:
        raise ValidationError("`reference` is required: the registry has no teacher to default to",
                              field="reference")
    for name in params.encoders:
        if name not in registry.encoders and name not in registry.routes:
            raise UnknownNameError("encoder", name, list(registry.encoders), field="encoders",
                                   routes=list(registry.routes))
    if reference not in registry.encoders:
        raise UnknownNameError("encoder", reference, list(registry.encoders), field="reference")
    encoders = params.encoders + ([reference] if reference not in params.encoders else [])
    jobs = len(prompts) * len(params.seeds) * len(encoders)
    if jobs > settings.max_compare_jobs:
        raise ValidationError(
            f"{len(prompts)} prompts x {len(params.seeds)} seeds x {len(encoders)} encoders = {jobs} jobs; the limit "
            f"is T2I_MAX_COMPARE_JOBS={settings.max_compare_jobs}", field="prompts")

    # 2. Every job would pass the checks of POST /v1/generate (each encoder, each prompt).
    base = GenerateParams(prompt=prompts[0], pipeline=params.pipeline, width=params.width, height=params.height,
                          steps=params.steps, guidance=params.guidance, loras=params.loras, control=params.control)
    for i, prompt in enumerate(prompts):
        try:
            await check(base.model_copy(update={"prompt": prompt}), registry=registry, queue=queue,
                        settings=settings)
        except T2IError as exc:
            if exc.field == "prompt":
                exc.field, exc.message = f"prompts.{i}", f"prompt {i}: {exc.message}"
            raise
    routed: dict[str, list[dict]] = {}  # a route's column: its decision for each prompt, made once, here
    for encoder in encoders:
        if encoder in registry.routes:
            for prompt in prompts:
                _, decision = await check(base.model_copy(update={"encoder": encoder, "prompt": prompt}),
                                          registry=registry, queue=queue, settings=settings)
                routed.setdefault(encoder, []).append(decision.model_dump())
        else:
            await check(base.model_copy(update={"encoder": encoder}), registry=registry, queue=queue,
                        settings=settings)
    depth = await queue.depth()
    if depth + jobs > settings.max_queue:
        raise OverloadedError(f"the run's {jobs} jobs do not fit in the queue ({depth} queued, "
                              f"T2I_MAX_QUEUE={settings.max_queue})", retry_after=5)

    # 3. The caller's limits; one upload of the control image for every job; then enqueue and store the run.
    await admit(queue, settings, caller, jobs=jobs, pixel_steps=jobs * pixel_steps(base, registry))
    if params.control is not None:
        base = base.model_copy(update={"control": await store_control(params.control, queue, settings,
                                                                      caller.owner)})
    shared = base.model_dump(exclude={"prompt", "encoder", "seed"})
    runs = _runs(request, caller)
    run_id = await runs.create(params, prompts, encoders, reference, shared, routed)
    view = await runs.view(run_id, _base(request))
    await track(queue, settings, caller, [r.job_id for c in view.cells for r in c.results.values()])
    response.headers["Location"] = f"/v1/compare/{run_id}"
    return view


@router.get("", response_model=list[CompareSummary])
async def list_runs(request: Request, caller: CallerDep,
                    limit: Annotated[int, Query(ge=1, le=500)] = 50) -> list[CompareSummary]:
    """This key's compare runs, newest first."""
    return await _runs(request, caller).list(limit)


@router.get("/{run_id}.csv", response_class=Response, responses={200: {"content": {"text/csv": {}}}})
async def export_csv(run_id: RunId, request: Request, caller: CallerDep) -> Response:
    """One row per prompt x seed x encoder, with every score."""
    text = await _runs(request, caller).csv(run_id, _base(request))
    return Response(text, media_type="text/csv",
                    headers={"Content-Disposition": f'attachment; filename="compare-{run_id}.csv"'})


@router.get("/{run_id}.json", response_model=CompareView)
async def export_json(run_id: RunId, request: Request, response: Response, caller: CallerDep) -> CompareView:
    """The run as JSON, as a download."""
    response.headers["Content-Disposition"] = f'attachment; filename="compare-{run_id}.json"'
    return await _runs(request, caller).view(run_id, _base(request))


@router.get("/{run_id}", response_model=CompareView)
async def get_run(run_id: RunId, request: Request, caller: CallerDep) -> CompareView:
    """Progress while running; per cell and per encoder, the images and their scores against the reference; a
    summary per encoder; the blind-vote win rates."""
    return await _runs(request, caller).view(run_id, _base(request))


@router.get("/{run_id}/pair", response_model=PairView, responses={204: {"description": "no pair left to vote on"}})
async def get_pair(run_id: RunId, request: Request, caller: CallerDep,
                   voter: Annotated[str, Query(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")]):
    """A blind pair for this voter: two encoders' images of one prompt and seed, sides random, names hidden."""
    pair = await _runs(request, caller).pair(run_id, voter, _base(request))
    return Response(status_code=204) if pair is None else pair


@router.get("/{run_id}/pairs/{token}/{side}", response_class=Response,
            responses={200: {"content": {"image/png": {}}}})
async def pair_image(run_id: RunId, token: RunId, side: Annotated[str, Path(pattern="^(left|right)$")],
                     request: Request, caller: CallerDep) -> Response:
    data = await _runs(request, caller).pair_image(run_id, token, side)
    return Response(data, media_type="image/png", headers={"Cache-Control": "no-store"})


@router.post("/{run_id}/votes", status_code=201, response_model=VoteResult, dependencies=[JsonBody])
async def vote(run_id: RunId, body: VoteParams, request: Request, caller: CallerDep) -> VoteResult:
    """Vote left, right or tie on a pair; the first vote of a voter on a pair counts, later ones do not."""
    return VoteResult(counted=await _runs(request, caller).vote(run_id, body.token, body.choice, body.voter))
