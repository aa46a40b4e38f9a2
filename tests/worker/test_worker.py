"""Queue and worker guarantees with real worker processes: redelivery after SIGKILL, cancellation, bounds,
the error boundary, graceful SIGTERM, and per-encoder metrics."""

import re
import shutil
import signal

import httpx
import pytest
import yaml

from service import queue
from service.models.registry import with_absolute_sources
from tests.stack import Stack, wait_for

LONG_JOB = {"prompt": "a long job", "width": 512, "height": 512, "steps": 60, "seed": 1}  # ~8 s on one CPU thread


def job(api, job_id):
    return api.get(f"/v1/jobs/{job_id}").json()


def running(api, job_id, min_step=1):
    return wait_for(lambda: (j := job(api, job_id))["status"] == "running"
                    and (j.get("progress") or {}).get("step", 0) >= min_step and j, 60, f"job {job_id} to run")


def finished(api, job_id, timeout_s=120):
    return wait_for(lambda: (j := job(api, job_id))["status"] in ("succeeded", "failed", "cancelled") and j,
                    timeout_s, f"job {job_id} to finish", interval_s=0.2)


def behind_a_running_job(api):
    """Queue a 20-step job on t5-base and wait until it runs: jobs queued on t5-small meanwhile wait behind it."""
    running(api, api.post("/v1/generate?encoder=t5-base", json={**LONG_JOB, "steps": 20}).json()["id"])


@pytest.fixture()
def own_stack(redis_server, models_file, tmp_path):
    """A separate API + workers on their own Redis database, so killing workers does not disturb other tests."""
    url = redis_server.url.rsplit("/", 1)[0] + "/1"
    stack = Stack(url, models_file, tmp_path)
    stack.redis.flushdb()
    yield stack
    stack.stop_all()
    stack.redis.flushdb()


def test_a_job_survives_its_worker_being_killed(own_stack):
    api_url = own_stack.start_api()
    first, second = own_stack.start_worker(), own_stack.start_worker()
    with httpx.Client(base_url=api_url, timeout=30) as api:
        job_id = api.post("/v1/generate?encoder=t5-small", json=LONG_JOB).json()["id"]
        victim_id = running(api, job_id)["worker"]
        victim = first if first.info["id"] == victim_id else second
        survivor = second if victim is first else first
        victim.stop(signal.SIGKILL)  # no cleanup, no ack: as a power loss
        done = finished(api, job_id)
        assert done["status"] == "succeeded", done
        assert done["worker"] == survivor.info["id"] and done["attempts"] == 2
        assert len(done["images"]) == 1 and api.get(f"/v1/jobs/{job_id}/images/0").status_code == 200
        metrics = httpx.get(survivor.info["metrics_url"]).text
        assert 't2i_jobs_redelivered_total{encoder="t5-small",pipeline="flux"} 1.0' in metrics


def test_cancel_queued_and_running_then_keep_serving(own_stack):
    api_url = own_stack.start_api()
    own_stack.start_worker({"T2I_MAX_BATCH": "1"})  # one job at a time: the second stays queued
    with httpx.Client(base_url=api_url, timeout=30) as api:
        first = api.post("/v1/generate", json=LONG_JOB).json()["id"]
        second = api.post("/v1/generate", json=LONG_JOB).json()["id"]
        running(api, first)
        assert job(api, second)["position"] == 0
        cancelled = api.delete(f"/v1/jobs/{second}")
        assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"
        api.delete(f"/v1/jobs/{first}")
        done = finished(api, first, timeout_s=30)
        assert done["status"] == "cancelled" and done["error"]["error_type"] == "cancelled"
        assert done["progress"]["step"] < LONG_JOB["steps"]  # stopped at a step, not run to the end
        after = api.post("/v1/generate?wait=true", json={"prompt": "next"}).json()
        assert after["status"] == "succeeded"
        never = job(api, second)
        assert never["status"] == "cancelled" and never["started_at"] is None and never["attempts"] == 0


