"""Every invalid input gets a clear 4xx naming the field and the bound; none reaches a worker or crashes anything."""

import pytest

from service import queue


@pytest.mark.parametrize(
    "query, body, field, words",
    [
        ({"encoder": "t5-tiny"}, {"prompt": "x"}, "encoder", ["t5-tiny", "known: t5-base"]),
        ({}, {"prompt": "x", "pipeline": "sdxl"}, "pipeline", ["sdxl", "known: flux, sd3"]),
        ({}, {"prompt": ""}, "prompt", ["at least 1 character"]),
        ({}, {"prompt": "   "}, "prompt", ["blank"]),
        ({}, {"prompt": "x" * 2001}, "prompt", ["2001 characters", "limit is 2000"]),
        ({}, {"prompt": "x", "width": 4096}, "width", ["less than or equal to 2048", "4096"]),
        ({}, {"prompt": "x", "height": 8}, "height", ["greater than or equal to 16", "8"]),
        ({}, {"prompt": "x", "width": 60}, "width", ["`width`=60 is not a multiple of 8"]),
        ({}, {"prompt": "x", "steps": 0}, "steps", ["greater than or equal to 1"]),
        ({}, {"prompt": "x", "steps": 101}, "steps", ["less than or equal to 100"]),
        ({}, {"prompt": "x", "guidance": -1}, "guidance", ["greater than or equal to 0"]),
        ({}, {"prompt": "x", "num_images": 9}, "num_images", ["less than or equal to 8"]),
        ({}, {"prompt": "x", "output_format": "gif"}, "output_format", ["png", "webp", "jpeg", "gif"]),
        ({}, {"prompt": "x", "negative_prompt": "blurry"}, "negative_prompt", ["sd3 pipelines only"]),
        ({}, {"prompt": "x", "colour": "red"}, "colour", ["Extra inputs"]),
        ({}, {"prompt": "x", "seed": -1}, "seed", ["greater than or equal to 0"]),
        ({"encoder": "t5-base"}, {"prompt": "x", "encoder": "t5-small"}, "encoder", ["given twice"]),
        ({}, {"pipeline": "flux"}, "prompt", ["Field required"]),
    ],
)
def test_invalid_fields_get_422_naming_the_field(api, stack, query, body, field, words):
    depth = stack.redis.zcard(queue.QUEUED)
    response = api.post("/v1/generate", params=query, json=body)
    assert response.status_code == 422, response.text
    data = response.json()
    assert data["error_type"] == "validation" and data["field"] == field, data
    for word in words:
        assert word in data["error"], data
    assert stack.redis.zcard(queue.QUEUED) == depth  # nothing was queued


def test_malformed_json(api):
    response = api.post("/v1/generate", content=b'{"prompt": "x",', headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert response.json()["error_type"] == "validation" and "malformed JSON" in response.json()["error"]


def test_wrong_content_type_is_415(api):
    response = api.post("/v1/generate", content=b"prompt=x", headers={"Content-Type": "text/plain"})
    assert response.status_code == 415
    assert response.json() == {"error": "Content-Type must be application/json, got 'text/plain'",
                               "error_type": "unsupported_media_type", "field": "content-type"}


def test_body_too_large_is_413(api):
    response = api.post("/v1/generate", json={"prompt": "x" * 12_100_000})  # T2I_MAX_BODY_BYTES: 12 MB
    assert response.status_code == 413 and response.json()["error_type"] == "payload_too_large"

    def chunks():  # no Content-Length: cut off while streaming
        for _ in range(250):
            yield b"x" * 50_000

    response = api.post("/v1/generate", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413


def test_unknown_job_and_image_are_404(api):
    for path in ("/v1/jobs/nope", "/v1/jobs/nope/images/0", "/v1/jobs/nope/events"):
        response = api.get(path)
        assert response.status_code == 404 and response.json()["error_type"] == "not_found", path
    assert api.delete("/v1/jobs/nope").status_code == 404
    job = api.post("/v1/generate?wait=true", json={"prompt": "x"}).json()
    response = api.get(f"/v1/jobs/{job['id']}/images/5")
    assert response.status_code == 404 and "no image 5" in response.json()["error"]
    assert api.get("/v1/jobs/bad%20id").status_code == 422


def test_cancel_a_finished_job_is_409(api):
    job = api.post("/v1/generate?wait=true", json={"prompt": "x"}).json()
    response = api.delete(f"/v1/jobs/{job['id']}")
    assert response.status_code == 409 and "already succeeded" in response.json()["error"]


def test_openai_endpoint_validates_too(api):
    response = api.post("/v1/images/generations", json={"prompt": "x", "size": "big"})
    assert response.status_code == 422 and response.json()["field"] == "size"
    response = api.post("/v1/images/generations", json={"prompt": "x", "model": "dalle-3"})
    assert response.status_code == 422 and "known: flux, sd3" in response.json()["error"]
    response = api.post("/v1/images/generations", json={"prompt": "x", "size": "9000x64"})
    assert response.status_code == 422 and response.json()["field"] == "size"


def test_unknown_route_and_method(api):
    assert api.get("/v2/nothing").json()["error_type"] == "not_found"
    assert api.get("/v1/generate").status_code == 405


@pytest.mark.parametrize("loras, words", [
    ([{"name": "nope"}], ["unknown lora 'nope'", "known: flux-style, sd3-style"]),
    ([{"name": "sd3-style"}], ["'sd3-style' is for pipeline 'sd3', not 'flux'"]),
    ([{"name": "flux-style"}, {"name": "flux-style"}], ["names an adapter twice"]),
    ([{"name": "flux-style", "scale": 9}], ["less than or equal to 4"]),
])
def test_bad_loras_get_422(api, loras, words):
    response = api.post("/v1/generate", json={"prompt": "x", "loras": loras})
    assert response.status_code == 422 and response.json()["field"].startswith("loras"), response.text
    for word in words:
        assert word in response.json()["error"]
