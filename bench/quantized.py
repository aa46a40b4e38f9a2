"""Quantized T5-XXL beside the distilled students, at real width on the CPU: bytes in memory and encode time at 512
tokens, through the service's own loading path (`TextEncoder.load`: transformers' quantization_config, torchao and
bitsandbytes), random weights, each row in a fresh process.

    python -m bench run quantized            # T5-XXL (2 of its 24 blocks, full width) under every CPU method,
                                             # T5-Base+proj4096 in bf16 and int8 (whole)
    python -m bench run quantized --tiny     # T5-small-shaped, 1 block, 77 tokens
    python -m bench run gpu                  # the same rows on a GPU (whole T5-XXL, int4 too), in the GPU record

T5-XXL's 24 blocks are identical, so the XXL rows load 2 of them at full width (d_model 4096, d_ff 10240, the real
vocabulary) and scale to 24: bytes = embedding + 12 x (the 2 blocks), time = 12 x (the 2 blocks' encode time). The
bytes the registry predicts for the whole 24-block model from its config (meta device, nothing allocated) are shown
beside them. Weights are written once as a bf16 safetensors directory and loaded by each method, as the service
loads a models-file entry with a `quantization`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench.common import in_subprocess, median_time, random_module, rss_bytes, save, target

METHODS = (None, "int8-weight-only", "int8-dynamic", "fp8-weight-only", "bnb-int8", "bnb-nf4")


def _write(size: str, project: bool, layers: int | None, out: Path) -> None:
    """Random bf16 weights of a real T5 shape, saved as a Hugging Face directory (with a tokenizer-less config)."""
    import torch
    from accelerate import init_empty_weights

    from service.models.sizes import build_t5, t5_config

    config = t5_config(size, project_out_dim=4096 if project else None)
    if layers:
        config.num_layers = layers
    torch.manual_seed(0)
    with init_empty_weights(include_buffers=True):
        model = build_t5(config)
    random_module(model, torch.device("cpu"), torch.bfloat16).save_pretrained(out)


def measure(source: str, method: str | None, length: int, repeats: int, threads: int, device: str = "cpu") -> dict:
    """In this (fresh) process: load through the service's path, measure bytes and the encode time."""
    import torch

    from service.models.quantization import state_bytes
    from service.models.registry import EncoderSpec, Quantization
    from service.models.sizes import build_t5, encoder_row, meta_params

    torch.set_num_threads(threads)
    spec = EncoderSpec(name="bench", kind="teacher", source=source, dtype="bfloat16", device=device,
                       max_sequence_length=length, tokenizer=None,
                       quantization=Quantization(method=method) if method else None)
    before = rss_bytes()
    model = _load_model(spec)
    nbytes = state_bytes(model)
    ids = torch.randint(0, model.config.vocab_size, (1, length), device=device)

    def encode():
        with torch.inference_mode():
            out = model(ids)[0]
        if ids.is_cuda:
            torch.cuda.synchronize()
        return out

    seconds = median_time(encode, repeats, warmup=1)
    return {"method": method or "bf16", "bytes": nbytes, "predicted_bytes": encoder_row(spec).bytes,
            "encode_s": seconds, "rss_added_bytes": rss_bytes() - before,
            "params": meta_params(lambda: build_t5(model.config))}


def _load_model(spec):
    """The weights exactly as the service loads them (no tokenizer: random weights have none)."""
    import torch

    from service.models.encoder import load_weights

    return load_weights(spec, torch.device(spec.device), torch.bfloat16, "bench")[0]


