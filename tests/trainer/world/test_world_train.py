"""`t2i world train`: budgets in steps, held-out combinations kept out of training, and a run killed mid-way resumes
to the very weights an uninterrupted run reaches."""

import os
import random
import signal
import subprocess
import sys
import time

import torch
import yaml
from safetensors.torch import load_file

from service.models.devices import bf16_arithmetic
from trainer.world.captions import is_novel, novel_prompts, parse, training_scene
from trainer.world.prompts import write_prompts
from trainer.world.train import batch


def test_training_never_draws_a_held_out_combination_and_the_novel_set_holds_only_those():
    rng = random.Random(0)
    for _ in range(3000):
        scene, text = training_scene(rng)
        assert not is_novel(scene, text)
    _, captions = batch(random.Random(1), 256)
    novel = set(novel_prompts(200))
    assert not novel & set(captions)
    kinds = {parse(p)["kind"] for p in novel}
    assert kinds == {"single", "text"} and len(novel) > 50
    # every word is still seen in training, with its other templates: the held-out part is the combination
    seen_words = {parse(t)["word"] for _, t in (training_scene(rng, "text") for _ in range(2000))}
    assert {parse(p)["word"] for p in novel if parse(p)["kind"] == "text"} <= seen_words


def test_the_distillation_prompt_set_has_no_held_out_combination(tmp_path):
    import json

    write_prompts(tmp_path, train=400, validation=40)
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert not {r["prompt"] for r in rows} & set(novel_prompts(300))


def test_even_kinds_give_signs_a_quarter_of_the_prompt_set_by_repeating_them(tmp_path):
    """Distinct captions alone leave about 1% signs (the world has few distinct sign captions); `even_kinds` gives
    each kind a quarter, repeating sign captions once they run out, still with no held-out combination."""
    import json

    plain = write_prompts(tmp_path / "plain", train=2000, validation=40)
    even = write_prompts(tmp_path / "even", train=2000, validation=40, even_kinds=True)
    assert plain["counts"]["train"].get("text_rendering", 0) < 0.05 * 2000
    assert even["counts"]["train"]["text_rendering"] == 500
    assert even["distinct"]["train"]["text_rendering"] < 500 and even["even_kinds"] is True
    rows = [json.loads(line) for line in (tmp_path / "even" / "train.jsonl").read_text().splitlines()]
    assert [r["category"] for r in rows[:4]] == ["single", "count", "relation", "text"]
    assert not {r["prompt"] for r in rows} & set(novel_prompts(300))


