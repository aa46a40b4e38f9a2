"""Compare runs and blind votes through a real API process, Redis and worker: scores, export, persistence across an
API restart, votes, metrics, and every bad input."""

import csv
import io
import json

import numpy as np
import pytest
from PIL import Image

from service import queue
from service.compare import embedding_cosine, psnr, ssim, to_unit, wilson
from service.models.generation import GenerationRequest
from tests.stack import wait_for


def finished(api, run_id, timeout=120):
    return wait_for(lambda: (r := api.get(f"/v1/compare/{run_id}").json())["status"] == "done" and r, timeout,
                    "the compare run")


@pytest.fixture(scope="module")
def run(stack):
    import httpx

    with httpx.Client(base_url=stack.api_url, timeout=60) as api:
        response = api.post("/v1/compare", json={
            "prompts": ["a red fox in snow", "a lighthouse at night"], "encoders": ["t5-base", "t5-small"],
            "seeds": [1, 2], "title": "fox and lighthouse"})
        assert response.status_code == 202, response.text
        assert response.headers["location"] == f"/v1/compare/{response.json()['id']}"
        return finished(api, response.json()["id"])


def test_a_run_scores_every_encoder_against_the_reference(api, run, generator):
    assert run["reference"] == "t5-xxl" and run["encoders"] == ["t5-base", "t5-small", "t5-xxl"]  # teacher added
    assert (run["jobs_total"], run["jobs_done"], run["jobs_failed"]) == (12, 12, 0)
    assert len(run["cells"]) == 4 and all(c["done"] for c in run["cells"])
    cell = next(c for c in run["cells"] if c["prompt_index"] == 0 and c["seed"] == 1)
    images = {}
    for encoder, result in cell["results"].items():
        response = api.get(result["image"])
        assert response.status_code == 200
        images[encoder] = Image.open(io.BytesIO(response.content)).convert("RGB")
    # the scores are those of the stored images, recomputed here independently of the API
    ref = to_unit(images["t5-xxl"])
    for encoder in ("t5-base", "t5-small"):
        result = cell["results"][encoder]
        assert result["psnr"] == pytest.approx(psnr(to_unit(images[encoder]), ref), abs=1e-9)
        assert result["ssim"] == pytest.approx(ssim(to_unit(images[encoder]), ref), abs=1e-9)
        assert -1.0 <= result["embedding_cosine"] <= 1.0
        assert result["encode_s"] > 0 and result["total_s"] >= result["encode_s"] and result["peak_memory_bytes"] > 0
    assert cell["results"]["t5-xxl"]["psnr"] is None  # the reference is not scored against itself
    # same seed, same noise: each image equals the local run of the same request
    local = generator.generate(GenerationRequest(prompt="a red fox in snow", pipeline="flux", encoder="t5-small",
                                                 seed=1)).images[0]
    assert np.abs(to_unit(local) - to_unit(images["t5-small"])).max() * 255 <= 2.0


def test_embedding_cosine_is_that_of_the_encoders(run, generator):
    cell = next(c for c in run["cells"] if c["prompt_index"] == 1 and c["seed"] == 2)
    embeds = {}
    for name in ("t5-base", "t5-xxl"):
        encoded = generator.encoder(name).encode(["a lighthouse at night"])
        embeds[name] = encoded.embeds[0, : encoded.lengths[0]].float().numpy()
    expected = embedding_cosine(embeds["t5-base"], embeds["t5-xxl"])
    assert cell["results"]["t5-base"]["embedding_cosine"] == pytest.approx(expected, abs=2e-3)  # float16 storage


