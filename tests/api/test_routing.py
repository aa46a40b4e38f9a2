"""`encoder=auto` through a real API process, Redis and worker: each job says where it ran and why, everywhere an
encoder name is accepted (REST, the OpenAI endpoint, compare runs), with metrics and the models listing."""

import pytest

from tests.api.test_compare import finished

TEXT, SHAPE = "a sign reading 'cat'", "two green triangles"


def generate(api, prompt, encoder="auto", **body):
    response = api.post(f"/v1/generate?wait=true&encoder={encoder}", json={"prompt": prompt, "seed": 5, **body})
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["status"] == "succeeded", job
    return job


def test_text_runs_on_the_teacher_and_a_shape_prompt_on_the_student_each_saying_why(api):
    text = generate(api, TEXT)
    assert text["encoder"] == "t5-xxl"
    assert text["routing"] == {"route": "auto", "encoder": "t5-xxl", "picked": "t5-xxl", "rule": "written-text",
                               "reason": "written-text", "detail": None}
    shape = generate(api, SHAPE)
    assert shape["encoder"] == "t5-base"
    assert (shape["routing"]["rule"], shape["routing"]["reason"]) == ("default", "default")
    # the job stored says the same when read back, and a routed job is the fixed encoder's job, pixel for pixel
    assert api.get(f"/v1/jobs/{text['id']}").json()["routing"] == text["routing"]
    fixed = generate(api, SHAPE, encoder="t5-base")
    assert fixed["routing"] is None
    assert api.get(f"/v1/jobs/{fixed['id']}/images/0").content == api.get(f"/v1/jobs/{shape['id']}/images/0").content


def test_the_same_prompt_routes_the_same_way(api):
    encoders = {generate(api, TEXT, steps=1)["encoder"] for _ in range(3)}
    assert encoders == {"t5-xxl"}


def test_the_openai_endpoint_takes_a_route(api):
    response = api.post("/v1/images/generations", json={"prompt": TEXT, "encoder": "auto",
                                                        "response_format": "url"})
    assert response.status_code == 200, response.text
    job_id = response.json()["data"][0]["url"].split("/v1/jobs/")[1].split("/")[0]
    assert api.get(f"/v1/jobs/{job_id}").json()["routing"]["encoder"] == "t5-xxl"


def test_decisions_are_counted_with_route_encoder_and_reason(api):
    generate(api, SHAPE, steps=1)
    metrics = api.get("/metrics").text
    line = next(l for l in metrics.splitlines()
                if l.startswith('t2i_route_decisions_total{encoder="t5-base",reason="default",route="auto"}'))
    assert float(line.split()[-1]) >= 1


def test_encoders_list_the_routes_with_their_rules(api):
    listed = {e["name"]: e for e in api.get("/v1/encoders").json()}
    auto = listed["auto"]
    assert auto["kind"] == "route" and auto["served_by"]
    assert auto["route"] == {"rules": ["written-text: asks for written text -> t5-xxl"], "default": "t5-base",
                             "fallback": ["t5-xxl-int8", "t5-xxl", "t5-large", "t5-base"], "max_queue_depth": None}
    assert listed["t5-base"]["route"] is None


@pytest.mark.parametrize("where", ["query", "body", "openai"])
def test_an_unknown_route_gets_422_listing_encoders_and_routes(api, where):
    if where == "openai":
        response = api.post("/v1/images/generations", json={"prompt": TEXT, "encoder": "fastest"})
    elif where == "query":
        response = api.post("/v1/generate?encoder=fastest", json={"prompt": TEXT})
    else:
        response = api.post("/v1/generate", json={"prompt": TEXT, "encoder": "fastest"})
    assert response.status_code == 422, response.text
    message = response.json()["error"]
    assert "unknown encoder 'fastest'" in message and "t5-base" in message and "routes: auto" in message


def test_a_route_is_a_column_of_a_compare_run(api):
    response = api.post("/v1/compare", json={"prompts": [TEXT, SHAPE], "encoders": ["auto", "t5-base"],
                                             "seeds": [0], "steps": 1})
    assert response.status_code == 202, response.text
    run = finished(api, response.json()["id"])
    text, shape = sorted(run["cells"], key=lambda c: c["prompt_index"])
    assert text["results"]["auto"]["ran_on"] == "t5-xxl"
    assert shape["results"]["auto"]["ran_on"] == "t5-base"
    auto = next(s for s in run["summary"] if s["encoder"] == "auto")
    assert auto["routed"] == {"t5-base": 1, "t5-xxl": 1} and auto["succeeded"] == 2
    sizes = {s["encoder"]: s["bytes"] for s in run["summary"]}
    teacher = next(e for e in api.get("/v1/encoders").json() if e["name"] == "t5-xxl")["bytes"]
    assert auto["bytes"] == round((teacher + sizes["t5-base"]) / 2)
    # a route cannot be the reference: scores are against one fixed encoder
    response = api.post("/v1/compare", json={"prompts": [SHAPE], "encoders": ["t5-base", "t5-small"],
                                             "reference": "auto"})
    assert response.status_code == 422 and response.json()["field"] == "reference"


