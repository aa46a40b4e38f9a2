"""Several requests in one denoising call: each image equals the image of its request alone, for both pipelines."""

import pytest

from service.models.generation import GenerationRequest, batch_key
from tests.pixels import pixel_diff

PROMPTS = ["a red fox in snow", "a lighthouse at night", "a bowl of ramen", "a red fox in snow"]


@pytest.mark.parametrize("pipeline", ["flux", "sd3"])
@pytest.mark.parametrize("encoder", ["t5-xxl", "t5-small"])
def test_a_batch_gives_each_request_its_own_image(generator, pipeline, encoder):
    requests = [GenerationRequest(prompt=p, pipeline=pipeline, encoder=encoder, seed=seed)
                for p, seed in zip(PROMPTS, (1, 2, 3, 4))]
    batched = generator.generate_batch(requests)
    assert [r.seed for r in batched] == [1, 2, 3, 4] and all(r.batch_size == 4 for r in batched)
    for request, result in zip(requests, batched):
        alone = generator.generate(request)
        assert alone.batch_size == 1
        mean, peak = pixel_diff(alone.images[0], result.images[0])
        assert mean <= 0.5 and peak <= 2.0, (request.prompt, mean, peak)
    # same prompt, other seed: other image (each request keeps its own noise)
    assert pixel_diff(batched[0].images[0], batched[3].images[0])[0] > 2.0


def test_several_images_per_request_in_a_batch(generator):
    requests = [GenerationRequest(prompt=p, pipeline="flux", encoder="t5-base", seed=s, num_images=2)
                for p, s in (("a red fox", 5), ("a blue car", 6))]
    batched = generator.generate_batch(requests)
    for request, result in zip(requests, batched):
        alone = generator.generate(request)
        assert len(result.images) == 2
        for a, b in zip(alone.images, result.images):
            assert pixel_diff(a, b)[0] <= 0.5


def test_requests_of_different_shapes_are_not_batched(generator):
    a = GenerationRequest(prompt="x", pipeline="flux", encoder="t5-base", steps=2)
    b = GenerationRequest(prompt="y", pipeline="flux", encoder="t5-base", steps=3)
    assert batch_key(a) != batch_key(b)
    with pytest.raises(ValueError, match="share a batch key"):
        generator.generate_batch([a, b])
    c = GenerationRequest(prompt="x", pipeline="flux", encoder="t5-small", steps=2)
    assert batch_key(a) != batch_key(c)
    assert batch_key(a) == batch_key(GenerationRequest(prompt="z", pipeline="flux", encoder="t5-base", steps=2,
                                                       seed=9))
