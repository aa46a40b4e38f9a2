"""The trainer with the teacher-embedding cache against a live teacher: steps/s and peak memory, each run in a fresh
process on the same prompts, preset `tiny-cpu` on the demo kit, with the kit's teacher replaced by a heavier T5 (same
width, wide feed-forward layers: ~100 M parameters) so that its weights are visible in the process's memory.

    python -m bench run trainer          # --tiny: fewer steps

Target: peak memory lower by at least the teacher's weight bytes; steps/s not lower.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path


from bench.common import in_subprocess, save, target


def build_kit(tmp: Path) -> tuple[Path, int]:
    import torch
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    from service.models.demo import make_demo

    kit = make_demo(tmp / "kit")
    teacher_dir = kit / "encoders" / "t5-xxl"
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    width = T5Config.from_pretrained(teacher_dir).d_model
    torch.manual_seed(0)
    teacher = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=16, d_ff=24576, num_layers=8,
                                      num_heads=4, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                                      use_cache=False))
    shutil.rmtree(teacher_dir)
    teacher.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    weight_bytes = sum(p.numel() * p.element_size() for p in teacher.parameters())
    return kit / "models.yaml", weight_bytes


def train_once(models_file: str, data: str, out: str, steps: int, cache: str | None) -> dict:
    """In this (fresh) process: train `steps` steps and report steps/s and the peak memory."""
    import torch

    from service.worker.memory import peak_bytes
    from trainer.config import DistillConfig, load_config
    from trainer.distill import train

    overrides = [f"--models_file={models_file}", f"--data={data}", f"--output_dir={out}", f"--max_steps={steps}",
                 "--eval_every=100000", "--checkpoint_every=100000"]
    if cache:
        overrides.append(f"--teacher_cache={cache}")
    config = load_config(DistillConfig, "tiny-cpu", overrides)
    start = time.perf_counter()
    train(config, show_progress=False)
    elapsed = time.perf_counter() - start
    return {"steps": steps, "seconds": elapsed, "steps_per_s": steps / elapsed, "peak_rss_bytes": peak_bytes(torch.device("cpu"))}


def run(tiny: bool = False) -> dict:
    steps, prompts = (20, 48) if tiny else (120, 240)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models_file, teacher_bytes = build_kit(tmp)
        from service.cli import main

        assert main(["dataset", "build", "builtin-prompts", "-o", str(tmp / "data"), f"--total={prompts}",
                     f"--models_file={models_file}"]) == 0
        assert main(["distill", "cache-teacher", "tiny-cpu", "-o", str(tmp / "cache"),
                     f"--models_file={models_file}", f"--data={tmp / 'data'}"]) == 0
        rows = {}
        for mode, cache in (("live teacher", None), ("teacher cache", str(tmp / "cache"))):
            args = ["--models-file", str(models_file), "--data", str(tmp / "data"), "--out", str(tmp / mode),
                    "--steps", str(steps)] + (["--cache", cache] if cache else [])
            rows[mode] = {"mode": mode, **in_subprocess("bench.trainer", args)}
            print(f"  {mode}: {rows[mode]['steps_per_s']:.2f} steps/s, peak {rows[mode]['peak_rss_bytes'] / 2**20:.0f} "
                  "MiB", flush=True)
    live, cached = rows["live teacher"], rows["teacher cache"]
    saved = live["peak_rss_bytes"] - cached["peak_rss_bytes"]
    record = {
        "command": "python -m bench run trainer" + (" --tiny" if tiny else ""),
        "setting": f"preset tiny-cpu on the demo kit, teacher of {teacher_bytes / 2**20:.0f} MiB (fp32), {prompts} "
                   f"prompts, {steps} steps, 1 thread, each mode in a fresh process",
        "teacher_weight_bytes": teacher_bytes, "rows": [live, cached], "peak_saved_bytes": saved,
        "targets": [target("peak memory saved / teacher weight bytes", saved / teacher_bytes, ">=", 1, "x"),
                    target("steps/s, cache vs live", cached["steps_per_s"] / live["steps_per_s"], ">=", 1, "x")],
    }
    save("trainer", record)
    return record


if __name__ == "__main__":  # one training run, in its own process
    parser = argparse.ArgumentParser()
    parser.add_argument("--models-file", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--cache")
    a = parser.parse_args()
    print(json.dumps(train_once(a.models_file, a.data, a.out, a.steps, a.cache)))
