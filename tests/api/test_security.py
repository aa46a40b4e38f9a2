"""API keys, per-key visibility, rate limits and quotas, exposure rules, CORS, log hygiene, Redis with a password;
real API and worker processes on their own Redis database."""

import io
import re
from pathlib import Path

import httpx
import pytest
from PIL import Image

from service import queue
from service.api.auth import check_exposure, hash_key, load_keys
from service.errors import ConfigError
from service.settings import Settings
from tests.stack import JOB_CAP_S, Stack, wait_for

ALICE, BOB = "t2i_alice_secret_key_0123456789", "t2i_bob_secret_key_9876543210"
KEYS = f"alice:{hash_key(ALICE)},bob:{hash_key(BOB)}"
PROMPT = "a very private prompt about a purple elephant"


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def secured(redis_server, models_file, tmp_path_factory):
    url = redis_server.url.rsplit("/", 1)[0] + "/2"
    stack = Stack(url, models_file, tmp_path_factory.mktemp("secured"))
    stack.redis.flushdb()
    stack.api_url = stack.start_api({"T2I_API_KEYS": KEYS})
    stack.worker = stack.start_worker()
    yield stack
    stack.stop_all()
    stack.redis.flushdb()


@pytest.fixture()
def alice(secured):
    with httpx.Client(base_url=secured.api_url, timeout=60, headers=bearer(ALICE)) as client:
        yield client


@pytest.fixture()
def bob(secured):
    with httpx.Client(base_url=secured.api_url, timeout=60, headers=bearer(BOB)) as client:
        yield client


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_every_api_route_needs_a_known_key(secured):
    with httpx.Client(base_url=secured.api_url, timeout=30) as anon:
        for method, path in (("POST", "/v1/generate"), ("GET", "/v1/jobs/x"), ("GET", "/v1/encoders"),
                             ("GET", "/v1/compare"), ("POST", "/v1/uploads"), ("POST", "/v1/images/generations"),
                             ("GET", "/metrics"), ("POST", "/generate")):
            response = anon.request(method, path, json={"prompt": "x"})
            assert response.status_code == 401, (path, response.text)
            assert response.json()["error_type"] == "unauthorized"
        wrong = anon.get("/v1/encoders", headers=bearer("t2i_not_a_key"))
        assert wrong.status_code == 401 and wrong.json()["error"] == "unknown API key"
        assert anon.get("/healthz").status_code == 200 and anon.get("/readyz").status_code == 200
        assert anon.get("/metrics", headers=bearer(ALICE)).status_code == 200


def test_a_job_and_its_images_are_visible_only_to_its_key(alice, bob, secured):
    job = alice.post("/v1/generate?wait=true", json={"prompt": PROMPT, "seed": 1}).json()
    assert job["status"] == "succeeded" and len(job["id"]) >= 22  # token_urlsafe(16): 128 random bits
    for path in (f"/v1/jobs/{job['id']}", f"/v1/jobs/{job['id']}/images/0", f"/v1/jobs/{job['id']}/events"):
        assert alice.get(path).status_code == 200, path
        response = bob.get(path)
        assert response.status_code == 404 and job["id"] in response.json()["error"], path  # as if it did not exist
    assert bob.delete(f"/v1/jobs/{job['id']}").status_code == 404
    # an Idempotency-Key is per key: bob's request with alice's idempotency key makes bob's own job
    first = alice.post("/v1/generate", json={"prompt": "x"}, headers={"Idempotency-Key": "k1"}).json()
    other = bob.post("/v1/generate", json={"prompt": "x"}, headers={"Idempotency-Key": "k1"}).json()
    assert first["id"] != other["id"]


def test_uploads_and_compare_runs_are_per_key(alice, bob):
    upload = alice.post("/v1/uploads", content=png(), headers={"Content-Type": "image/png"}).json()
    assert alice.get(f"/v1/uploads/{upload['id']}").status_code == 200
    assert bob.get(f"/v1/uploads/{upload['id']}").status_code == 404
    response = bob.post("/v1/generate", json={"prompt": "x", "control": {"name": "flux-canny",
                                                                          "image_id": upload["id"]}})
    assert response.status_code == 422 and response.json()["field"] == "control.image_id"
    run = alice.post("/v1/compare", json={"prompts": ["x"], "encoders": ["t5-small", "t5-base"]}).json()
    assert bob.get(f"/v1/compare/{run['id']}").status_code == 404
    assert run["id"] not in [r["id"] for r in bob.get("/v1/compare").json()]
    assert run["id"] in [r["id"] for r in alice.get("/v1/compare").json()]


def test_a_request_over_the_pixel_step_budget_is_refused(alice):
    response = alice.post("/v1/generate", json={"prompt": "x", "width": 2048, "height": 2048, "steps": 100,
                                                 "num_images": 8})
    assert response.status_code == 422
    assert "2048 x 2048 x 8 images x 100 steps" in response.json()["error"]
    assert "T2I_MAX_PIXEL_STEPS" in response.json()["error"]


