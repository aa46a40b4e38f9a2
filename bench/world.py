"""The miniature world's denoiser training in float32 against bfloat16 autocast (`t2i world train --precision`):
seconds per step of the trainer's own loop (`train_denoiser`) at the shipped recipe's width and batch, the two
arithmetics alternating in one process on the same batches.

    python -m bench run world          # --tiny: a narrow denoiser, a small batch, four steps

Target: bfloat16 not slower than float32 per step. It is faster only where the hardware has bfloat16 arithmetic (a
GPU, a CPU with AVX-512 BF16 or AMX); a CPU without it emulates bfloat16, so the record says which this one has.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from bench.common import save, target

PRECISIONS = ("float32", "bfloat16")


def run(tiny: bool = False) -> dict:
    import torch

    from service.models.demo import build_t5_tokenizer, build_teacher
    from service.models.devices import bf16_arithmetic
    from trainer.world.train import TEACHER, WorldConfig, build_transformer, build_vae, local_attention
    from trainer.world.train import train_denoiser

    steps, rounds = (4, 1) if tiny else (20, 3)
    shape = {"heads": 2, "batch": 8} if tiny else {}  # else the shipped recipe's: 8 heads, batch 64
    threads = torch.get_num_threads()
    tokenizer = build_t5_tokenizer()
    teacher = local_attention(build_teacher(tokenizer, 0, size=TEACHER).requires_grad_(False))
    vae = build_vae().eval().requires_grad_(False)  # untrained: the step costs the same
    seconds = {p: [] for p in PRECISIONS}

    def per_step(precision: str, work: Path) -> float:
        """One run of the trainer's loop; the median interval between its denoiser calls (a whole step each)."""
        config = WorldConfig(steps=steps, checkpoint_every=10**9, precision=precision, **shape)
        torch.manual_seed(2)
        transformer = build_transformer(config)
        stamps = []
        transformer.register_forward_pre_hook(lambda module, args: stamps.append(time.perf_counter()))
        train_denoiser(transformer, vae, teacher, tokenizer, config, 0, work / "log.jsonl", work)
        return statistics.median(b - a for a, b in zip(stamps[1:], stamps[2:]))  # the first step warms up

    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for precision in PRECISIONS if r % 2 == 0 else PRECISIONS[::-1]:
                seconds[precision].append(per_step(precision, Path(tmp) / f"{precision}-{r}"))
                print(f"  {precision}: {seconds[precision][-1]:.3f} s/step", flush=True)
    rows = [{"precision": p, "s_per_step": statistics.median(seconds[p]), "runs": [round(x, 3) for x in seconds[p]]}
            for p in PRECISIONS]
    speedup = rows[0]["s_per_step"] / rows[1]["s_per_step"]
    config, hardware = WorldConfig(**shape), bf16_arithmetic(torch.device("cpu"))
    record = {
        "command": "python -m bench run world" + (" --tiny" if tiny else ""),
        "setting": f"`train_denoiser` at {config.heads} heads, batch {config.batch}: the median interval between "
                   f"the denoiser's calls over {steps} steps (the first left out), {rounds} runs of each precision "
                   f"alternating, "
                   f"{threads} threads; bfloat16 in hardware: {hardware or 'no'}",
        "bf16_hardware": hardware, "threads": threads, "rows": rows, "bfloat16_speedup": speedup,
        "targets": [target("float32 / bfloat16 seconds per step", speedup, ">=", 1, "x")],
    }
    save("world", record)
    return record
