"""Encoder cost at real sizes: T5 v1.1 small/base/large/xl/xxl (and each with the student projection to 4096), built
from the real configurations with random weights, each in a fresh process: parameters, bytes in fp32 and bf16, CPU
encode latency at 77/256/512 tokens, and the peak memory the model adds to the process.

    python -m bench run encoders            # every size (XXL needs ~12 GB of RAM and minutes of CPU)
    python -m bench run encoders --tiny     # small and base, 77 tokens, one repetition

Target: the time and memory ratios vs XXL track the parameter ratios within 20% (the encode path adds no overhead of
its own), and XXL/base >= 35x on both.
"""

from __future__ import annotations

import argparse
import json

from bench.common import in_subprocess, median_time, random_module, rss_bytes, save, target

SIZES = ("t5-small", "t5-base", "t5-large", "t5-xl", "t5-xxl")
LENGTHS = (77, 256, 512)


def measure(size: str, project: bool, lengths: list[int], repeats: int, threads: int) -> dict:
    """In this (fresh) process: build, fill, encode; report counts, latency per length and added peak memory."""
    import torch
    from accelerate import init_empty_weights

    from service.models.sizes import build_t5, t5_config
    from service.worker.memory import peak_bytes, reset_peak

    cpu = torch.device("cpu")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = t5_config(size, project_out_dim=4096 if project else None)
    baseline = rss_bytes()
    reset_peak(cpu)
    with init_empty_weights(include_buffers=True):
        model = build_t5(config)  # on the meta device: no memory yet
    model = random_module(model, cpu, torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    latency = {}
    for length in lengths:
        ids = torch.randint(0, config.vocab_size, (1, length))

        def encode():
            with torch.inference_mode():
                return model(ids)[0]

        latency[length] = median_time(encode, repeats, warmup=1)
    return {"name": size + ("+proj4096" if project else ""), "params": params, "bytes_bf16": weights,
            "bytes_fp32": params * 4, "latency_s": latency, "peak_added_bytes": peak_bytes(cpu) - baseline,
            "weight_bytes_in_memory": weights}


def run(tiny: bool = False, threads: int = 2) -> dict:
    sizes = SIZES[:2] if tiny else SIZES
    lengths = [77] if tiny else list(LENGTHS)
    repeats = 1 if tiny else 3
    rows = []
    for size in sizes:
        for project in (False, True):
            args = ["--size", size, "--lengths", ",".join(map(str, lengths)), "--repeats", str(repeats),
                    "--threads", str(threads)] + (["--project"] if project else [])
            rows.append(in_subprocess("bench.encoders", args))
            print(f"  {rows[-1]['name']}: {rows[-1]['params'] / 1e6:.1f} M params, "
                  f"{ {k: round(v, 3) for k, v in rows[-1]['latency_s'].items()} } s", flush=True)
    record = {"command": "python -m bench run encoders" + (" --tiny" if tiny else ""), "threads": threads,
              "setting": f"random bf16 weights, {threads} threads, batch 1, {repeats} repetitions (median)",
              "dtype": "bfloat16", "lengths": lengths, "repeats": repeats, "rows": rows, "targets": []}
    by_name = {r["name"]: r for r in rows}
    ref = by_name.get("t5-xxl")
    if ref is not None:
        for row in rows:
            if row["name"] == "t5-xxl":
                continue
            param_ratio = ref["params"] / row["params"]
            longest = str(lengths[-1])  # latency keys come back from JSON as strings
            time_ratio = ref["latency_s"][longest] / row["latency_s"][longest]
            mem_ratio = ref["peak_added_bytes"] / row["peak_added_bytes"]
            row["ratios_vs_xxl"] = {"params": param_ratio, "time": time_ratio, "memory": mem_ratio,
                                    "time_vs_params": time_ratio / param_ratio, "memory_vs_params": mem_ratio /
                                    param_ratio}
        base = by_name["t5-base"]["ratios_vs_xxl"]
        record["targets"] += [target("XXL/base encode time", base["time"], ">=", 35, "x"),
                              target("XXL/base peak memory", base["memory"], ">=", 35, "x")]
        for row in rows:
            if "ratios_vs_xxl" in row and "+proj" not in row["name"]:
                r = row["ratios_vs_xxl"]
                record["targets"].append(target(f"{row['name']}: time ratio / param ratio",
                                                r["time_vs_params"], ">=", 0.8))
                record["targets"].append(target(f"{row['name']}: memory ratio / param ratio",
                                                r["memory_vs_params"], ">=", 0.8))
    save("encoders", record)
    return record


if __name__ == "__main__":  # one size, in its own process
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", required=True, choices=SIZES)
    parser.add_argument("--project", action="store_true")
    parser.add_argument("--lengths", default="77,256,512")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    a = parser.parse_args()
    print(json.dumps(measure(a.size, a.project, [int(x) for x in a.lengths.split(",")], a.repeats, a.threads)))
