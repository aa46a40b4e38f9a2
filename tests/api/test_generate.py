"""Submitting jobs and reading results through a real API process, Redis and worker process."""

import base64
import io
import json
import time

import httpx
import pytest
from PIL import Image

from tests.pixels import pixel_diff
from tests.stack import JOB_CAP_S, wait_for
from service.models.generation import GenerationRequest


def run(api, body, encoder=None, **query):
    params = {"wait": "true", **query}
    if encoder:
        params["encoder"] = encoder
    response = api.post("/v1/generate", params=params, json=body)
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["status"] == "succeeded", job
    return job


def image_of(api, job, n=0) -> Image.Image:
    response = api.get(f"/v1/jobs/{job['id']}/images/{n}")
    assert response.status_code == 200
    return Image.open(io.BytesIO(response.content))


@pytest.mark.parametrize("pipeline", ["flux", "sd3"])
@pytest.mark.parametrize("encoder", ["t5-xxl", "t5-xxl-int8", "t5-xxl-fp8", "t5-xxl-nf4", "t5-large", "t5-base",
                                     "t5-small"])
def test_submit_then_image_for_every_pipeline_and_encoder(api, pipeline, encoder):
    job = run(api, {"prompt": "a red fox in snow", "pipeline": pipeline, "seed": 3}, encoder=encoder)
    assert (job["pipeline"], job["encoder"], job["seed"]) == (pipeline, encoder, 3)
    assert set(job["timings"]) == {"queue_wait", "adapters", "encode", "clip", "denoise", "decode", "total"}
    image = image_of(api, job)
    assert image.format == "PNG" and image.size == (64, 64)


def test_202_location_and_polling(api):
    response = api.post("/generate?encoder=t5-base", json={"prompt": "a lighthouse at night"})
    assert response.status_code == 202
    location = response.headers["location"]
    assert location == f"/v1/jobs/{response.json()['id']}"
    job = wait_for(lambda: (j := api.get(location).json())["status"] == "succeeded" and j, JOB_CAP_S, "the job")
    assert job["worker"] and job["attempts"] == 1 and job["images"][0].endswith(f"{location}/images/0")
    assert job["progress"] == {"step": 4, "steps": 4}


def test_service_image_equals_the_cli_image(api, generator):
    """The same seed and encoder through HTTP + queue + worker as through `t2i generate`'s code path."""
    job = run(api, {"prompt": "a red fox in snow", "seed": 7}, encoder="t5-base")
    local = generator.generate(GenerationRequest(prompt="a red fox in snow", pipeline="flux", encoder="t5-base",
                                                 seed=7)).images[0]
    mean, peak = pixel_diff(image_of(api, job), local)
    assert mean <= 0.5 and peak <= 2.0, (mean, peak)


def test_options_reach_the_worker(api):
    job = run(api, {"prompt": "two cats", "pipeline": "sd3", "width": 48, "height": 32, "steps": 2,
                    "guidance": 4.0, "negative_prompt": "blurry", "num_images": 2, "output_format": "webp"})
    assert len(job["images"]) == 2 and job["progress"] == {"step": 2, "steps": 2}
    response = api.get(job["images"][1].replace(str(api.base_url).rstrip("/"), ""))
    assert response.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(response.content)).size == (48, 32)
    jpeg = run(api, {"prompt": "a cat", "output_format": "jpeg"})
    assert api.get(f"/v1/jobs/{jpeg['id']}/images/0").headers["content-type"] == "image/jpeg"


def test_unseeded_jobs_report_their_seed_and_reproduce(api):
    first = run(api, {"prompt": "a blue house"})
    again = run(api, {"prompt": "a blue house", "seed": first["seed"]})
    assert pixel_diff(image_of(api, first), image_of(api, again))[1] == 0.0


def test_a_new_job_is_answered_from_what_was_stored_without_reading_it_back(api, stack):
    """A 202 for a new job is built from the fields the enqueue script stored and the position it answered: the
    API sends no HGETALL or ZRANK for it (Redis's MONITOR sees every command, a script's as `lua`), and the view is
    the one a later GET shows, but for what the worker has done since."""
    import threading

    seen: list[str] = []
    watching, stop = threading.Event(), threading.Event()

    def monitor():
        with stack.redis.monitor() as m:
            watching.set()
            for command in m.listen():
                if command.get("client_type") != "lua":  # a script's own commands are not round trips
                    seen.append(command["command"])
                if stop.is_set() and "t2i-test-monitor-end" in command["command"]:
                    return

    thread = threading.Thread(target=monitor, daemon=True)
    thread.start()
    assert watching.wait(30)
    stack.redis.ping()  # the monitor is attached before the request
    time.sleep(0.2)
    fresh = api.post("/v1/generate?encoder=t5-base", json={"prompt": "a boat at dawn", "seed": 5})
    stop.set()
    stack.redis.echo("t2i-test-monitor-end")
    thread.join(30)
    assert fresh.status_code == 202 and not thread.is_alive()
    job = fresh.json()
    reads = [c for c in seen if job["id"] in c and c.split()[0].upper() in ("HGETALL", "ZRANK", "HGET")]
    assert not reads, reads
    assert any(c.split()[0].upper() == "EVALSHA" and job["id"] in c for c in seen), seen  # the enqueue script
    assert job["status"] == "queued" and job["position"] >= 0 and job["attempts"] == 0 and job["images"] == []
    later = wait_for(lambda: (j := api.get(f"/v1/jobs/{job['id']}").json())["status"] == "succeeded" and j, JOB_CAP_S,
                     "the job")
    for key in ("id", "pipeline", "encoder", "seed", "created_at", "routing"):
        assert job[key] == later[key], key


