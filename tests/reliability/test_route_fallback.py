"""`encoder=auto` under load when the teacher's only worker stops: requests to the route keep succeeding through its
fallback, requests naming the teacher get 503, and no accepted job is lost. Real API, Redis and worker processes on
127.0.0.1; `T2I_RELIABILITY_FULL=1` runs the size docs/routing.md quotes."""

from __future__ import annotations

import threading
from collections import Counter

import httpx

from tests.reliability.test_chaos import (FULL, classify, record, redis_aof, settle, stall_bound,  # noqa: F401
                                          stream_entries)
from tests.stack import START_CAP_S, Stack, wait_for

TEXT, SHAPE = "a sign reading 'cat'", "two green triangles"
KINDS = (("auto", TEXT), ("auto", SHAPE), ("t5-xxl", TEXT))  # what the clients send, in turn


def test_auto_falls_back_when_the_teachers_only_worker_stops(redis_aof, models_file, tmp_path):
    requests, clients = (300, 8) if FULL else (60, 4)
    stack = Stack(redis_aof.url, models_file, tmp_path)
    try:
        api_url = stack.start_api()
        flux = {"T2I_WORKER_PIPELINES": "flux"}
        teacher = stack.start_worker({**flux, "T2I_WORKER_ENCODERS": "t5-xxl"})
        students = stack.start_worker({**flux, "T2I_WORKER_ENCODERS": "t5-base,t5-large"})
        with httpx.Client(base_url=api_url, timeout=60) as api:
            # 1. Both workers live: text on the teacher, as its rule says; one job time for the bounds below.
            before = api.post("/v1/generate?wait=true&encoder=auto", json={"prompt": TEXT, "steps": 2}).json()
            assert (before["status"], before["encoder"], before["routing"]["reason"]) == \
                ("succeeded", "t5-xxl", "written-text"), before
            job_s = api.post("/v1/generate?wait=true&encoder=t5-base",
                             json={"prompt": SHAPE, "steps": 2}).json()["timings"]["total"]
            stall_s = stall_bound(students.info["startup_s"], job_s)

            # 2. The teacher's only worker stops (SIGTERM: it finishes what it runs and leaves the worker list).
            assert teacher.stop() == 0
            wait_for(lambda: not next(e for e in api.get("/v1/encoders").json() if e["name"] == "t5-xxl")["served_by"],
                     START_CAP_S, "the API to see the teacher's worker gone")

        # 3. Load: clients in parallel, each sending its share of route and teacher requests in turn.
        outcomes: list[tuple[str, str, int, str | None]] = []
        lock = threading.Lock()

        def client(index: int, n: int) -> None:
            with httpx.Client(base_url=api_url, timeout=60) as api:
                for k in range(n):
                    encoder, prompt = KINDS[(index + k) % len(KINDS)]
                    response = api.post(f"/v1/generate?encoder={encoder}", json={"prompt": prompt, "steps": 2,
                                                                                 "seed": k})
                    job_id = response.json()["id"] if response.status_code == 202 else None
                    with lock:
                        outcomes.append((encoder, prompt, response.status_code, job_id))

        shares = [requests // clients + (c < requests % clients) for c in range(clients)]
        threads = [threading.Thread(target=client, args=(c, n)) for c, n in enumerate(shares)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()  # every request is bounded by the client's timeout, and each client sends a fixed number

        accepted = [o for o in outcomes if o[3] is not None]
        with httpx.Client(base_url=api_url, timeout=60) as api:
            views = settle(api, [o[3] for o in accepted], stall_s)
        groups = classify(views, stream_entries(stack.redis))
    finally:
        stack.stop_all()

    statuses = Counter((encoder, prompt, status) for encoder, prompt, status, _ in outcomes)
    ran = Counter((encoder, prompt, views[job_id]["encoder"], (views[job_id].get("routing") or {}).get("reason"))
                  for encoder, prompt, _, job_id in accepted)
    figures = {"requests": len(outcomes), "clients": clients,
               "statuses": {f"{e} | {p} | {s}": k for (e, p, s), k in sorted(statuses.items())},
               "ran_on": {f"{e} | {p} -> {r} ({why})": k for (e, p, r, why), k in sorted(ran.items())},
               **{status: len(ids) for status, ids in groups.items()}}
    record("route_fallback", figures)
    assert len(outcomes) == requests
    # every request to the route was accepted; every request naming the stopped teacher got the usual 503
    assert {s for e, _, s, _ in outcomes if e == "auto"} == {202}, figures
    assert {s for e, _, s, _ in outcomes if e == "t5-xxl"} == {503}, figures
    # text went to the first live fallback (the int8 teacher and the teacher have no worker), shapes to the default
    assert set(ran) == {("auto", TEXT, "t5-large", "fallback-no-worker"), ("auto", SHAPE, "t5-base", "default")}, \
        figures
    detail = next(views[j]["routing"]["detail"] for e, p, _, j in accepted if p == TEXT)
    assert detail == "t5-xxl: no live worker; t5-xxl-int8: no live worker", detail
    # none lost, none left waiting, none failed
    assert len(groups["succeeded"]) == len(accepted) and not groups["pending"] and not groups["lost"], figures


def test_a_deep_queue_sends_the_route_to_its_fallback(redis_aof, models_file, demo_dir, tmp_path):
    """`max_queue_depth: 1`: while t5-base's only worker runs a slow job with three more waiting behind it, a shape
    prompt to the route runs on the fallback t5-large and says why; once the queue has drained it is t5-base again.
    (Three wait, not two, so that the depth is still over the bound if the first job ends just before the request.)"""
    import yaml

    from service.models.registry import with_absolute_sources

    models = with_absolute_sources(yaml.safe_load(open(models_file).read()), demo_dir)
    models["routes"] = {"auto": {"rules": [{"name": "written-text", "text": True, "encoder": "t5-xxl"}],
                                 "default": "t5-base", "fallback": ["t5-large"], "max_queue_depth": 1}}
    (tmp_path / "models.yaml").write_text(yaml.safe_dump(models))
    stack = Stack(redis_aof.url, tmp_path / "models.yaml", tmp_path)
    try:
        api_url = stack.start_api()
        flux = {"T2I_WORKER_PIPELINES": "flux", "T2I_MAX_BATCH": "1"}
        base = stack.start_worker({**flux, "T2I_WORKER_ENCODERS": "t5-base"})
        stack.start_worker({**flux, "T2I_WORKER_ENCODERS": "t5-large"})
        slow = {"prompt": "a slow job", "width": 256, "height": 256, "steps": 40}  # ~1.5 s on a quiet core
        with httpx.Client(base_url=api_url, timeout=60) as api:
            queued = [api.post("/v1/generate?encoder=t5-base", json={**slow, "seed": k}).json()["id"]
                      for k in range(4)]
            wait_for(lambda: api.get(f"/v1/jobs/{queued[0]}").json()["status"] == "running", START_CAP_S,
                     "the first long job to start")
            deep = api.post("/v1/generate?wait=true&encoder=auto", json={"prompt": SHAPE, "steps": 2}).json()
            assert deep["status"] == "succeeded" and deep["encoder"] == "t5-large", deep
            assert (deep["routing"]["picked"], deep["routing"]["reason"]) == ("t5-base", "fallback-queue-depth")
            assert deep["routing"]["detail"] in {f"t5-base: {n} jobs waiting > max_queue_depth 1" for n in (2, 3)}, \
                deep["routing"]
            # no job ending for the time of a start-up and four slow jobs, forty times slower than a quiet core
            views = settle(api, queued, stall_bound(base.info["startup_s"], 60.0))
            assert all(v["status"] == "succeeded" for v in views.values()), views
            calm = api.post("/v1/generate?wait=true&encoder=auto", json={"prompt": SHAPE, "steps": 2}).json()
            assert (calm["encoder"], calm["routing"]["reason"]) == ("t5-base", "default"), calm
    finally:
        stack.stop_all()
