"""ControlNet jobs through the service: uploads, inline base64 images, the OpenAI extra field, and every bad input
refused with 413/415/422 before a job exists (so no worker ever sees it)."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from service import queue
from service.models.generation import ControlInput, GenerationRequest
from tests.api.test_generate import image_of, run
from tests.pixels import pixel_diff


def square_png(box=(16, 16, 48, 48)) -> bytes:
    image = np.zeros((64, 64, 3), np.uint8)
    x0, y0, x1, y1 = box
    image[y0:y1, x0:x1] = 200
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def upload(api, data: bytes, content_type="image/png"):
    return api.post("/v1/uploads", content=data, headers={"Content-Type": content_type})


def test_upload_then_generate_by_id_equals_inline_base64_and_the_local_run(api, generator):
    data = square_png()
    response = upload(api, data)
    assert response.status_code == 201, response.text
    info = response.json()
    assert (info["width"], info["height"], info["bytes"]) == (64, 64, len(data))
    assert response.headers["location"] == f"/v1/uploads/{info['id']}"
    fetched = api.get(f"/v1/uploads/{info['id']}")
    assert fetched.content == data and fetched.headers["content-type"] == "image/png"

    body = {"prompt": "a red fox in snow", "seed": 5}
    by_id = run(api, {**body, "control": {"name": "flux-canny", "image_id": info["id"]}}, encoder="t5-small")
    inline = run(api, {**body, "control": {"name": "flux-canny", "image": base64.b64encode(data).decode()}},
                 encoder="t5-small")
    data_url = "data:image/png;base64," + base64.b64encode(data).decode()
    as_url = run(api, {**body, "control": {"name": "flux-canny", "image": data_url}}, encoder="t5-small")
    plain = run(api, body, encoder="t5-small")
    assert "control" in by_id["timings"]
    assert pixel_diff(image_of(api, by_id), image_of(api, inline))[1] == 0.0
    assert pixel_diff(image_of(api, by_id), image_of(api, as_url))[1] == 0.0
    assert pixel_diff(image_of(api, by_id), image_of(api, plain))[0] > 2.0
    local = generator.generate(GenerationRequest(
        prompt=body["prompt"], pipeline="flux", encoder="t5-small", seed=5,
        control=ControlInput(name="flux-canny", image=Image.open(io.BytesIO(data))))).images[0]
    assert pixel_diff(image_of(api, by_id), local)[0] <= 0.5
    names = {c["name"]: (c["pipeline"], c["condition"]) for c in api.get("/v1/controlnets").json()}
    assert names == {"flux-canny": ("flux", "canny"), "sd3-canny": ("sd3", "canny")}


@pytest.mark.parametrize("encoder", ["t5-xxl", "t5-xxl-nf4", "t5-base"])
def test_sd3_controlnet_through_the_service(api, encoder):
    body = {"prompt": "a red fox in snow", "pipeline": "sd3", "seed": 2}
    image = base64.b64encode(square_png()).decode()
    guided = run(api, {**body, "control": {"name": "sd3-canny", "image": image, "scale": 0.8, "end": 0.75}},
                 encoder=encoder)
    assert pixel_diff(image_of(api, guided), image_of(api, run(api, body, encoder=encoder)))[0] > 2.0


def test_openai_endpoint_takes_control_as_an_extra_field(stack):
    from openai import OpenAI

    client = OpenAI(base_url=f"{stack.api_url}/v1", api_key="unused", max_retries=0)
    control = {"name": "flux-canny", "image": base64.b64encode(square_png()).decode()}
    result = client.images.generate(model="flux", prompt="a red fox", size="64x64", response_format="b64_json",
                                    extra_body={"encoder": "t5-base", "seed": 1, "control": control})
    assert Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).size == (64, 64)


def test_bad_uploads(api):
    response = upload(api, square_png(), content_type="text/plain")
    assert response.status_code == 415 and response.json()["field"] == "content-type"
    response = upload(api, b"GIF89a not really")
    assert response.status_code == 422 and "not a decodable image" in response.json()["error"]
    response = upload(api, b"\x89PNG" + b"x" * 8_100_000)  # T2I_MAX_IMAGE_BYTES: 8 MB
    assert response.status_code == 413 and "the limit is 8000000" in response.json()["error"]
    assert api.get("/v1/uploads/nope").status_code == 404


GOOD = base64.b64encode(square_png()).decode()


@pytest.mark.parametrize(
    "control, status, field, words",
    [
        ({"name": "nope", "image": GOOD}, 422, "control.name", ["unknown controlnet 'nope'", "flux-canny"]),
        ({"name": "sd3-canny", "image": GOOD}, 422, "control.name", ["is for pipeline 'sd3', not 'flux'"]),
        ({"name": "flux-canny"}, 422, "control", ["exactly one of `image`"]),
        ({"name": "flux-canny", "image": GOOD, "image_id": "abc"}, 422, "control", ["exactly one of `image`"]),
        ({"name": "flux-canny", "image": "%%% not base64"}, 422, "control.image", ["not valid base64"]),
        ({"name": "flux-canny", "image": base64.b64encode(b"hello").decode()}, 422, "control.image",
         ["not a decodable image"]),
        ({"name": "flux-canny", "image": "data:image/png,raw"}, 422, "control.image", ["must be base64"]),
        ({"name": "flux-canny", "image_id": "never-uploaded"}, 422, "control.image_id", ["unknown or has expired"]),
        ({"name": "flux-canny", "image_id": "../../etc/passwd"}, 422, "control.image_id", ["pattern"]),
        ({"name": "flux-canny", "image": GOOD, "start": 0.6, "end": 0.4}, 422, "control", ["must be below"]),
        ({"name": "flux-canny", "image": GOOD, "scale": 9}, 422, "control.scale", ["less than or equal to 4"]),
        ({"name": "flux-canny", "image": GOOD, "mode": "depth"}, 422, "control.mode", ["not a union model"]),
        ({"name": "flux-canny", "image": GOOD, "preprocess": "sobel"}, 422, "control.preprocess", ["canny"]),
        ({"name": "flux-canny", "image": base64.b64encode(b"\x89PNG" + b"x" * 8_100_000).decode()}, 413,
         "control.image", ["the limit is 8000000"]),
    ],
)
def test_bad_control_inputs_are_refused_before_queueing(api, stack, control, status, field, words):
    depth, uploads = stack.redis.zcard(queue.QUEUED), len(stack.redis.keys("t2i:upload:*"))
    response = api.post("/v1/generate", json={"prompt": "x", "control": control})
    assert response.status_code == status, response.text
    data = response.json()
    assert data["field"] == field, data
    for word in words:
        assert word in data["error"], data
    assert stack.redis.zcard(queue.QUEUED) == depth
    assert len(stack.redis.keys("t2i:upload:*")) == uploads  # nothing stored for a refused request
