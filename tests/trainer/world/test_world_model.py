"""The shipped miniature kit: the teacher draws what prompts say (a reduced check of the numbers in
docs/miniature.md), it is the default models file, and a short distillation in this world improves a student's
accuracy over its untrained start."""

import json
import random

import pytest

from service.models.generation import GenerationRequest, Generator
from service.models.registry import MINIATURE_KIT, Registry, default_models_file, with_absolute_sources
from trainer.world.accuracy import encoder_accuracy, per_prompt
from trainer.world.captions import caption
from trainer.world.scene import sample

pytestmark = pytest.mark.skipif(not MINIATURE_KIT.exists(), reason="the miniature kit is not built")


@pytest.fixture(scope="module")
def generator():
    return Generator(Registry.from_file(MINIATURE_KIT))


def single_prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [caption(sample(rng, "single"), rng) for _ in range(n)]


def test_it_is_the_default_models_file(monkeypatch):
    from service.settings import get_settings

    monkeypatch.delenv("T2I_MODELS_FILE", raising=False)
    get_settings.cache_clear()
    try:
        assert default_models_file() == MINIATURE_KIT
    finally:
        get_settings.cache_clear()


def test_the_teacher_draws_single_objects(generator):
    prompts = single_prompts(24, seed=20_000)
    report = encoder_accuracy(generator, "flux", "t5-xxl", prompts, details=True)
    acc = report["attributes"]
    # Reduced thresholds of the documented figures (docs/miniature.md: colour 99.8-100%, position 99.3-99.5%, shape
    # 98-98.7%, size 98-98.8%, every attribute 97% of never-seen single prompts), on 24 fixed held-out prompts (10 of
    # them state a size): at most 1, 1, 1 and 1 misses, 2 images wrong (the shipped kit: none wrong, as the kit before).
    assert acc["color"] >= 0.95 and acc["position"] >= 0.95 and acc["shape"] >= 0.95, acc
    assert acc["size"] >= 0.9, acc
    assert report["criteria"]["semantics"] >= 0.9, report["criteria"]
    # The per-image details agree with the figures: one row per image, and as many wrong colours as the rate says.
    rows = report["images"]
    assert [r["prompt"] for r in rows] == prompts and [r["seed"] for r in rows] == list(range(24))
    assert sum("color" in r["wrong"] for r in rows) == round((1 - acc["color"]) * 24)
    for r in rows:
        if "color" not in r["wrong"]:  # the largest object found has the prompt's colour
            assert r["found"] and r["found"][0][0] in r["prompt"], r


def test_the_teacher_draws_the_readme_prompts_on_at_least_4_of_seeds_0_to_4(generator):
    """What a new user sends first: each prompt with request seeds 0-4, as `t2i serve` draws them."""
    prompts = ["a red circle above a blue square", "two green triangles", "a sign reading 'cat'"]
    report = encoder_accuracy(generator, "flux", "t5-xxl", prompts, seeds=5, same_seeds=True, details=True)
    right = {p: per_prompt(report["images"])[p]["right_seeds"] for p in prompts}
    assert all(len(seeds) >= 4 for seeds in right.values()), right


def test_every_encoder_in_the_kit_generates(generator):
    for name in generator.registry.encoders:
        image = generator.generate(GenerationRequest(prompt="a red circle on the left", pipeline="flux",
                                                     encoder=name, seed=1, steps=4)).images[0]
        assert image.size == (32, 32)