def test_queue_depth_per_encoder_is_the_undelivered_jobs_of_its_stream(tmp_path):
    """What `max_queue_depth` compares against, read from a real server: jobs queued for each encoder and not yet
    handed to a worker (a stream no job has reached counts 0)."""
    import asyncio

    import redis
    import redis.asyncio as aioredis

    from service import queue
    from service.api.queue_client import QueueClient
    from service.redis_server import EmbeddedRedis

    with EmbeddedRedis(data_dir=tmp_path) as server:
        async def scenario() -> list[dict[str, int]]:
            client = aioredis.Redis.from_url(server.url)
            queue_client = QueueClient(client, max_queue=100, result_ttl_s=60)
            for k in range(3):
                await queue_client.enqueue({"prompt": f"p{k}", "pipeline": "flux", "encoder": "t5-base"})
            await queue_client.enqueue({"prompt": "q", "pipeline": "flux", "encoder": "t5-large"})
            seen = [await queue_client.waiting("flux", ["t5-base", "t5-large", "t5-xxl"])]
            # a worker takes one t5-base job: it is no longer waiting
            redis.Redis.from_url(server.url).xreadgroup(queue.GROUP, "w1", {queue.stream_key("flux", "t5-base"): ">"},
                                                        count=1)
            seen.append(await queue_client.waiting("flux", ["t5-base", "t5-large"]))
            await client.aclose()
            return seen

        before, after = asyncio.run(scenario())
    assert before == {"t5-base": 3, "t5-large": 1, "t5-xxl": 0}
    assert after == {"t5-base": 2, "t5-large": 1}


def test_a_route_reads_the_workers_again_when_a_candidate_is_missing_from_the_list_it_read_a_moment_ago(
        demo_dir, tmp_path):
    """The API reuses the live-worker list for up to a second. When that list lacks one of the encoders a prompt could
    be routed to, the route reads it again before deciding, so a fallback worker that has just started is seen. A
    worker cannot be started on cue inside that second, so the new worker's registration is written here as its first
    heartbeat writes it (simulated: the worker's `Consumer.heartbeat` on a real server, no worker process)."""
    import asyncio

    import redis
    import redis.asyncio as aioredis
    import yaml

    from service.api.queue_client import QueueClient
    from service.api.submission import check
    from service.jobs import GenerateParams
    from service.models.registry import Registry, with_absolute_sources
    from service.redis_server import EmbeddedRedis
    from service.settings import Settings
    from service.worker.consumer import Consumer

    models = with_absolute_sources(yaml.safe_load((demo_dir / "models.yaml").read_text()), demo_dir)
    models["routes"] = {"auto": {"rules": [{"name": "written-text", "text": True, "encoder": "t5-xxl"}],
                                 "default": "t5-base", "fallback": ["t5-large"], "max_queue_depth": 1}}
    (tmp_path / "models.yaml").write_text(yaml.safe_dump(models))
    registry = Registry.from_file(tmp_path / "models.yaml")

    def register(sync_client, worker_id: str, encoder: str) -> None:
        Consumer(sync_client, worker_id, [], visibility_timeout_s=60, result_ttl_s=60).heartbeat(
            {"id": worker_id, "pipelines": {"flux": {"size_multiple": 16}}, "encoders": {encoder: {}}}, ttl_s=60)

    with EmbeddedRedis(data_dir=tmp_path / "redis") as server:
        sync_client = redis.Redis.from_url(server.url)
        register(sync_client, "base-worker", "t5-base")

        async def scenario():
            client = aioredis.Redis.from_url(server.url)
            queue_client = QueueClient(client, max_queue=100, result_ttl_s=60)
            for k in range(3):  # three jobs wait for t5-base: over the route's bound of 1
                await queue_client.enqueue({"prompt": f"p{k}", "pipeline": "flux", "encoder": "t5-base"})
            assert [w["id"] for w in await queue_client.live_workers()] == ["base-worker"]  # the list, as read now
            register(sync_client, "large-worker", "t5-large")  # the fallback's worker starts a moment later
            decided = await check(GenerateParams(prompt="two green triangles", encoder="auto"), registry=registry,
                                  queue=queue_client, settings=Settings())
            await client.aclose()
            return decided

        encoder, decision = asyncio.run(scenario())
        sync_client.close()
    assert encoder == "t5-large" and decision.reason == "fallback-queue-depth", decision
