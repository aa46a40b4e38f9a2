"""LoRA adapters per call, with diffusers' adapter API: they change the image, and leave nothing behind."""

import pytest

from service.errors import UnknownNameError, ValidationError
from service.models.generation import GenerationRequest, Generator
from tests.pixels import pixel_diff


def run(generator, **kw):
    base = dict(prompt="a red fox in snow", pipeline="flux", encoder="t5-base", seed=3)
    return generator.generate(GenerationRequest(**{**base, **kw}))


@pytest.mark.parametrize("pipeline", ["flux", "sd3"])
@pytest.mark.parametrize("encoder", ["t5-xxl", "t5-xxl-nf4", "t5-large", "t5-base", "t5-small"])
def test_a_lora_changes_the_image_and_is_removed_afterwards(registry, pipeline, encoder):
    generator = Generator(registry)  # fresh: no adapter loaded yet
    lora = f"{pipeline}-style"
    plain = run(generator, pipeline=pipeline, encoder=encoder).images[0]
    styled = run(generator, pipeline=pipeline, encoder=encoder, loras=((lora, None),))
    after = run(generator, pipeline=pipeline, encoder=encoder).images[0]
    again = run(generator, pipeline=pipeline, encoder=encoder, loras=((lora, None),)).images[0]
    assert pixel_diff(plain, styled.images[0])[0] > 2.0  # the adapter really acts
    assert pixel_diff(plain, after)[1] == 0.0  # and is cleanly removed: nothing fused, nothing leaks
    assert pixel_diff(styled.images[0], again)[1] == 0.0
    assert styled.timings["adapters"] > 0


def test_scale_matters_and_zero_is_no_adapter(registry):
    generator = Generator(registry)
    plain = run(generator).images[0]
    half = run(generator, loras=(("flux-style", 0.5),)).images[0]
    full = run(generator, loras=(("flux-style", 1.0),)).images[0]
    zero = run(generator, loras=(("flux-style", 0.0),)).images[0]
    assert pixel_diff(half, full)[0] > 0.5
    assert pixel_diff(plain, zero)[0] < 0.5


def test_unknown_or_foreign_loras_are_refused(generator):
    with pytest.raises(UnknownNameError, match="unknown lora 'nope'; known: flux-style, sd3-style"):
        run(generator, loras=(("nope", None),))
    with pytest.raises(ValidationError, match="lora 'sd3-style' is for pipeline 'sd3', not 'flux'"):
        run(generator, loras=(("sd3-style", None),))