def test_idempotency_key_returns_the_same_job(api):
    headers = {"Idempotency-Key": "retry-me-123"}
    a = api.post("/v1/generate", json={"prompt": "a tree"}, headers=headers).json()
    b = api.post("/v1/generate", json={"prompt": "a tree"}, headers=headers).json()
    c = api.post("/v1/generate", json={"prompt": "a tree"}).json()
    assert a["id"] == b["id"] != c["id"]


def test_server_sent_events_report_progress_to_the_end(api):
    job = api.post("/v1/generate?encoder=t5-small", json={"prompt": "a boat", "steps": 5}).json()
    events = []
    with api.stream("GET", f"/v1/jobs/{job['id']}/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert events[-1] == {"type": "status", "status": "succeeded"}
    steps = [e["step"] for e in events if e["type"] == "progress"]
    assert steps and steps[-1] == 5 and steps == sorted(steps)


def test_registry_endpoints_show_sizes_from_the_workers(api, stack):
    encoders = {e["name"]: e for e in api.get("/v1/encoders").json()}
    assert set(encoders) == {"t5-xxl", "t5-xxl-int8", "t5-xxl-fp8", "t5-xxl-nf4", "t5-large", "t5-base", "t5-small",
                             "auto"}  # routes are listed among the encoders, as `kind: route`
    assert [n for n, e in encoders.items() if e["kind"] == "route"] == ["auto"]
    assert encoders["t5-xxl"]["params"] > encoders["t5-small"]["params"] > 0
    # Quantized forms: the teacher's parameters, fewer bytes, and the method named (from the registry and the worker).
    for name, method in (("t5-xxl-int8", "int8-weight-only"), ("t5-xxl-nf4", "bnb-nf4")):
        assert encoders[name]["quantization"] == method and encoders[name]["params"] == encoders["t5-xxl"]["params"]
        assert 0 < encoders[name]["bytes"] < 0.6 * encoders["t5-xxl"]["bytes"]
    assert encoders["t5-base"]["width"] == 64 and stack.worker.info["id"] in encoders["t5-base"]["served_by"]
    run(api, {"prompt": "x"}, encoder="t5-large")
    encoders = {e["name"]: e for e in api.get("/v1/encoders").json()}
    wait_for(lambda: stack.worker.info["id"] in {e["name"]: e for e in api.get("/v1/encoders").json()}
             ["t5-large"]["resident_on"], JOB_CAP_S, "the heartbeat to show t5-large resident")
    pipelines = {p["name"]: p for p in api.get("/v1/pipelines").json()}
    assert pipelines["flux"]["kind"] == "flux" and pipelines["sd3"]["params"] > 0


def test_health_and_readiness(api):
    assert api.get("/healthz").json() == {"status": "ok"}
    ready = api.get("/readyz")
    assert ready.status_code == 200 and ready.json()["workers"] >= 1


def test_openapi_documents_both_generate_routes(api):
    paths = api.get("/openapi.json").json()["paths"]
    assert {"/v1/generate", "/generate", "/v1/jobs/{job_id}", "/v1/images/generations", "/v1/encoders"} <= set(paths)
    assert api.get("/docs").status_code == 200


def test_openai_client_works_unchanged(stack):
    from openai import OpenAI

    client = OpenAI(base_url=f"{stack.api_url}/v1", api_key="unused", max_retries=0)
    result = client.images.generate(model="sd3", prompt="a red fox", n=2, size="64x64",
                                    response_format="b64_json", extra_body={"encoder": "t5-base", "seed": 5})
    assert len(result.data) == 2
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert image.size == (64, 64)
    urls = client.images.generate(model="flux", prompt="a red fox", size="64x64", response_format="url",
                                  extra_body={"encoder": "t5-small"})
    fetched = httpx.get(urls.data[0].url)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    quantized = client.images.generate(model="flux", prompt="a red fox", size="64x64", response_format="b64_json",
                                       extra_body={"encoder": "t5-xxl-int8", "seed": 5})
    assert Image.open(io.BytesIO(base64.b64decode(quantized.data[0].b64_json))).size == (64, 64)


def test_loras_interleave_on_one_worker(api, generator):
    """A(lora), B(none), C(lora) on the same worker: A == C, and B equals a run with no adapter ever loaded."""
    body = {"prompt": "a red fox in snow", "seed": 11}
    a = run(api, {**body, "loras": [{"name": "flux-style", "scale": 1.0}]}, encoder="t5-small")
    b = run(api, body, encoder="t5-small")
    c = run(api, {**body, "loras": [{"name": "flux-style"}]}, encoder="t5-small")
    assert pixel_diff(image_of(api, a), image_of(api, c))[1] == 0.0
    fresh = generator.generate(GenerationRequest(prompt=body["prompt"], pipeline="flux", encoder="t5-small",
                                                 seed=11)).images[0]
    assert pixel_diff(image_of(api, b), fresh)[0] <= 0.5
    assert pixel_diff(image_of(api, a), image_of(api, b))[0] > 2.0
    assert {l["name"]: l["pipeline"] for l in api.get("/v1/loras").json()} == {"flux-style": "flux",
                                                                              "sd3-style": "sd3"}