def test_summary_per_encoder(run, stack):
    summary = {s["encoder"]: s for s in run["summary"]}
    assert summary["t5-xxl"]["is_reference"] and summary["t5-xxl"]["psnr"] is None
    for name in ("t5-base", "t5-small"):
        s = summary[name]
        psnrs = [c["results"][name]["psnr"] for c in run["cells"]]
        assert s["psnr"] == pytest.approx(float(np.mean(psnrs)))
        assert (s["jobs"], s["succeeded"], s["failed"]) == (4, 4, 0)
        assert s["encode_p50_s"] <= s["encode_p95_s"] and s["job_p50_s"] <= s["job_p95_s"]
        assert s["params"] > 0 and s["peak_memory_bytes"] > 0
    assert summary["t5-xxl"]["params"] > summary["t5-base"]["params"] > summary["t5-small"]["params"]


def test_list_and_export(api, run):
    listed = api.get("/v1/compare").json()
    assert run["id"] in [r["id"] for r in listed]
    exported = api.get(f"/v1/compare/{run['id']}.csv")
    assert exported.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert len(rows) == 12 and {r["encoder"] for r in rows} == {"t5-base", "t5-small", "t5-xxl"}
    row = next(r for r in rows if r["encoder"] == "t5-base" and r["seed"] == "1" and r["prompt_index"] == "0")
    cell = next(c for c in run["cells"] if c["prompt_index"] == 0 and c["seed"] == 1)
    assert float(row["psnr"]) == pytest.approx(cell["results"]["t5-base"]["psnr"])
    as_json = api.get(f"/v1/compare/{run['id']}.json")
    assert "attachment" in as_json.headers["content-disposition"]
    assert json.loads(as_json.text)["summary"] == run["summary"]


def test_a_run_survives_an_api_restart(stack, run):
    import httpx

    url = stack.start_api()  # a second API process: nothing in memory, everything from Redis
    proc = stack.procs[-1]
    try:
        with httpx.Client(base_url=url, timeout=60) as other:
            again = other.get(f"/v1/compare/{run['id']}").json()
            assert again["summary"] == run["summary"] and again["status"] == "done"
            assert other.get(again["cells"][0]["results"]["t5-base"]["image"].replace(stack.api_url, url)) \
                .status_code == 200
    finally:
        proc.stop()


def test_blind_votes_count_once_per_voter_and_pair(api, run):
    run_id = run["id"]
    pair = api.get(f"/v1/compare/{run_id}/pair", params={"voter": "alice"}).json()
    assert pair["remaining"] == 12  # 4 cells x 3 encoder pairs
    assert "t5-" not in json.dumps(pair)  # nothing names the encoders
    left = api.get(pair["left"])
    assert left.status_code == 200 and left.headers["content-type"] == "image/png"
    assert api.post(f"/v1/compare/{run_id}/votes", json={"token": pair["token"], "choice": "left",
                                                          "voter": "alice"}).json() == {"counted": True}
    assert api.post(f"/v1/compare/{run_id}/votes", json={"token": pair["token"], "choice": "right",
                                                          "voter": "alice"}).json() == {"counted": False}
    assert api.post(f"/v1/compare/{run_id}/votes", json={"token": pair["token"], "choice": "tie",
                                                          "voter": "bob"}).json() == {"counted": True}
    assert api.get(f"/v1/compare/{run_id}/pair", params={"voter": "alice"}).json()["remaining"] == 11
    votes = api.get(f"/v1/compare/{run_id}").json()["votes"]
    assert len(votes) == 1 and votes[0]["votes"] == 2 and votes[0]["ties"] == 1
    v = votes[0]
    assert v["a_wins"] + v["b_wins"] == 1 and v["a_win_rate"] == (v["a_wins"] + 0.5) / 2
    assert (v["ci_low"], v["ci_high"]) == pytest.approx(wilson(v["a_wins"] + 0.5, 2))
    metrics = api.get("/metrics").text
    assert f't2i_ab_votes_total{{encoder_a="{v["a"]}",encoder_b="{v["b"]}",outcome="tie"}} 1.0' in metrics
    # a voter who has voted on every pair gets 204
    for _ in range(11):
        p = api.get(f"/v1/compare/{run_id}/pair", params={"voter": "carol"}).json()
        api.post(f"/v1/compare/{run_id}/votes", json={"token": p["token"], "choice": "left", "voter": "carol"})
    p = api.get(f"/v1/compare/{run_id}/pair", params={"voter": "carol"}).json()
    api.post(f"/v1/compare/{run_id}/votes", json={"token": p["token"], "choice": "left", "voter": "carol"})
    assert api.get(f"/v1/compare/{run_id}/pair", params={"voter": "carol"}).status_code == 204