def test_a_cancel_reaches_the_worker_between_its_progress_reports(own_stack):
    """With no progress report due, the worker reads no cancel flag during the run: the job can stop at a step
    only because the cancel script told its worker on the worker's cancel channel."""
    api_url = own_stack.start_api()
    own_stack.start_worker({"T2I_PROGRESS_INTERVAL_S": "3600"})
    with httpx.Client(base_url=api_url, timeout=30) as api:
        job_id = api.post("/v1/generate", json=LONG_JOB).json()["id"]
        running(api, job_id, min_step=0)
        assert api.delete(f"/v1/jobs/{job_id}").json()["status"] == "running"  # cancelling
        done = finished(api, job_id, timeout_s=30)
        assert done["status"] == "cancelled" and done["error"]["error_type"] == "cancelled"
        stopped = re.search(r"at denoising step (\d+) of (\d+)", done["error"]["error"])
        assert stopped and 1 <= int(stopped[1]) < int(stopped[2]) == LONG_JOB["steps"], done
        assert api.post("/v1/generate?wait=true", json={"prompt": "next"}).json()["status"] == "succeeded"


def test_full_queue_answers_429_with_retry_after(own_stack):
    api_url = own_stack.start_api({"T2I_MAX_QUEUE": "2"})
    own_stack.start_worker()
    with httpx.Client(base_url=api_url, timeout=30) as api:
        busy = api.post("/v1/generate", json=LONG_JOB).json()["id"]
        running(api, busy)
        queued = [api.post("/v1/generate", json=LONG_JOB) for _ in range(2)]
        assert [r.status_code for r in queued] == [202, 202]
        refused = api.post("/v1/generate", json=LONG_JOB)
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error_type"] == "overloaded" and "T2I_MAX_QUEUE=2" in refused.json()["error"]
        for r in queued:
            api.delete(f"/v1/jobs/{r.json()['id']}")
        api.delete(f"/v1/jobs/{busy}")
        assert api.post("/v1/generate", json={"prompt": "fits again"}).status_code == 202


