"""ControlNets per call: the diffusers ControlNet pipelines, sharing the denoiser's components, with any encoder."""

import io

import numpy as np
import pytest
from PIL import Image

from service.errors import PayloadTooLargeError, UnknownNameError, ValidationError
from service.models import control as control_images
from service.models.generation import ControlInput, GenerationRequest, Generator
from tests.pixels import pixel_diff


def square(size: int = 64, box: tuple[int, int, int, int] = (16, 16, 48, 48)) -> Image.Image:
    image = np.zeros((size, size, 3), np.uint8)
    x0, y0, x1, y1 = box
    image[y0:y1, x0:x1] = 200
    return Image.fromarray(image)


def run(generator, **kw):
    base = dict(prompt="a red fox in snow", pipeline="flux", encoder="t5-base", seed=3)
    return generator.generate(GenerationRequest(**{**base, **kw}))


@pytest.mark.parametrize("pipeline", ["flux", "sd3"])
@pytest.mark.parametrize("encoder", ["t5-xxl", "t5-xxl-int8", "t5-large", "t5-base", "t5-small"])
def test_a_controlnet_changes_the_image_with_every_encoder_and_leaves_nothing_behind(generator, pipeline, encoder):
    control = ControlInput(name=f"{pipeline}-canny", image=square())
    plain = run(generator, pipeline=pipeline, encoder=encoder).images[0]
    guided = run(generator, pipeline=pipeline, encoder=encoder, control=control)
    after = run(generator, pipeline=pipeline, encoder=encoder).images[0]
    assert pixel_diff(plain, guided.images[0])[0] > 2.0  # the ControlNet acts
    assert pixel_diff(plain, after)[1] == 0.0  # the plain pipeline is untouched
    assert "control" in guided.timings


def test_the_control_image_and_its_settings_matter(generator):
    a = ControlInput(name="flux-canny", image=square(box=(8, 8, 30, 30)))
    b = ControlInput(name="flux-canny", image=square(box=(34, 34, 60, 60)))
    img_a, img_a2 = run(generator, control=a).images[0], run(generator, control=a).images[0]
    img_b = run(generator, control=b).images[0]
    assert pixel_diff(img_a, img_a2)[1] == 0.0  # deterministic
    assert pixel_diff(img_a, img_b)[0] > 1.0  # the control image matters
    # At scale 0 the control image no longer matters. (The ControlNet pipelines draw the VAE sample of the control
    # image from the seed's generator before the noise, so scale 0 is not the plain pipeline's image.)
    zero_a = run(generator, control=ControlInput(name="flux-canny", image=a.image, scale=0.0)).images[0]
    zero_b = run(generator, control=ControlInput(name="flux-canny", image=b.image, scale=0.0)).images[0]
    assert pixel_diff(zero_a, zero_b)[1] == 0.0
    late = run(generator, control=ControlInput(name="flux-canny", image=square(), start=0.5)).images[0]
    full = run(generator, control=ControlInput(name="flux-canny", image=square())).images[0]
    assert pixel_diff(late, full)[0] > 0.5  # start/end fractions reach the pipeline


def test_controlnet_and_lora_together(generator):
    control = ControlInput(name="flux-canny", image=square())
    both = run(generator, control=control, loras=(("flux-style", None),)).images[0]
    only_control = run(generator, control=control).images[0]
    assert pixel_diff(both, only_control)[0] > 1.0  # the LoRA acts inside the ControlNet pipeline too


def test_unknown_or_foreign_controlnets_and_bad_fractions_are_refused(generator):
    with pytest.raises(UnknownNameError, match="unknown controlnet 'nope'; known: flux-canny, sd3-canny"):
        run(generator, control=ControlInput(name="nope", image=square()))
    with pytest.raises(ValidationError, match="controlnet 'sd3-canny' is for pipeline 'sd3', not 'flux'"):
        run(generator, control=ControlInput(name="sd3-canny", image=square()))
    with pytest.raises(ValidationError, match="not a union model"):
        run(generator, control=ControlInput(name="flux-canny", image=square(), mode="depth"))
    with pytest.raises(ValidationError, match="start"):
        run(generator, control=ControlInput(name="flux-canny", image=square(), start=0.8, end=0.2))


def test_canny_draws_the_outline_of_a_square():
    edges = np.asarray(control_images.canny(square()))[:, :, 0] > 0
    assert edges[16:48, 15:18].any() and edges[15:18, 16:48].any()  # the square's left and top sides
    assert not edges[24:40, 24:40].any() and not edges[:10, :10].any()  # nothing inside or far outside


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_decode_image_refuses_bad_bytes_with_the_field_named():
    assert control_images.decode_image(png(square()), field="f", max_bytes=10**6).size == (64, 64)
    with pytest.raises(PayloadTooLargeError, match="`f` is .* bytes; the limit is 100"):
        control_images.decode_image(png(square()), field="f", max_bytes=100)
    with pytest.raises(ValidationError, match="`f` is not a decodable image"):
        control_images.decode_image(b"definitely not an image", field="f", max_bytes=10**6)
    with pytest.raises(ValidationError, match="`f` is not a decodable image"):
        control_images.decode_image(png(square())[:60], field="f", max_bytes=10**6)  # truncated
    with pytest.raises(ValidationError, match="each side must be at most 4096"):
        control_images.decode_image(png(Image.new("1", (5000, 8))), field="f", max_bytes=10**6)
    with pytest.raises(ValidationError, match="`f` is empty"):
        control_images.decode_image(b"", field="f", max_bytes=10**6)


def test_a_new_generator_loads_the_controlnet_once(registry):
    generator = Generator(registry)
    control = ControlInput(name="flux-canny", image=square())
    first = run(generator, control=control)
    second = run(generator, control=control)
    assert len(generator.denoiser("flux").control_pipes) == 1
    assert first.timings["adapters"] > second.timings["adapters"]