def test_votes_for_unknown_runs_or_pairs_are_404(api, run):
    response = api.post("/v1/compare/nope/votes", json={"token": "abc", "choice": "left", "voter": "x"})
    assert response.status_code == 404 and response.json()["field"] == "run_id"
    response = api.post(f"/v1/compare/{run['id']}/votes", json={"token": "abc", "choice": "left", "voter": "x"})
    assert response.status_code == 404 and response.json()["field"] == "token"
    assert api.get("/v1/compare/nope").status_code == 404
    assert api.get("/v1/compare/nope.csv").status_code == 404
    response = api.post(f"/v1/compare/{run['id']}/votes", json={"token": "abc", "choice": "up", "voter": "x"})
    assert response.status_code == 422 and response.json()["field"] == "choice"


def test_a_miniature_prompt_set_gets_the_evaluator_column(api):
    sets = {s["name"]: s["prompts"] for s in api.get("/v1/compare/prompt-sets").json()}
    assert {"semantics", "image-quality", "text-rendering", "miniature-semantics",
            "miniature-text-rendering"} <= set(sets)
    # the demo kit draws 64x64 noise: the evaluator (32x32 world images) does not apply, and says so with null
    response = api.post("/v1/compare", json={"prompt_set": "miniature-text-rendering",
                                             "encoders": ["t5-base", "t5-xxl"]})
    assert response.status_code == 202, response.text
    done = finished(api, response.json()["id"])
    assert done["prompt_list"] == sets["miniature-text-rendering"]
    assert all(r["evaluator"] is None for c in done["cells"] for r in c["results"].values())
    assert all(s["accuracy"] is None for s in done["summary"])


def test_a_run_applies_loras_and_a_control_image_to_every_encoder(api):
    import base64

    square = Image.new("RGB", (64, 64))
    square.paste((200, 200, 200), (16, 16, 48, 48))
    buffer = io.BytesIO()
    square.save(buffer, format="PNG")
    common = {"prompts": ["a red fox in snow"], "encoders": ["t5-small", "t5-xxl"], "seeds": [4]}
    plain = finished(api, api.post("/v1/compare", json=common).json()["id"])
    response = api.post("/v1/compare", json={
        **common, "loras": [{"name": "flux-style"}],
        "control": {"name": "flux-canny", "image": base64.b64encode(buffer.getvalue()).decode()}})
    assert response.status_code == 202, response.text
    adapted = finished(api, response.json()["id"])
    for encoder in ("t5-small", "t5-xxl"):
        job = api.get(adapted["cells"][0]["results"][encoder]["image"].rsplit("/images/", 1)[0]).json()
        assert "control" in job["timings"]  # the ControlNet ran on this encoder's job
        a = to_unit(Image.open(io.BytesIO(api.get(plain["cells"][0]["results"][encoder]["image"]).content)))
        b = to_unit(Image.open(io.BytesIO(api.get(adapted["cells"][0]["results"][encoder]["image"]).content)))
        assert np.abs(a - b).mean() * 255 > 2.0
    assert adapted["cells"][0]["results"]["t5-small"]["psnr"] is not None