@pytest.fixture()
def limited(secured):
    """Starts another API on the same Redis and worker, with extra settings; stopped after the test."""
    started = []

    def start(env: dict) -> str:
        url = secured.start_api({"T2I_API_KEYS": KEYS, **env})
        started.append(secured.procs[-1])
        return url

    yield start
    for proc in started:
        proc.stop()


def test_rate_limit_answers_429_with_retry_after(limited, secured):
    url = limited({"T2I_RATE_JOBS_PER_MINUTE": "3"})
    with httpx.Client(base_url=url, timeout=30, headers=bearer(BOB)) as client:
        statuses = []
        for _ in range(3):
            statuses.append(client.post("/v1/generate", json={"prompt": "r", "steps": 1}).status_code)
        depth = secured.redis.zcard(queue.QUEUED)
        refused = client.post("/v1/generate", json={"prompt": "r", "steps": 1})
        assert statuses == [202, 202, 202]
        assert refused.status_code == 429 and 1 <= int(refused.headers["retry-after"]) <= 61
        assert "T2I_RATE_JOBS_PER_MINUTE=3" in refused.json()["error"]
        assert secured.redis.zcard(queue.QUEUED) <= depth  # the refused job was never queued


def test_concurrency_limit_and_daily_quota(limited):
    url = limited({"T2I_MAX_CONCURRENT_JOBS": "1", "T2I_DAILY_PIXEL_STEPS": str(64 * 64 * 30)})
    with httpx.Client(base_url=url, timeout=60, headers=bearer(ALICE)) as client:
        long = client.post("/v1/generate", json={"prompt": "c", "steps": 12}).json()
        refused = client.post("/v1/generate", json={"prompt": "c", "steps": 1})
        assert refused.status_code == 429 and "T2I_MAX_CONCURRENT_JOBS=1" in refused.json()["error"]
        wait_for(lambda: client.get(f"/v1/jobs/{long['id']}").json()["status"] == "succeeded", JOB_CAP_S, "the long job")
        ok = client.post("/v1/generate?wait=true", json={"prompt": "c", "steps": 12})
        assert ok.status_code == 200  # the first ended: room again (12 + 12 of 30 steps used)
        over = client.post("/v1/generate", json={"prompt": "c", "steps": 12})
        assert over.status_code == 429 and "T2I_DAILY_PIXEL_STEPS" in over.json()["error"]
        assert int(over.headers["retry-after"]) > 0


def test_exposure_rules():
    assert check_exposure(Settings(), {}, "127.0.0.1").startswith("open")
    with pytest.raises(ConfigError, match="refusing to serve on 0.0.0.0 without API keys"):
        check_exposure(Settings(), {}, "0.0.0.0")
    assert check_exposure(Settings(allow_open=True), {}, "0.0.0.0").startswith("OPEN on 0.0.0.0")
    assert check_exposure(Settings(), {"x" * 64: "x"}, "0.0.0.0").startswith("API keys required")
    with pytest.raises(ConfigError, match="not a SHA-256 hex digest"):
        load_keys(Settings(api_keys=["alice:plaintext-key"]))


def test_the_api_refuses_to_start_exposed_without_keys(secured):
    proc = secured._spawn(["api", "--host", "0.0.0.0", "--port", "1"], None, "exposed")  # exits before binding
    assert proc.process.wait(30) == 2
    assert "refusing to serve on 0.0.0.0 without API keys" in proc.log()


def test_cors_is_closed_by_default_and_opens_for_configured_origins(secured, limited):
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    response = httpx.options(f"{secured.api_url}/v1/generate", headers=preflight)
    assert "access-control-allow-origin" not in response.headers
    url = limited({"T2I_CORS_ORIGINS": "https://app.example"})
    ok = httpx.options(f"{url}/v1/generate", headers={**preflight, "Origin": "https://app.example"})
    assert ok.headers.get("access-control-allow-origin") == "https://app.example"
    assert "access-control-allow-origin" not in httpx.options(f"{url}/v1/generate", headers=preflight).headers


def test_logs_hold_neither_keys_nor_prompts(secured, alice):
    assert alice.post("/v1/generate?wait=true", json={"prompt": PROMPT}).json()["status"] == "succeeded"
    for proc in secured.procs:
        text = Path(proc.log_path).read_text()
        assert ALICE not in text and BOB not in text and "purple elephant" not in text, proc.log_path


def test_no_pickle_in_the_service_or_the_trainer():
    root = Path(__file__).resolve().parents[2]
    for path in [*root.glob("service/**/*.py"), *root.glob("trainer/**/*.py")]:
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b", text, re.M), path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)


def test_redis_with_a_password(models_file, tmp_path):
    from service.redis_server import EmbeddedRedis

    with EmbeddedRedis(password="s3cret-pw") as server:
        assert server.url.startswith("redis://:s3cret-pw@127.0.0.1:")
        stack = Stack(server.url, models_file, tmp_path)
        try:
            url = stack.start_api()
            stack.start_worker()
            job = httpx.post(f"{url}/v1/generate?wait=true", json={"prompt": "pw"}, timeout=60).json()
            assert job["status"] == "succeeded"
        finally:
            stack.stop_all()
        import redis

        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port).ping()  # and nothing gets in without it