def test_a_short_distillation_improves_a_students_accuracy(tmp_path):
    """A fresh random student (t5-small size) gets better at colours after 600 steps of step-following (120 five-step trajectories)."""
    import yaml

    from service.models.demo import build_student, build_t5_tokenizer
    from trainer.config import DistillConfig, load_config
    from trainer.distill import train
    from trainer.export import export
    from trainer.world.prompts import write_prompts
    from trainer.world.train import STUDENTS, TEACHER

    tokenizer = build_t5_tokenizer()
    student_dir = tmp_path / "student"
    build_student(STUDENTS[-1], tokenizer, seed=99, project_out_dim=TEACHER.d_model).save_pretrained(student_dir)
    tokenizer.save_pretrained(student_dir)
    write_prompts(tmp_path / "data", train=800, validation=40)
    config = load_config(DistillConfig, "miniature", [
        f"--models_file={MINIATURE_KIT}", f"--student={student_dir}", f"--data={tmp_path / 'data'}",
        f"--output_dir={tmp_path / 'run'}", "--max_steps=600", "--trajectory_steps=5", "--eval_every=600",
        "--checkpoint_every=600",
        "--threads=2"])  # both cores: the suite runs one test at a time
    train(config, show_progress=False)
    export(tmp_path / "run", tmp_path / "distilled")

    models = with_absolute_sources(yaml.safe_load(MINIATURE_KIT.read_text()), MINIATURE_KIT.parent)
    models.pop("routes")  # they name encoders this registry replaces
    models["encoders"] = {"t5-xxl": models["encoders"]["t5-xxl"],
                          "untrained": {"kind": "student", "source": str(student_dir), "max_sequence_length": 16},
                          "distilled": {"kind": "student", "source": str(tmp_path / "distilled"),
                                        "max_sequence_length": 16}}
    (tmp_path / "models.yaml").write_text(yaml.safe_dump(models))
    generator = Generator(Registry.from_file(tmp_path / "models.yaml"))
    prompts = single_prompts(16, seed=30_000)
    before = encoder_accuracy(generator, "flux", "untrained", prompts)["attributes"]
    after = encoder_accuracy(generator, "flux", "distilled", prompts)["attributes"]
    assert after["color"] >= before["color"] + 0.25, (before, after)


def test_world_eval_reports_intervals_bytes_and_draws_the_frontier(tmp_path, capsys):
    import json

    from PIL import Image

    from service.cli import main

    out, chart = tmp_path / "eval.json", tmp_path / "frontier.png"
    assert main(["world", "eval", "--models-file", str(MINIATURE_KIT), "--encoder", "t5-xxl", "--encoder",
                 "t5-xxl-nf4", "--encoder", "t5-small", "--prompts", "4", "--seeds", "2", "--steps", "4",
                 "--out", str(out), "--chart", str(chart)]) == 0
    report = json.loads(out.read_text())
    assert list(report) == ["t5-xxl", "t5-xxl-nf4", "t5-small"]
    for name, r in report.items():
        assert r["seeds"] == 2 and r["n"]["semantics"] == 6 and r["n"]["text_rendering"] == 2  # 3 + 1 prompts x 2
        for key, (low, high) in r["intervals"].items():
            value = r["criteria"].get(key, r["attributes"].get(key))
            assert 0 <= low <= value <= high <= 1, (name, key)
    assert report["t5-xxl-nf4"]["quantization"] == "bnb-nf4"
    assert report["t5-small"]["bytes"] < report["t5-xxl-nf4"]["bytes"] < report["t5-xxl"]["bytes"]
    assert Image.open(chart).size[0] > 500
    assert "| t5-xxl-nf4 |" in capsys.readouterr().out