@pytest.mark.parametrize(
    "body, field, words",
    [
        ({"prompts": ["x"], "encoders": ["t5-base"]}, "encoders", ["at least 2"]),
        ({"prompts": ["x"], "encoders": ["t5-base", "t5-nope"]}, "encoders", ["unknown encoder 't5-nope'"]),
        ({"prompts": ["x"], "encoders": ["t5-base", "t5-small"], "reference": "t5-nope"}, "reference",
         ["unknown encoder 't5-nope'"]),
        ({"prompts": ["x", " "], "encoders": ["t5-base", "t5-small"]}, "prompts", ["prompt 1 is blank"]),
        ({"prompts": [], "encoders": ["t5-base", "t5-small"]}, "body", ["`prompts` is empty"]),
        ({"encoders": ["t5-base", "t5-small"]}, "body", ["exactly one of `prompts` and `prompt_set`"]),
        ({"prompt_set": "poems", "encoders": ["t5-base", "t5-small"]}, "prompt_set", ["unknown prompt set 'poems'"]),
        ({"prompts": ["x"] * 40, "encoders": ["t5-base", "t5-small"], "seeds": [1, 2]}, "prompts",
         ["40 prompts x 2 seeds x 3 encoders = 240 jobs", "T2I_MAX_COMPARE_JOBS=128"]),
        ({"prompts": ["x"], "encoders": ["t5-base", "t5-base"]}, "encoders", ["encoders repeat"]),
        ({"prompts": ["x"], "encoders": ["t5-base", "t5-small"], "seeds": [-1]}, "seeds", ["out of range"]),
        ({"prompts": ["x"], "encoders": ["t5-base", "t5-small"], "pipeline": "sdxl"}, "pipeline", ["sdxl"]),
        ({"prompts": ["x" * 2001], "encoders": ["t5-base", "t5-small"]}, "prompts.0", ["2001 characters"]),
        ({"prompts": ["x"], "encoders": ["t5-base", "t5-small"], "width": 60}, "width", ["multiple of 8"]),
    ],
)
def test_bad_compare_requests_get_422_and_queue_nothing(api, stack, body, field, words):
    depth, runs = stack.redis.zcard(queue.QUEUED), stack.redis.zcard(queue.COMPARES)
    response = api.post("/v1/compare", json=body)
    assert response.status_code == 422, response.text
    data = response.json()
    assert data["field"] == field, data
    for word in words:
        assert word in data["error"], data
    assert stack.redis.zcard(queue.QUEUED) == depth and stack.redis.zcard(queue.COMPARES) == runs


def test_teacher_its_quantized_forms_and_the_students_side_by_side_in_the_miniature_world(tmp_path):
    """The comparison users need: on the shipped miniature kit, one run over the teacher, its int8, fp8 and NF4 forms
    and the three students ends with the evaluator's accuracy and the real bytes of every encoder."""
    import httpx

    from service.models.registry import MINIATURE_KIT
    from service.redis_server import EmbeddedRedis
    from tests.stack import Stack

    encoders = ["t5-xxl", "t5-xxl-int8", "t5-xxl-fp8", "t5-xxl-nf4", "t5-large", "t5-base", "t5-small"]
    with EmbeddedRedis() as redis_server:
        stack = Stack(redis_server.url, MINIATURE_KIT, tmp_path)
        try:
            api_url = stack.start_api()
            stack.start_worker()
            with httpx.Client(base_url=api_url, timeout=60) as api:
                response = api.post("/v1/compare", json={"prompt_set": "miniature-text-rendering",
                                                         "encoders": encoders, "seeds": [0], "steps": 8})
                assert response.status_code == 202, response.text
                done = finished(api, response.json()["id"], timeout=600)
        finally:
            stack.stop_all()
    assert done["jobs_failed"] == 0
    summary = {s["encoder"]: s for s in done["summary"]}
    assert set(summary) == set(encoders)
    assert all(s["accuracy"] is not None and s["bytes"] > 0 for s in summary.values())
    for name, method in (("t5-xxl-int8", "int8-weight-only"), ("t5-xxl-fp8", "fp8-weight-only"),
                         ("t5-xxl-nf4", "bnb-nf4")):
        assert summary[name]["quantization"] == method
        assert summary[name]["params"] == summary["t5-xxl"]["params"]
        assert summary[name]["bytes"] < 0.5 * summary["t5-xxl"]["bytes"]