def _train(out, *extra, wait=True):
    env = {**os.environ, "T2I_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "service.cli", "world", "train", "-o", str(out), "--steps", "6", "--vae-steps", "3",
           "--checkpoint-every", "2", *extra]
    if wait:
        return subprocess.run(cmd, env=env, capture_output=True, text=True)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_a_killed_run_resumes_to_the_uninterrupted_weights(tmp_path):
    whole = _train(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-2000:]

    # Kill a second run (SIGKILL: no goodbye) once its first denoiser checkpoint is on disk, then rerun the command.
    process = _train(tmp_path / "cut", wait=False)
    state = tmp_path / "cut" / "work" / "denoiser" / "state.json"
    while not state.exists() and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    import json

    assert json.loads(state.read_text())["step"] < 6  # killed mid-run
    resumed = _train(tmp_path / "cut")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert '"resumed_at"' in (tmp_path / "cut" / "train_log.jsonl").read_text()
    start = json.loads((tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()[0])
    assert start["device"] == ("cuda" if torch.cuda.is_available() else "cpu")

    a = load_file(tmp_path / "whole/pipelines/flux/transformer/diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "cut/pipelines/flux/transformer/diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_device_that_does_not_exist_is_refused_before_anything_is_written(tmp_path):
    refused = _train(tmp_path / "run", "--device", "tpu")
    assert refused.returncode == 2 and "device 'tpu' is not a device name" in refused.stderr, refused.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_the_denoiser_width_is_a_flag_and_a_resume_with_another_is_refused(tmp_path):
    import json

    narrow = _train(tmp_path / "run", "--heads", "2")
    assert narrow.returncode == 0, narrow.stderr[-2000:]
    config = json.loads((tmp_path / "run/pipelines/flux/transformer/config.json").read_text())
    assert config["num_attention_heads"] == 2
    assert json.loads((tmp_path / "run/work/denoiser/state.json").read_text())["architecture"]["heads"] == 2
    wider = _train(tmp_path / "run", "--heads", "3")
    assert wider.returncode == 2 and "heads=2" in wider.stderr and "heads=3" in wider.stderr, wider.stderr[-2000:]
    refused = _train(tmp_path / "other", "--heads", "0")
    assert refused.returncode == 2 and "`--heads`=0 must be at least 1" in refused.stderr, refused.stderr[-2000:]


def test_the_kit_stores_its_denoiser_in_float16_by_default_and_the_service_loads_it_in_float32(tmp_path):
    from service.models.denoiser import Denoiser
    from service.models.registry import load_registry

    half = _train(tmp_path / "half")  # the default, float16
    assert half.returncode == 0, half.stderr[-2000:]
    flux = tmp_path / "half/pipelines/flux"
    weights = load_file(flux / "transformer/diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float16}
    assert {t.dtype for t in load_file(flux / "vae/diffusion_pytorch_model.safetensors").values()} == {torch.float32}
    trained = load_file(tmp_path / "half/work/denoiser/ema.safetensors")  # what training kept, in float32
    assert {t.dtype for t in trained.values()} == {torch.float32}
    assert all(torch.equal(weights[k], v.half()) for k, v in trained.items())
    spec = load_registry(tmp_path / "half/models.yaml").pipeline("flux")
    assert {p.dtype for p in Denoiser.load(spec, device="cpu").pipe.transformer.parameters()} == {torch.float32}
    bad = _train(tmp_path / "bad", "--denoiser-dtype", "int8")
    assert bad.returncode == 2 and "--denoiser-dtype" in bad.stderr, bad.stderr[-2000:]


def test_the_denoiser_batch_is_a_flag_and_a_resume_with_another_is_refused(tmp_path):
    import json

    small = _train(tmp_path / "run", "--batch", "4")
    assert small.returncode == 0, small.stderr[-2000:]
    assert json.loads((tmp_path / "run/work/denoiser/state.json").read_text())["recipe"]["batch"] == 4
    other = _train(tmp_path / "run", "--batch", "8")
    assert other.returncode == 2 and "batch=4" in other.stderr and "batch=8" in other.stderr, other.stderr[-2000:]
    refused = _train(tmp_path / "none", "--batch", "0")
    assert refused.returncode == 2 and "`--batch`=0 must be at least 1" in refused.stderr, refused.stderr[-2000:]


def test_the_timestep_location_is_recorded_and_a_resume_with_another_is_refused(tmp_path):
    import json

    shifted = _train(tmp_path / "run", "--timestep-mean", "0.8")
    assert shifted.returncode == 0, shifted.stderr[-2000:]
    recipe = json.loads((tmp_path / "run/work/denoiser/state.json").read_text())["recipe"]
    assert recipe == {"timestep_mean": 0.8, "mix": {"single": 0.15, "count": 0.45, "relation": 0.25, "text": 0.15},
                      "teacher": "local", "batch": 64, "precision": "float32", "lr": 0.001, "warmup": 200,
                      "ema": 0.999, "start": None}  # the shipped kit's first stage
    assert yaml.safe_load((tmp_path / "run/models.yaml").read_text())["pipelines"]["flux"]["true_cfg_scale"] == 1.0
    other = _train(tmp_path / "run")  # the default, 1.0
    assert other.returncode == 2 and "timestep_mean=0.8" in other.stderr and "timestep_mean=1.0" in other.stderr, \
        other.stderr[-2000:]
    out_of_range = _train(tmp_path / "far", "--timestep-mean", "9")
    assert out_of_range.returncode == 2 and "within [-3, 3]" in out_of_range.stderr, out_of_range.stderr[-2000:]


def test_bfloat16_training_is_recorded_changes_the_arithmetic_and_a_resume_in_float32_is_refused(tmp_path):
    import json

    fast, full = _train(tmp_path / "run", "--precision", "bfloat16"), _train(tmp_path / "full")
    assert fast.returncode == 0 and full.returncode == 0, (fast.stderr + full.stderr)[-2000:]
    assert json.loads((tmp_path / "run/work/denoiser/state.json").read_text())["recipe"]["precision"] == "bfloat16"
    # where this CPU emulates bfloat16, the run says so (and that float32 is faster); where it has it, it does not
    emulated = bf16_arithmetic(torch.device("cpu")) is None
    assert ("has no bfloat16 arithmetic" in fast.stdout) == emulated, fast.stdout[-2000:]
    assert "has no bfloat16 arithmetic" not in full.stdout
    # the same seed and batches: finite weights that moved differently from the float32 run's
    bf16, fp32 = (load_file(tmp_path / d / "work/denoiser/transformer.safetensors") for d in ("run", "full"))
    assert all(torch.isfinite(t).all() for t in bf16.values())
    assert any(not torch.equal(bf16[k], fp32[k]) for k in fp32)
    # the kit stores the denoiser as asked (float16), whatever the training arithmetic
    kit = load_file(tmp_path / "run/pipelines/flux/transformer/diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in kit.values()} == {torch.float16}
    other = _train(tmp_path / "run")  # the default, float32
    assert other.returncode == 2 and "precision=bfloat16" in other.stderr and "precision=float32" in other.stderr, \
        other.stderr[-2000:]
    wrong = _train(tmp_path / "none", "--precision", "float8")
    assert wrong.returncode == 2 and "--precision" in wrong.stderr, wrong.stderr[-2000:]


def test_the_caption_mix_draws_its_kinds_in_proportion():
    _, captions = batch(random.Random(2), 2000, {"count": 3.0, "relation": 1.0})
    kinds = [parse(c)["kind"] for c in captions]
    assert set(kinds) == {"count", "relation"}
    assert 0.70 < kinds.count("count") / len(kinds) < 0.80  # 3:1, about 0.75


def test_the_caption_mix_and_teacher_are_recorded_a_resume_with_another_is_refused_and_bad_mixes_are_named(tmp_path):
    import json

    from transformers import T5EncoderModel

    mixed = _train(tmp_path / "run", "--mix", "count=0.5,relation=0.5", "--teacher", "local")
    assert mixed.returncode == 0, mixed.stderr[-2000:]
    recipe = json.loads((tmp_path / "run/work/denoiser/state.json").read_text())["recipe"]
    assert recipe["mix"] == {"count": 0.5, "relation": 0.5} and recipe["teacher"] == "local"
    # the kit's teacher is the local one: its first head's bias toward the previous word (bucket 1) is the largest
    bias = T5EncoderModel.from_pretrained(tmp_path / "run/encoders/t5-xxl").encoder.block[0].layer[0] \
        .SelfAttention.relative_attention_bias.weight
    assert bias[:, 0].argmax() == 1 and bias[1, 0] > 9
    random_teacher = _train(tmp_path / "run", "--mix", "count=0.5,relation=0.5", "--teacher", "random")
    assert random_teacher.returncode == 2 and "teacher=local" in random_teacher.stderr, random_teacher.stderr[-2000:]
    default = _train(tmp_path / "run")
    assert default.returncode == 2 and "mix=" in default.stderr and "'relation': 0.5" in default.stderr, \
        default.stderr[-2000:]
    for bad, says in (("count=0.5,colour=1", "'colour' is not a kind of scene"),
                      ("count=lots", "the weight of count must be a number"),
                      ("count=-1,text=2", "the weight of count must be at least 0"),
                      ("count=0,text=0", "at least one weight must be above 0")):
        refused = _train(tmp_path / "bad", "--mix", bad)
        assert refused.returncode == 2 and says in refused.stderr, (bad, refused.stderr[-2000:])
    assert not (tmp_path / "bad" / "work").exists()  # refused before anything was written


def test_untrained_students_start_with_the_local_attention_prior_or_without_it(tmp_path):
    """The same random weights either way, but with `init="local"` the relative-position bias of the first heads
    points at the previous and the next word (and the word itself where there is a third head)."""
    from service.models.demo import build_t5_tokenizer
    from service.models.student import T5EncoderWithProjection
    from trainer.world.train import write_untrained_students

    tokenizer = build_t5_tokenizer()
    local = write_untrained_students(tmp_path / "local", tokenizer)
    plain = write_untrained_students(tmp_path / "random", tokenizer, init="random")
    for role in local:
        a, b = (T5EncoderWithProjection.from_pretrained(d[role]).state_dict() for d in (local, plain))
        key = "encoder.encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        assert [k for k in a if not a[k].equal(b[k])] == [key], role
        heads = a[key].shape[1]
        assert [a[key][:, h].argmax().item() for h in range(min(heads, 2))] == [1, 17], role  # previous, next
        assert a[key].max() > 9 and b[key].abs().max() < 5, role


def test_a_second_stage_goes_on_from_a_kit_records_its_start_and_refuses_what_does_not_fit(tmp_path):
    import json

    first = _train(tmp_path / "first")
    assert first.returncode == 0, first.stderr[-2000:]
    stage = ("--from", str(tmp_path / "first"), "--lr", "1e-9", "--warmup", "1", "--mix", "single=1", "--ema", "0")
    second = _train(tmp_path / "second", *stage)
    assert second.returncode == 0, second.stderr[-2000:]
    # it starts from the first kit's denoiser (at a learning rate of 1e-9 its weights stay there, to float16), with
    # the first kit's VAE and teacher; a ControlNet is not carried over (one is trained against its denoiser)
    for part in ("pipelines/flux/transformer/diffusion_pytorch_model.safetensors",
                 "pipelines/flux/vae/diffusion_pytorch_model.safetensors", "encoders/t5-xxl/model.safetensors"):
        a, b = (load_file(tmp_path / d / part) for d in ("first", "second"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    fresh = load_file(tmp_path / "first/work/denoiser/transformer.safetensors")
    went_on = load_file(tmp_path / "second/work/denoiser/transformer.safetensors")
    assert any(not torch.equal(fresh[k], went_on[k]) for k in fresh)  # it did train: float32 moved by ~1e-9
    assert (tmp_path / "second/models.yaml").is_file() and not (tmp_path / "second/controlnets").exists()
    recipe = json.loads((tmp_path / "second/work/denoiser/state.json").read_text())["recipe"]
    assert len(recipe["start"]) == 16 and recipe["lr"] == 1e-9 and recipe["mix"] == {"single": 1.0}
    assert recipe["ema"] == 0.0
    assert json.loads((tmp_path / "second/train_log.jsonl").read_text().splitlines()[0])["from"] == \
        str(tmp_path / "first")
    # a rerun without the start, or at another rate, is not the same stage
    alone = _train(tmp_path / "second", *stage[2:])
    assert alone.returncode == 2 and f"start={recipe['start']}" in alone.stderr and "start=None" in alone.stderr, \
        alone.stderr[-2000:]
    faster = _train(tmp_path / "second", *stage[:2], "--lr", "1e-4", *stage[4:])
    assert faster.returncode == 2 and "lr=1e-09" in faster.stderr and "lr=0.0001" in faster.stderr, \
        faster.stderr[-2000:]
    for extra, says in ((("--from", str(tmp_path / "none")), "`--from` " + str(tmp_path / "none")
                         + ": no pipelines/flux/transformer"),
                        (("--from", str(tmp_path / "first"), "--heads", "2"), "num_attention_heads=8, and this run "
                         "asks for 2: give the kit's `--heads`"),
                        (("--lr", "0"), "`--lr`=0.0 must be above 0 and below 1"),
                        (("--ema", "1"), "`--ema`=1.0 must be within [0, 1)"),
                        (("--warmup", "0"), "`--warmup`=0 must be at least 1")):
        refused = _train(tmp_path / "refused", *extra)
        assert refused.returncode == 2 and says in refused.stderr, (extra, refused.stderr[-2000:])
    same = _train(tmp_path / "first", "--from", str(tmp_path / "first"))
    assert same.returncode == 2 and "is the output directory" in same.stderr, same.stderr[-2000:]