def rows(xxl: str, layers: int, student: str, length: int, repeats: int, threads: int, device: str = "cpu",
         methods: tuple = METHODS) -> list[dict]:
    """One row per method for `layers` blocks of `xxl` at full width (scaled to all its blocks), then the student
    (+proj4096) whole in bf16 and int8; each measured in a fresh process."""
    from service.models.sizes import t5_config

    blocks = t5_config(xxl).num_layers
    scale = blocks / layers
    out = []
    with tempfile.TemporaryDirectory(prefix="bench-quant-") as tmp:
        teacher_dir, student_dir = Path(tmp) / "xxl", Path(tmp) / "student"
        _write(xxl, False, layers, teacher_dir)
        _write(student, True, None, student_dir)
        full_predicted = _full_predictions(xxl, methods)
        embedding = _embedding_bytes(xxl)
        common = ["--length", str(length), "--repeats", str(repeats), "--threads", str(threads), "--device", device]
        for method in methods:
            r = in_subprocess("bench.quantized", ["--source", str(teacher_dir), *common]
                              + (["--method", method] if method else []))
            out.append({"encoder": f"{xxl} {r['method']}", "params (M)": full_predicted["params"] / 1e6,
                        "GB in memory": (embedding + scale * (r["bytes"] - embedding)) / 1e9,
                        "GB predicted (whole)": full_predicted[r["method"]] / 1e9,
                        f"{length} tok (s)": scale * r["encode_s"],
                        "measured on": f"{layers} of {blocks} blocks" + (f", x{scale:g}" if scale != 1 else "")})
            print(f"  {out[-1]['encoder']}: {out[-1]['GB in memory']:.2f} GB, {out[-1][f'{length} tok (s)']:.2f} s",
                  flush=True)
        for method in (None, "int8-weight-only"):
            r = in_subprocess("bench.quantized", ["--source", str(student_dir), *common]
                              + (["--method", method] if method else []))
            out.append({"encoder": f"{student}+proj4096 {r['method']}", "params (M)": r["params"] / 1e6,
                        "GB in memory": r["bytes"] / 1e9, "GB predicted (whole)": r["predicted_bytes"] / 1e9,
                        f"{length} tok (s)": r["encode_s"], "measured on": "whole model"})
    for r in out:
        r["XXL bf16 / this (bytes)"] = out[0]["GB in memory"] / r["GB in memory"]
    return out


def run(tiny: bool = False, threads: int = 2) -> dict:
    length, repeats = (77, 1) if tiny else (512, 3)
    xxl = "t5-small" if tiny else "t5-xxl"
    rows_ = rows(xxl, 1 if tiny else 2, "t5-small" if tiny else "t5-base", length, repeats, threads)
    int8 = rows_[METHODS.index("int8-weight-only")]
    implied = _implied_int8(xxl) / 1e9
    record = {"command": "python -m bench run quantized" + (" --tiny" if tiny else ""), "threads": threads,
              "setting": f"random bf16 weights, {threads} threads, batch 1, {length} tokens, {repeats} repetitions "
                         "(median), each row in a fresh process", "rows": rows_,
              "targets": [target("int8 T5-XXL bytes / what 8 bits imply for the layers it quantizes",
                                 int8["GB in memory"] / implied, "<=", 1.1),
                          target("bytes predicted from the config / measured (int8 T5-XXL)",
                                 int8["GB predicted (whole)"] / int8["GB in memory"], "<=", 1.01)]}
    save("quantized", record)
    return record


def _full_predictions(size: str, methods: tuple = METHODS) -> dict:
    import torch

    from service.models.registry import Quantization
    from service.models.sizes import meta_size, t5_config

    out = {}
    for method in methods:
        params, nbytes = meta_size(t5_config(size), Quantization(method=method) if method else None, torch.bfloat16)
        out[method or "bf16"], out["params"] = nbytes, params
    return out


def _embedding_bytes(size: str) -> int:
    from service.models.sizes import t5_config

    config = t5_config(size)
    return config.vocab_size * config.d_model * 2 + config.d_model * 2  # bf16 embedding + the final norm


def _implied_int8(size: str) -> int:
    """Bytes if every Linear weight took 1 byte and everything else stayed bf16."""
    from service.models.sizes import t5_config

    c = t5_config(size)
    linear = c.num_layers * (4 * c.d_model * c.num_heads * c.d_kv + 3 * c.d_model * c.d_ff)
    return linear + (_full_predictions(size)["params"] - linear) * 2


if __name__ == "__main__":  # one row, in its own process
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", required=True)
    parser.add_argument("--method")
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    a = parser.parse_args()
    print(json.dumps(measure(a.source, a.method, a.length, a.repeats, a.threads, a.device)))