def test_a_failing_job_fails_readably_and_the_worker_keeps_serving(own_stack, demo_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(demo_dir / "encoders" / "t5-base", broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    models = with_absolute_sources(yaml.safe_load((demo_dir / "models.yaml").read_text()), demo_dir)
    models["encoders"]["t5-broken"] = {"kind": "student", "source": str(broken), "max_sequence_length": 32}
    (tmp_path / "models.yaml").write_text(yaml.safe_dump(models))
    own_stack.models_file = str(tmp_path / "models.yaml")
    api_url = own_stack.start_api()
    worker = own_stack.start_worker()
    with httpx.Client(base_url=api_url, timeout=30) as api:
        failed = api.post("/v1/generate?wait=true&encoder=t5-broken", json={"prompt": "x"}).json()
        assert failed["status"] == "failed" and failed["error"]["error_type"] == "model"
        assert "t5-broken" in failed["error"]["error"] and "cannot load weights" in failed["error"]["error"]
        ok = api.post("/v1/generate?wait=true&encoder=t5-base", json={"prompt": "x"}).json()
        assert ok["status"] == "succeeded" and ok["worker"] == worker.info["id"]
    metrics = httpx.get(worker.info["metrics_url"]).text
    assert 't2i_jobs_total{encoder="t5-broken",pipeline="flux",status="failed"} 1.0' in metrics


def test_sigterm_finishes_the_job_in_flight_and_exits_0(own_stack):
    api_url = own_stack.start_api()
    worker = own_stack.start_worker()
    with httpx.Client(base_url=api_url, timeout=30) as api:
        job_id = api.post("/v1/generate", json={**LONG_JOB, "steps": 30}).json()["id"]
        running(api, job_id)
        assert worker.stop(signal.SIGTERM, timeout_s=60) == 0
        assert job(api, job_id)["status"] == "succeeded"
        assert own_stack.redis.zcard(queue.WORKERS) == 0  # it left; no stale heartbeat
        refused = api.post("/v1/generate", json={"prompt": "nobody home"})
        assert refused.status_code == 503 and "no live worker serves" in refused.json()["error"]
        assert api.get("/readyz").status_code == 503


def test_worker_serving_a_subset_refuses_others_up_front(own_stack):
    api_url = own_stack.start_api()
    own_stack.start_worker({"T2I_WORKER_ENCODERS": "t5-small", "T2I_WORKER_PIPELINES": "sd3"})
    with httpx.Client(base_url=api_url, timeout=30) as api:
        refused = api.post("/v1/generate?encoder=t5-base", json={"prompt": "x", "pipeline": "sd3"})
        assert refused.status_code == 503 and "'t5-base'" in refused.json()["error"]
        ok = api.post("/v1/generate?encoder=t5-small&wait=true", json={"prompt": "x", "pipeline": "sd3"})
        assert ok.json()["status"] == "succeeded"


def test_metrics_carry_the_encoder_label(api, stack):
    for encoder in ("t5-base", "t5-xxl"):
        assert api.post(f"/v1/generate?wait=true&encoder={encoder}", json={"prompt": "m"}).json()["status"] == \
            "succeeded"
    text = httpx.get(stack.worker.info["metrics_url"]).text
    for encoder in ("t5-base", "t5-xxl"):
        assert f't2i_encode_duration_seconds_count{{encoder="{encoder}"}}' in text
        assert f't2i_job_duration_seconds_count{{encoder="{encoder}",pipeline="flux"}}' in text
        assert f't2i_encoder_resident_bytes{{device="cpu",encoder="{encoder}"}}' in text
        assert f't2i_job_peak_memory_bytes{{device="cpu",encoder="{encoder}",pipeline="flux"}}' in text
    assert 't2i_denoise_duration_seconds_count{pipeline="flux"}' in text
    assert "t2i_queue_wait_duration_seconds_count" in text
    assert 't2i_adapter_jobs_total{adapters="without",pipeline="flux"}' in text
    api_metrics = api.get("/metrics").text
    assert "t2i_queue_depth" in api_metrics and "t2i_workers_live" in api_metrics
    assert 't2i_api_requests_total{endpoint="generate",status="accepted"}' in api_metrics
    assert httpx.get(stack.worker.info["metrics_url"].replace("/metrics", "/healthz")).json() == {"status": "ok"}


def test_queued_jobs_are_denoised_in_one_batch_with_their_own_images(own_stack, generator):
    """Jobs queued behind a running one, on the same stream, run together in one denoising call; each gets the image
    a lone run of its request gives."""
    from PIL import Image
    import io

    from service.models.generation import GenerationRequest
    from tests.pixels import pixel_diff

    api_url = own_stack.start_api()
    own_stack.start_worker({"T2I_MAX_BATCH": "4"})
    with httpx.Client(base_url=api_url, timeout=30) as api:
        behind_a_running_job(api)
        ids = [api.post("/v1/generate?encoder=t5-small", json={"prompt": f"a fox {k}", "seed": k}).json()["id"]
               for k in range(3)]
        jobs = [finished(api, i) for i in ids]
        assert all(j["status"] == "succeeded" for j in jobs), jobs
        assert {j["timings"]["denoise"] for j in jobs} == {jobs[0]["timings"]["denoise"]}  # one call
        for k, j in enumerate(jobs):
            image = Image.open(io.BytesIO(api.get(f"/v1/jobs/{j['id']}/images/0").content))
            alone = generator.generate(GenerationRequest(prompt=f"a fox {k}", pipeline="flux", encoder="t5-small",
                                                         seed=k)).images[0]
            mean, peak = pixel_diff(image, alone)
            assert mean <= 0.5 and peak <= 2.0, (k, mean, peak)
        metrics = httpx.get(own_stack.procs[-1].info["metrics_url"]).text
        # two calls: the blocker alone, then the three together
        assert 't2i_batch_size_count{pipeline="flux"} 2.0' in metrics
        assert 't2i_batch_size_sum{pipeline="flux"} 4.0' in metrics


def test_one_job_of_a_batch_can_be_cancelled(own_stack):
    api_url = own_stack.start_api()
    own_stack.start_worker({"T2I_MAX_BATCH": "4"})
    with httpx.Client(base_url=api_url, timeout=30) as api:
        behind_a_running_job(api)
        keep, drop = (api.post("/v1/generate?encoder=t5-small", json={**LONG_JOB, "steps": 30, "seed": k}).json()["id"]
                      for k in (1, 2))
        running(api, drop)
        assert api.delete(f"/v1/jobs/{drop}").json()["status"] == "running"  # cancelling
        assert finished(api, drop)["status"] == "cancelled"
        assert finished(api, keep)["status"] == "succeeded"


def test_a_job_cancelled_while_queued_is_dropped_from_its_batch_unrun(own_stack):
    """The worker starts a batch from the requests its stream entries carry, before its start scripts answer; the
    answer for a job cancelled while queued drops that job (nothing stored, never started, its entry released) and
    its batch mate is stored as usual."""
    api_url = own_stack.start_api()
    own_stack.start_worker({"T2I_MAX_BATCH": "4"})
    with httpx.Client(base_url=api_url, timeout=30) as api:
        behind_a_running_job(api)
        keep, drop = (api.post("/v1/generate?encoder=t5-small", json={"prompt": f"a fox {k}", "seed": k}).json()["id"]
                      for k in (1, 2))
        assert api.delete(f"/v1/jobs/{drop}").json()["status"] == "cancelled"
        kept = finished(api, keep)
        assert kept["status"] == "succeeded" and kept["batch_size"] == 2, kept  # denoised together
        dropped = job(api, drop)
        assert dropped["status"] == "cancelled" and dropped["started_at"] is None and dropped["attempts"] == 0
        assert dropped["images"] == [] and api.get(f"/v1/jobs/{drop}/images/0").status_code == 404
        stream = queue.stream_key("flux", "t5-small")
        assert wait_for(lambda: own_stack.redis.xlen(stream) == 0, 30, "the dropped job's entry to be released")
        assert own_stack.redis.xpending(stream, queue.GROUP)["pending"] == 0


def test_a_stream_entry_with_the_job_id_only_still_runs(own_stack):
    """An entry queued by an API from before entries carried requests holds the job id only: the worker starts such
    a job with a round trip and reads its request from the job."""
    api_url = own_stack.start_api()
    own_stack.start_worker({"T2I_MAX_BATCH": "1"})
    with httpx.Client(base_url=api_url, timeout=30) as api:
        behind_a_running_job(api)
        job_id = api.post("/v1/generate?encoder=t5-small", json={"prompt": "an old entry", "seed": 3}).json()["id"]
        stream = queue.stream_key("flux", "t5-small")
        [(entry_id, fields)] = own_stack.redis.xrange(stream)
        assert fields[b"job"].decode() == job_id and b"request" in fields
        own_stack.redis.xdel(stream, entry_id)
        own_stack.redis.xadd(stream, {"job": job_id})
        done = finished(api, job_id)
        assert done["status"] == "succeeded" and done["seed"] == 3 and done["attempts"] == 1, done


def test_a_server_that_lost_the_start_script_still_starts_the_job(own_stack):
    """The start script is sent by its hash, without waiting for the answer; a server that has forgotten the script
    (restarted without persistence, or flushed) answers NOSCRIPT at the first step, and the worker starts the job
    again with a round trip that loads the script."""
    api_url = own_stack.start_api()
    own_stack.start_worker({"T2I_MAX_BATCH": "1"})
    with httpx.Client(base_url=api_url, timeout=60) as api:
        assert api.post("/v1/generate?wait=true", json={"prompt": "before", "seed": 1}).json()["status"] == "succeeded"
        own_stack.redis.script_flush()
        done = api.post("/v1/generate?wait=true", json={"prompt": "after the flush", "seed": 2}).json()
        assert done["status"] == "succeeded" and done["attempts"] == 1 and done["images"], done


def test_the_embedding_cache_is_shared_by_workers_and_gives_the_same_image(own_stack):
    api_url = own_stack.start_api()
    first = own_stack.start_worker({"T2I_WORKER_ENCODERS": "t5-base"})
    body = {"prompt": "a cached lighthouse", "seed": 3}
    with httpx.Client(base_url=api_url, timeout=30) as api:
        a = api.post("/v1/generate?wait=true&encoder=t5-base", json=body).json()
        first.stop()
        second = own_stack.start_worker({"T2I_WORKER_ENCODERS": "t5-base"})
        b = api.post("/v1/generate?wait=true&encoder=t5-base", json=body).json()
        c = api.post("/v1/generate?wait=true&encoder=t5-base", json=body).json()
        assert a["worker"] != b["worker"] == c["worker"]
        images = [api.get(f"/v1/jobs/{j['id']}/images/0").content for j in (a, b, c)]
        assert images[0] == images[1] == images[2]
        metrics = httpx.get(second.info["metrics_url"]).text
        assert 't2i_embedding_cache_requests_total{encoder="t5-base",result="hit_shared"}' in metrics  # from Redis
        assert 't2i_embedding_cache_requests_total{encoder="t5-base",result="hit_local"}' in metrics  # then in memory
        assert own_stack.redis.zcard(queue.EMBEDDING_LRU) >= 1


def test_the_embedding_cache_can_be_turned_off(own_stack):
    api_url = own_stack.start_api()
    worker = own_stack.start_worker({"T2I_EMBEDDING_CACHE": "false"})
    with httpx.Client(base_url=api_url, timeout=30) as api:
        for _ in range(2):
            assert api.post("/v1/generate?wait=true&encoder=t5-base", json={"prompt": "p"}).json()["status"] == \
                "succeeded"
    assert "t2i_embedding_cache_requests_total{" not in httpx.get(worker.info["metrics_url"]).text
    assert own_stack.redis.zcard(queue.EMBEDDING_LRU) == 0


def test_a_wait_outlasts_a_job_longer_than_redis_clients_default_socket_timeout(own_stack):
    """`?wait=true` blocks on Redis for the whole job: a job over redis-py's default 5 s socket timeout still
    answers 200 with the finished job. Two workers on one host get distinct ids."""
    api_url = own_stack.start_api()
    workers = [own_stack.start_worker(), own_stack.start_worker()]
    assert workers[0].info["id"] != workers[1].info["id"]
    with httpx.Client(base_url=api_url, timeout=600) as api:
        response = api.post("/v1/generate?wait=true", json=LONG_JOB)
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["status"] == "succeeded" and job["timings"]["total"] > 5, job  # the job outlasted 5 s



def test_an_api_and_a_worker_serve_through_the_servers_unix_socket(redis_server, models_file, tmp_path):
    """`T2I_REDIS_URL=unix:///path/redis.sock?db=N` (a Redis on the same host): both processes connect through the
    socket, none over TCP (the worker's TCP keep-alive is asked for on TCP only), and a job runs."""
    url = redis_server.local_url.replace("db=0", "db=5")
    assert url.startswith("unix://"), url
    stack = Stack(url, models_file, tmp_path)
    stack.redis.flushdb()
    try:
        api_url = stack.start_api()
        stack.start_worker()
        with httpx.Client(base_url=api_url, timeout=120) as api:
            done = api.post("/v1/generate?encoder=t5-small&wait=true", json={"prompt": "a red circle", "steps": 2})
        assert done.status_code == 200 and done.json()["status"] == "succeeded", done.text
        clients = [c for c in stack.redis.client_list() if c["db"] == "5"]
        assert len(clients) >= 3, clients  # the API's, the worker's and its cancel listener's, and this test's
        assert all(str(redis_server.socket_path) in c["addr"] for c in clients), clients
    finally:
        stack.stop_all()
        stack.redis.flushdb()