def test_world_eval_of_a_route_and_of_a_validation_guidance(tmp_path, capsys):
    """`--encoder auto` runs each prompt on the encoder the route picks (the same images as naming it: the same
    scores), and reports jobs per encoder and the mean bytes per job; `--validation --cfg` evaluates only semantic prompts,
    those of the validation seed, at the guidance given."""
    import json

    from service.cli import main
    from trainer.world.captions import held_out_prompts, parse

    out = tmp_path / "eval.json"
    assert main(["world", "eval", "--models-file", str(MINIATURE_KIT), "--encoder", "t5-xxl", "--encoder", "t5-base",
                 "--encoder", "auto", "--prompts", "8", "--steps", "4", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    kinds = [parse(p)["kind"] for p in held_out_prompts(8)]
    assert report["auto"]["routed"] == {"t5-base": kinds.count("single") + kinds.count("count")
                                        + kinds.count("relation"), "t5-xxl": kinds.count("text")}
    assert report["auto"]["criteria"]["text_rendering"] == report["t5-xxl"]["criteria"]["text_rendering"]
    assert report["auto"]["criteria"]["semantics"] == report["t5-base"]["criteria"]["semantics"]
    routed = report["auto"]["routed"]
    assert report["auto"]["bytes"] == round((report["t5-xxl"]["bytes"] * routed["t5-xxl"]
                                             + report["t5-base"]["bytes"] * routed["t5-base"]) / 8)
    assert "| auto |" in capsys.readouterr().out

    assert main(["world", "eval", "--models-file", str(MINIATURE_KIT), "--encoder", "t5-xxl", "--validation",
                 "--cfg", "1.0", "--prompts", "6", "--steps", "4", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["t5-xxl"]["n"]["semantics"] == 6 and "text_rendering" not in report["t5-xxl"]["n"]
    assert "images" not in report["t5-xxl"]  # only with --details

    assert main(["world", "eval", "--models-file", str(MINIATURE_KIT), "--encoder", "t5-xxl", "--validation",
                 "--prompts", "3", "--steps", "4", "--details", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["t5-xxl"]["images"]
    assert [r["prompt"] for r in rows] == held_out_prompts(3, seed=4242, kinds=("single", "count", "relation"))
    assert main(["world", "eval", "--models-file", str(MINIATURE_KIT), "--encoder", "t5-xxl", "--validation",
                 "--kind", "text", "--prompts", "2", "--steps", "4", "--details", "--out", str(out)]) == 0
    report = json.loads(out.read_text())["t5-xxl"]
    assert [r["prompt"] for r in report["images"]] == held_out_prompts(2, seed=4242, kinds=("text",))
    assert report["n"] == {"text_rendering": 2, "text": 2}, report["n"]
    assert main(["world", "eval", "--models-file", str(MINIATURE_KIT), "--details"]) == 2
    assert "`--details` lists every image in the JSON report: give `--out FILE` too" in capsys.readouterr().err
    assert main(["world", "eval", "--models-file", str(MINIATURE_KIT), "--novel", "--kind", "count"]) == 2
    assert "`--kind` ['count'] with `--novel`" in capsys.readouterr().err


def test_world_eval_of_given_prompts_uses_the_request_seeds(tmp_path, capsys, generator):
    """`--prompt` evaluates the prompts given on seeds 0..N-1, the images requests with those seeds get (the README
    check), and says per prompt on which seeds every attribute came out right; a prompt outside the grammar fails
    before any model loads, naming the flag."""
    import json

    import numpy as np

    from service.cli import main
    from trainer.world.accuracy import drawn
    from trainer.world.captions import parse
    from trainer.world.evaluator import score

    out = tmp_path / "eval.json"
    prompts = ["two green triangles", "a red circle above a blue square"]
    assert main(["world", "eval", "--models-file", str(MINIATURE_KIT), "--encoder", "t5-xxl", "--prompt", prompts[0],
                 "--prompt", prompts[1], "--seeds", "2", "--steps", "4", "--details", "--out", str(out)]) == 0
    report = json.loads(out.read_text())["t5-xxl"]
    assert [(r["prompt"], r["seed"]) for r in report["images"]] == [(p, s) for s in (0, 1) for p in prompts]
    for p in prompts:
        got = report["per_prompt"][p]
        assert got["of"] == 2 and got["right"] == len(got["right_seeds"])
        assert got["right_seeds"] == [r["seed"] for r in report["images"] if r["prompt"] == p and not r["wrong"]]
    # The image of seed 1 is the one a request with seed 1 gets.
    image = np.asarray(generator.generate(GenerationRequest(prompt=prompts[1], pipeline="flux", encoder="t5-xxl",
                                                            seed=1, steps=4)).images[0].convert("RGB"))
    row = report["images"][3]
    assert row["found"] == drawn(image)
    assert row["wrong"] == sorted(k for k, v in score(image, parse(prompts[1])).items() if not v)
    assert f"{prompts[0]!r}: every attribute right on {report['per_prompt'][prompts[0]]['right']} of 2" \
        in capsys.readouterr().out

    assert main(["world", "eval", "--models-file", str(MINIATURE_KIT), "--prompt", "a photo of a fox"]) == 2
    assert "`--prompt` 'a photo of a fox' is outside the miniature world's grammar" in capsys.readouterr().err


def test_the_paper_distils_each_student_once_per_seed_and_reads_each_prompt_on_each_seed(tmp_path):
    """`t2i world paper` on the shipped kit (whose students are installed ones): every run once per distillation seed
    (different students from the same untrained start), every encoder read on the same prompts with `seeds` seeds each,
    a row per encoder in the table."""
    from safetensors.torch import load_file

    from trainer.world.paper import run_paper

    out = tmp_path / "paper"
    report = run_paper(MINIATURE_KIT.parent, out, max_steps=2, prompts=4, seeds=2, distill_seeds=2,
                       runs=(("t5-small", "step-following"),), lr={"t5-small": 2e-3}, show_progress=False)
    assert list(report) == ["t5-xxl", "t5-small-distilled", "t5-small-distilled-seed1", "t5-large", "t5-base",
                            "t5-small"]
    for name, r in report.items():
        assert r["seeds"] == 2 and r["n"]["semantics"] == 6 and r["n"]["text_rendering"] == 2, name
    assert [report[n].get("distill_seed") for n in report] == [None, 0, 1, None, None, None]
    assert [report[n].get("student_init") for n in report] == [None, *["local"] * 5]
    assert [report[n].get("lr") for n in report] == [None, 2e-3, 2e-3, None, None, None]
    # By default the students learn from a prompt set with each kind a quarter of the rows (signs repeated).
    assert report["t5-small-distilled"]["even_kinds"] is True
    assert json.loads((out / "world-data" / "manifest.json").read_text())["counts"]["train"]["text_rendering"] == 1000
    first, second = (load_file(out / "students" / n / "model.safetensors")
                     for n in ("t5-small-distilled", "t5-small-distilled-seed1"))
    assert first.keys() == second.keys() and any(not first[k].equal(second[k]) for k in first)
    assert "| t5-small-distilled-seed1 |" in (out / "results.md").read_text()
    # The untrained rows (and the students' start) are the random students `t2i world train` makes, not the kit's
    # installed ones.
    import yaml

    sources = {n: e["source"] for n, e in yaml.safe_load((out / "models.yaml").read_text())["encoders"].items()}
    assert {sources[n] for n in ("t5-large", "t5-base", "t5-small")} == {
        str(out / "untrained" / n) for n in ("t5-large", "t5-base", "t5-small")}


def test_the_paper_takes_students_already_distilled_with_the_same_settings_and_refuses_others(tmp_path, capsys):
    """OUT/students alone carries a study over (its training checkpoints gone): a student exported with the same
    settings is read, not distilled again; one made with other settings is refused, naming the setting."""
    import shutil

    from service.errors import ConfigError
    from trainer.world.paper import RUN_RECORD, run_paper

    out, runs = tmp_path / "paper", (("t5-small", "step-following"),)
    run_paper(MINIATURE_KIT.parent, out, max_steps=2, prompts=2, seeds=1, distill_seeds=1, runs=runs,
              show_progress=False)
    weights = out / "students" / "t5-small-distilled" / "model.safetensors"
    made = weights.stat().st_mtime_ns
    assert json.loads((weights.parent / RUN_RECORD).read_text())["max_steps"] == 2
    shutil.rmtree(out / "runs")
    report = run_paper(MINIATURE_KIT.parent, out, max_steps=2, prompts=2, seeds=1, distill_seeds=1, runs=runs)
    assert "t5-small-distilled: already distilled with these settings" in capsys.readouterr().out
    assert weights.stat().st_mtime_ns == made and not (out / "runs").exists()
    assert report["t5-small-distilled"]["max_steps"] == 2
    with pytest.raises(ConfigError, match="max_steps=2, and this study asks for max_steps=3"):
        run_paper(MINIATURE_KIT.parent, out, max_steps=3, prompts=2, seeds=1, distill_seeds=1, runs=runs,
                  show_progress=False)


def test_runs_distilled_in_parallel_processes_are_the_runs_distilled_one_after_another(tmp_path, capsys):
    """`--jobs 2`: each run in its own process gives the very student it gives alone, from its own seed; and a seed
    asked for alone (`--distill-seed 1`, adding a seed to a study) gives the student it gives beside seed 0."""
    from safetensors.torch import load_file

    from trainer.world.paper import run_paper

    runs = (("t5-small", "step-following"),)
    for name, jobs in (("serial", 1), ("parallel", 2)):
        run_paper(MINIATURE_KIT.parent, tmp_path / name, max_steps=2, prompts=1, seeds=1, distill_seeds=2, runs=runs,
                  jobs=jobs, show_progress=jobs > 1)
    out = capsys.readouterr().out
    assert "distilling 2 runs, 2 at a time" in out and "t5-small-distilled-seed1: done after" in out
    for student in ("t5-small-distilled", "t5-small-distilled-seed1"):
        a, b = (load_file(tmp_path / run / "students" / student / "model.safetensors")
                for run in ("serial", "parallel"))
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), student

    report = run_paper(MINIATURE_KIT.parent, tmp_path / "alone", max_steps=2, prompts=1, seeds=1, distill_seeds=(1,),
                       runs=runs, show_progress=False)
    assert [n for n in report if "distilled" in n] == ["t5-small-distilled-seed1"]
    assert sorted(p.name for p in (tmp_path / "alone" / "students").iterdir()) == ["t5-small-distilled-seed1"]
    a, b = (load_file(tmp_path / run / "students" / "t5-small-distilled-seed1" / "model.safetensors")
            for run in ("serial", "alone"))
    assert all(a[k].equal(b[k]) for k in a)


def test_an_outlier_kit_draws_the_same_images_from_embeddings_with_a_few_huge_channels(tmp_path, generator, capsys):
    """`t2i world outliers`: the teacher's embeddings get a few channels 50x larger (as real T5 v1.1's have), every
    consumer of them is scaled back, so the teacher draws the same images; a second run into the same directory is
    refused, naming the flag."""
    import numpy as np
    import torch
    from diffusers import FluxControlNetModel
    from transformers import AutoTokenizer, T5EncoderModel

    from service.cli import main

    kit, out = MINIATURE_KIT.parent, tmp_path / "outliers"
    assert main(["world", "outliers", "--kit", str(kit), "-o", str(out), "--channels", "3", "--scale", "50"]) == 0
    tokenizer = AutoTokenizer.from_pretrained(kit / "encoders" / "t5-xxl")
    ids = tokenizer(["two green triangles", "a sign reading 'cat'"], return_tensors="pt", padding=True)
    with torch.no_grad():
        before, after = (T5EncoderModel.from_pretrained(k / "encoders" / "t5-xxl")(**ids).last_hidden_state
                         for k in (kit, out))
    changed = [c for c in range(before.shape[-1]) if not torch.allclose(before[..., c], after[..., c])]
    assert len(changed) == 3
    assert torch.allclose(after[..., changed], 50 * before[..., changed], rtol=1e-4, atol=1e-5)
    assert after[..., changed].abs().mean() > 10 * after.abs().mean()
    old, new = (FluxControlNetModel.from_pretrained(k / "controlnets" / "flux-canny").context_embedder.weight
                for k in (kit, out))
    assert torch.allclose(new[:, changed] * 50, old[:, changed], rtol=1e-4, atol=1e-6)

    other = Generator(Registry.from_file(out / "models.yaml"))
    for prompt, seed in (("two green triangles", 0), ("a red circle above a blue square", 3)):
        a, b = (np.asarray(g.generate(GenerationRequest(prompt=prompt, pipeline="flux", encoder="t5-xxl", seed=seed,
                                                        steps=8)).images[0], dtype=int) for g in (generator, other))
        assert np.abs(a - b).max() <= 2, prompt

    assert main(["world", "outliers", "--kit", str(kit), "-o", str(out)]) == 2
    assert "`--output`" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "field"), [
    (["--student", "t5-small", "--mode", "embedding-mse"], "`--student` ['t5-small'] with `--mode` ['embedding-mse']"),
    (["--distill-seed", "-1"], "`--distill-seed`=-1 must be at least 0"),
    (["--distill-seed", "1", "--install"], "`--install` takes distillation seed 0's students"),
    (["--mode", "embedding-mse", "--install"], "drop `--student` and `--mode`"),
])
def test_the_paper_refuses_runs_it_cannot_make_before_distilling(tmp_path, capsys, args, field):
    from service.cli import main

    assert main(["world", "paper", "--kit", str(MINIATURE_KIT.parent), "-o", str(tmp_path / "p"), *args]) == 2
    assert field in capsys.readouterr().err and not (tmp_path / "p").exists()


@pytest.mark.parametrize("bad", ["t5-huge=0.001", "t5-large=0", "t5-large=fast", "t5-large"])
def test_the_paper_refuses_a_learning_rate_it_cannot_use_before_distilling(tmp_path, capsys, bad):
    from service.cli import main

    assert main(["world", "paper", "--kit", str(MINIATURE_KIT.parent), "-o", str(tmp_path / "p"), "--lr", bad]) == 2
    assert "`--lr`" in capsys.readouterr().err and not (tmp_path / "p").exists()


def test_batched_reading_draws_the_same_images_faster_in_one_call_per_encoder(generator):
    """`batch` draws several images per denoising call (a route's chunk split by encoder): the same jobs in the same
    order, and the same images up to the rounding of batched kernels, so the evaluator finds the same objects."""
    from trainer.world.captions import held_out_prompts

    prompts = held_out_prompts(6)
    one, five = (encoder_accuracy(generator, "flux", "auto", prompts, seeds=2, steps=4, details=True, batch=b)
                 for b in (1, 5))
    assert one["routed"] == five["routed"] and len(one["images"]) == len(five["images"]) == 12
    assert [(r["prompt"], r["seed"], r["encoder"]) for r in one["images"]] == \
        [(r["prompt"], r["seed"], r["encoder"]) for r in five["images"]]
    differ = [(a, b) for a, b in zip(one["images"], five["images"])
              if [f[:2] for f in a["found"]] != [f[:2] for f in b["found"]]
              or any(abs(x[2] - y[2]) > 3 for x, y in zip(a["found"], b["found"]))]
    assert len(differ) <= 1, differ
