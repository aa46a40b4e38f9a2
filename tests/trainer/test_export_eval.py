"""A distilled, exported student: loadable by plain diffusers, served by `t2i generate` and by the service, and
closer to the teacher than the undistilled student on every criterion of `t2i eval`."""

import httpx
import pytest
import torch
import yaml
from diffusers import FluxPipeline
from PIL import Image
from transformers import AutoTokenizer

from service.cli import main
from service.models.registry import with_absolute_sources
from service.models.student import T5EncoderWithProjection
from tests.stack import Stack
from trainer.distill import train
from trainer.evaluate import evaluate
from trainer.export import export


@pytest.fixture(scope="module")
def distilled(tiny_module):
    config = tiny_module
    train(config, show_progress=False)
    return config, export(config.output_dir, config.output_dir + "-export")


@pytest.fixture(scope="module")
def tiny_module(models_file, prompt_dir, tmp_path_factory):
    from trainer.config import DistillConfig, load_config

    out = tmp_path_factory.mktemp("distilled") / "run"
    return load_config(DistillConfig, "tiny-cpu", [f"--models_file={models_file}", f"--data={prompt_dir}",
                                                   f"--output_dir={out}", "--max_steps=120", "--eval_every=40",
                                                   "--checkpoint_every=40"])


@pytest.fixture(scope="module")
def models_with_student(distilled, demo_dir, tmp_path_factory):
    models = with_absolute_sources(yaml.safe_load((demo_dir / "models.yaml").read_text()), demo_dir)
    models["encoders"]["t5-base-distilled"] = {"kind": "student", "source": str(distilled[1]),
                                              "max_sequence_length": 48}
    path = tmp_path_factory.mktemp("models") / "models.yaml"
    path.write_text(yaml.safe_dump(models))
    return path


def test_export_is_a_hugging_face_model_dir(distilled, demo_dir):
    _, out = distilled
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= {p.name for p in out.iterdir()}
    card = (out / "README.md").read_text()
    assert "step-following" in card and "| step | vision loss |" in card
    student = T5EncoderWithProjection.from_pretrained(out)
    pipe = FluxPipeline.from_pretrained(demo_dir / "pipelines/flux", text_encoder_2=student,
                                        tokenizer_2=AutoTokenizer.from_pretrained(out))
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red fox", height=64, width=64, num_inference_steps=2, max_sequence_length=48,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_served_by_t2i_generate(models_with_student, tmp_path, capsys):
    out = tmp_path / "x.png"
    assert main(["generate", "--models-file", str(models_with_student), "--encoder", "t5-base-distilled",
                 "--prompt", "a red fox", "--seed", "1", "-o", str(out)]) == 0, capsys.readouterr().err
    assert Image.open(out).size == (64, 64)


def test_served_by_the_service(models_with_student, redis_server, tmp_path):
    stack = Stack(redis_server.url.rsplit("/", 1)[0] + "/2", models_with_student, tmp_path)
    stack.redis.flushdb()
    try:
        url = stack.start_api()
        stack.start_worker({"T2I_WORKER_ENCODERS": "t5-base-distilled,t5-xxl"})
        job = httpx.post(f"{url}/v1/generate?encoder=t5-base-distilled&wait=true", json={"prompt": "a red fox"},
                         timeout=60).json()
        assert job["status"] == "succeeded" and job["encoder"] == "t5-base-distilled"
    finally:
        stack.stop_all()
        stack.redis.flushdb()


def test_eval_shows_the_distilled_student_closer_on_every_criterion(distilled, demo_dir, tmp_path):
    config, out = distilled
    report = evaluate(config, [demo_dir / "encoders/t5-base", out], tmp_path / "eval", per_criterion=4)
    assert set(report["results"]) == {"image_quality", "semantics", "text_rendering"}
    for criterion, rows in report["results"].items():
        base, ours = rows["t5-base"], rows[out.name]
        assert ours["vision_loss"] < base["vision_loss"] / 3, (criterion, base, ours)
        assert ours["psnr"] > base["psnr"] and ours["ssim"] >= base["ssim"], (criterion, base, ours)
        assert ours["embedding_cosine"] > base["embedding_cosine"], (criterion, base, ours)
    assert (tmp_path / "eval" / "report.md").read_text().count("|") > 20
    grid = Image.open(tmp_path / "eval" / "grid.png")
    assert grid.width > 3 * 128  # a column per model plus the prompt


def test_eval_takes_a_quantized_teacher_like_a_student(distilled, models_file, tmp_path):
    """A pre-quantized teacher (`t2i models quantize`) is evaluated as it is: nearer the teacher than a student."""
    from service.cli import main

    config, out = distilled
    quantized = tmp_path / "t5-xxl-int8"
    assert main(["models", "quantize", "t5-xxl", "--method", "int8-weight-only", "-o", str(quantized),
                 "--models-file", str(models_file)]) == 0
    report = evaluate(config, [quantized, out], tmp_path / "eval", per_criterion=2)
    for criterion, rows in report["results"].items():
        ours, int8 = rows[out.name], rows["t5-xxl-int8"]
        assert int8["embedding_cosine"] > 0.99 and int8["psnr"] > ours["psnr"], (criterion, int8, ours)


def test_eval_with_a_lora_and_a_controlnet_on_every_image(distilled, demo_dir, tmp_path):
    """The LoRA and ControlNet apply to the teacher's and the students' images alike: the images differ from a plain
    eval's, and the report records what was applied."""
    from service.models.generation import ControlInput

    config, out = distilled
    square = Image.new("RGB", (64, 64))
    square.paste((200, 200, 200), (16, 16, 48, 48))
    plain = evaluate(config, [out], tmp_path / "plain", per_criterion=1)
    both = evaluate(config, [out], tmp_path / "both", per_criterion=1, loras=(("flux-style", 1.0),),
                    control=ControlInput(name="flux-canny", image=square))
    assert both["loras"] == [{"name": "flux-style", "scale": 1.0}] and both["control"]["name"] == "flux-canny"
    assert plain["loras"] == [] and plain["control"] is None
    for criterion, rows in both["results"].items():
        assert rows[out.name]["psnr"] != plain["results"][criterion][out.name]["psnr"], criterion
    assert main(["eval", "--preset", "tiny-cpu", f"--models_file={demo_dir / 'models.yaml'}", f"--data={config.data}",
                 "--student", str(out), "--out", str(tmp_path / "cli"), "--prompts", "1", "--lora", "flux-style",
                 "--control", "flux-canny", "--control-image", str(tmp_path / "nope.png")]) == 2  # unreadable image
