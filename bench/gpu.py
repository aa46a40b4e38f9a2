"""For a machine with a GPU (prepared to run in under 5 minutes on one H100/H200-class card): real-size FLUX.1 and SD3.5
Large transformers with random bf16 weights, the real FLUX VAE shape, and each T5 size; per-stage latency at
1024x1024 (FLUX 4 and 28 steps) and peak VRAM per encoder layout: T5-XXL resident on the GPU, T5-XXL offloaded to the
CPU (paged in for each encode, then sent back), a student on the GPU, a student on the CPU; and whether the job fits
in 24 GB.

    python -m bench run gpu              # needs CUDA; writes docs/benchmarks/gpu.json like every benchmark
    python -m bench run gpu --tiny       # tiny configs on the CPU: checks the script itself (CI)

Weights are random (shapes are what cost time and memory). The denoising stage is one measured step times the number
of steps; everything else is measured as it runs.
"""

from __future__ import annotations

import time

from bench.common import random_module, save


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, repeats: int = 3) -> float:
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def run(tiny: bool = False) -> dict:
    import torch
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    from service.models.sizes import T5_SIZES, TRANSFORMERS, build_t5, t5_config

    if not tiny and not torch.cuda.is_available():
        raise RuntimeError("bench gpu needs CUDA (use --tiny to check the script on the CPU)")
    gpu = torch.device("cpu" if tiny else "cuda")
    cpu = torch.device("cpu")
    dtype = torch.float32 if tiny else torch.bfloat16
    res, text_len, width = (64, 16, 64) if tiny else (1024, 512, 4096)

    def empty(build):
        with init_empty_weights(include_buffers=True):
            return build()

    def encoder_config(name: str, project: int | None):
        if not tiny:
            return t5_config(name, project_out_dim=project)
        config = t5_config("t5-small", project_out_dim=project)
        config.d_model, config.d_ff, config.num_layers, config.num_heads, config.d_kv = 32, 64, 2, 2, 16
        config.vocab_size, config.project_in_dim = 512, 32
        return config

    # 1. Encoders (T5-XXL as FLUX ships it; the smaller sizes as students with the projection to 4096): latency of
    #    one 512-token prompt on the GPU, and on the CPU for the sizes a CPU can serve.
    encoder_rows = []
    for name in (("t5-small",) if tiny else T5_SIZES):
        project = None if name == "t5-xxl" else width
        config = encoder_config(name, project)
        label = name + ("" if project is None else "+proj")
        row = {"name": label}
        for where, device in (("gpu", gpu), ("cpu", cpu)):
            if where == "cpu" and name in ("t5-xl", "t5-xxl") and not tiny:
                continue  # minutes per prompt on a CPU: not a layout anyone serves
            model = random_module(empty(lambda: build_t5(config)), device, dtype)
            ids = torch.randint(0, config.vocab_size, (1, text_len), device=device)
            with torch.inference_mode():
                row[f"encode_{where}_s"] = _timed(lambda: model(ids)[0], device)
            row["bytes"] = _bytes(model)
            del model
        encoder_rows.append(row)
        if gpu.type == "cuda":
            torch.cuda.empty_cache()

    # 2. The VAE (FLUX's shape: 16 latent channels) and the two transformers; each encoder layout in a full job
    #    (encode, one denoising step, decode) under the peak-memory counter.
    vae = random_module(empty(lambda: AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * (1 if tiny else 4),
        up_block_types=("UpDecoderBlock2D",) * (1 if tiny else 4),
        block_out_channels=(32,) if tiny else (128, 256, 512, 512), layers_per_block=1 if tiny else 2)), gpu, dtype)
    scale = 1 if tiny else 8
    latent = torch.randn(1, 16, res // scale, res // scale, device=gpu, dtype=dtype)
    with torch.inference_mode():
        decode_s = _timed(lambda: vae.decode(latent).sample, gpu, repeats=2)
    big, small = ("t5-small", "t5-small") if tiny else ("t5-xxl", "t5-base")
    layouts = (("T5-XXL resident on the GPU", big, "gpu"), ("T5-XXL offloaded to the CPU", big, "offload"),
               ("student t5-base on the GPU", small, "gpu"), ("student t5-base on the CPU", small, "cpu"))
    rows = []
    for pipeline in ("flux.1", "sd3.5-large"):
        cls, kwargs = TRANSFORMERS[pipeline]
        if tiny:
            kwargs = (dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                           num_attention_heads=2, joint_attention_dim=width, pooled_projection_dim=32,
                           guidance_embeds=True, axes_dims_rope=(4, 6, 6)) if cls is FluxTransformer2DModel else
                      dict(sample_size=res // 8, patch_size=2, in_channels=16, num_layers=1, attention_head_dim=16,
                           num_attention_heads=2, joint_attention_dim=width, caption_projection_dim=32,
                           pooled_projection_dim=64, out_channels=16, pos_embed_max_size=32))
        transformer = random_module(empty(lambda: cls(**kwargs)), gpu, dtype)
        config = transformer.config
        if cls is FluxTransformer2DModel:
            tokens = (res // 16) ** 2
            inputs = dict(hidden_states=torch.randn(1, tokens, config.in_channels, device=gpu, dtype=dtype),
                          pooled_projections=torch.randn(1, config.pooled_projection_dim, device=gpu, dtype=dtype),
                          timestep=torch.tensor([0.5], device=gpu, dtype=dtype),
                          img_ids=torch.zeros(tokens, 3, device=gpu), txt_ids=torch.zeros(text_len, 3, device=gpu),
                          guidance=torch.tensor([3.5], device=gpu, dtype=dtype))
            steps, context = (4, 28), 0
        else:
            inputs = dict(hidden_states=torch.randn(1, 16, res // 8, res // 8, device=gpu, dtype=dtype),
                          pooled_projections=torch.randn(1, config.pooled_projection_dim, device=gpu, dtype=dtype),
                          timestep=torch.tensor([500.0], device=gpu, dtype=dtype))
            steps, context = (28,), 77  # SD3 puts the CLIP tokens before the T5 tokens
        for layout, size, where in layouts:
            config_t5 = encoder_config(size, None if size == "t5-xxl" else width)
            home = gpu if where == "gpu" else cpu
            encoder = random_module(empty(lambda: build_t5(config_t5)), home, dtype)
            ids = torch.randint(0, config_t5.vocab_size, (1, text_len))
            if gpu.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(gpu)
            with torch.inference_mode():
                start = time.perf_counter()
                if where == "offload":
                    encoder.to(gpu)
                run_on = gpu if where in ("gpu", "offload") else cpu
                embeds = encoder(ids.to(run_on))[0].to(gpu)
                if where == "offload":
                    encoder.to(cpu)
                _sync(gpu)
                encode_s = time.perf_counter() - start
                hidden = torch.cat([torch.zeros(1, context, width, device=gpu, dtype=dtype), embeds], dim=1)
                step_s = _timed(lambda: transformer(**inputs, encoder_hidden_states=hidden, return_dict=False)[0],
                                gpu, repeats=2)
                vae.decode(latent)
                _sync(gpu)
            peak = torch.cuda.max_memory_allocated(gpu) if gpu.type == "cuda" else None
            for n in steps:
                rows.append({"pipeline": pipeline, "layout": layout, "steps": n, "encode_s": encode_s,
                             "denoise_s": step_s * n, "decode_s": decode_s, "total_s": encode_s + step_s * n + decode_s,
                             "transformer_bytes": _bytes(transformer), "encoder_bytes": _bytes(encoder),
                             "peak_vram_bytes": peak, "fits_24gb": None if peak is None else peak < 24e9})
            del encoder, embeds, hidden
        del transformer
        if gpu.type == "cuda":
            torch.cuda.empty_cache()
    # 3. T5-XXL under every quantization method (whole, on the GPU; int4 has kernels there) beside the students.
    from bench.quantized import METHODS, rows as quantized_rows

    quantized = quantized_rows("t5-small" if tiny else "t5-xxl", 1 if tiny else 24, "t5-small" if tiny else "t5-base",
                               text_len, 1 if tiny else 3, threads=2, device=str(gpu),
                               methods=METHODS[:2] if tiny else METHODS + ("int4-weight-only",))
    record = {"command": "python -m bench run gpu" + (" --tiny" if tiny else ""),
              "setting": ("tiny configs on the CPU (a check of the script, not a measurement)" if tiny else
                          f"real sizes, bf16, random weights, {res}x{res}, {text_len} T5 tokens, batch 1"),
              "encoders": encoder_rows, "rows": rows, "quantized": quantized, "targets": []}
    save("gpu-tiny" if tiny else "gpu", record)
    return record
