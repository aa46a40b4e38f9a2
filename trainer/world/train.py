"""Train the miniature world's text-to-image model from scratch: `t2i world train -o DIR`.

    t2i world train -o kit --vae-minutes 6 --minutes 45 --threads 2     # 2-core CPU, under an hour
    t2i world train -o kit --vae-minutes 2 --minutes 10                  # a GPU, or a quick look

It writes a complete model kit: DIR/pipelines/flux (a real diffusers FluxPipeline: FluxTransformer2DModel +
AutoencoderKL + FlowMatchEulerDiscreteScheduler, and a null CLIP), DIR/encoders/t5-xxl (the teacher T5, frozen and
randomly initialised: the denoiser learns to read it, as FLUX learnt to read a T5 it did not train), untrained students
at about 1/4, 1/16 and 1/64 of the teacher's parameters, DIR/models.yaml, and DIR/train_log.jsonl.

Choices: the CLIP slot is a null encoder (its pooled output is zero) so that the T5 encoder alone carries the prompt
and encoders can be compared sharply; the VAE is a small AutoencoderKL trained first (32x32 -> 8x8x8), so the stock
pipeline runs unchanged; the denoiser is trained by rectified flow (the FLUX objective) with logit-normal timesteps,
10% caption dropout for classifier-free guidance, and an EMA of its weights.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel

from service.models.demo import T5Size, _clip_config, build_clip_tokenizer, build_student, build_t5_tokenizer
from service.models.demo import build_teacher
from trainer.world.captions import caption
from trainer.world.scene import SIZE, render, sample

TEACHER = T5Size("t5-xxl", 256, 4, 4, 512)
STUDENTS = (T5Size("t5-large", 128, 4, 4, 256), T5Size("t5-base", 64, 3, 4, 128), T5Size("t5-small", 32, 2, 2, 64))
MAX_TOKENS = 16
KIND_WEIGHTS = {"single": 0.4, "count": 0.25, "relation": 0.2, "text": 0.15}


def batch(rng: random.Random, n: int) -> tuple[torch.Tensor, list[str]]:
    kinds = rng.choices(list(KIND_WEIGHTS), weights=list(KIND_WEIGHTS.values()), k=n)
    scenes = [sample(rng, k) for k in kinds]
    images = np.stack([render(s) for s in scenes]).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(images).permute(0, 3, 1, 2), [caption(s, rng) for s in scenes]


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32), layers_per_block=1,
        latent_channels=8, norm_num_groups=8, sample_size=SIZE, scaling_factor=1.0, shift_factor=0.0,
        use_quant_conv=False, use_post_quant_conv=False,
    )


def build_transformer() -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4 * 8, num_layers=2, num_single_layers=4, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=TEACHER.d_model, pooled_projection_dim=32, guidance_embeds=False,
        axes_dims_rope=(8, 12, 12),
    )


def null_clip(tokenizer) -> CLIPTextModel:
    """A CLIP text model whose outputs are all zero (final layer norm zeroed): the CLIP slot carries nothing."""
    clip = CLIPTextModel(_clip_config(tokenizer)).eval()
    torch.nn.init.zeros_(clip.final_layer_norm.weight)
    torch.nn.init.zeros_(clip.final_layer_norm.bias)
    return clip


def _log(path: Path, **record) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


def train_vae(vae: AutoencoderKL, minutes: float, rng: random.Random, log: Path) -> None:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    start, step = time.monotonic(), 0
    vae.train()
    while time.monotonic() - start < minutes * 60:
        images, _ = batch(rng, 32)
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, images) + 1e-6 * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % 50 == 0:
            _log(log, stage="vae", step=step, loss=loss.item(), elapsed_s=time.monotonic() - start)
    vae.eval().requires_grad_(False)
    # Normalise latents to zero mean, unit variance, as FLUX's VAE config does with shift and scaling factors.
    with torch.no_grad():
        latents = torch.cat([vae.encode(batch(rng, 64)[0]).latent_dist.mean for _ in range(16)])
    vae.register_to_config(shift_factor=latents.mean().item(), scaling_factor=1.0 / latents.std().item())


def train_denoiser(transformer, vae, teacher, tokenizer, minutes: float, rng: random.Random, log: Path,
                   batch_size: int = 64) -> FluxTransformer2DModel:
    ema = copy.deepcopy(transformer).requires_grad_(False)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=1e-3, weight_decay=0.0)
    pooled = torch.zeros(batch_size, 32)
    img_ids = FluxPipeline._prepare_latent_image_ids(1, SIZE // 8, SIZE // 8, "cpu", torch.float32)
    txt_ids = torch.zeros(MAX_TOKENS, 3)
    start, step, budget = time.monotonic(), 0, minutes * 60
    transformer.train()
    while (elapsed := time.monotonic() - start) < budget:
        # lr: 200 warm-up steps, then cosine decay over the time budget
        lr = 1e-3 * min(1.0, (step + 1) / 200) * 0.5 * (1 + math.cos(math.pi * min(elapsed / budget, 1.0)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, captions = batch(rng, batch_size)
        captions = ["" if rng.random() < 0.1 else c for c in captions]
        with torch.no_grad():
            z = vae.encode(images).latent_dist.mean
            z = (z - vae.config.shift_factor) * vae.config.scaling_factor
            x0 = FluxPipeline._pack_latents(z, batch_size, z.shape[1], z.shape[2], z.shape[3])
            ids = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                            return_tensors="pt").input_ids
            text = teacher(ids)[0]
        sigma = torch.sigmoid(torch.randn(batch_size)).view(-1, 1, 1)
        noise = torch.randn_like(x0)
        x_t = (1 - sigma) * x0 + sigma * noise
        pred = transformer(hidden_states=x_t, timestep=sigma.view(-1), encoder_hidden_states=text,
                           pooled_projections=pooled, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        loss = F.mse_loss(pred, noise - x0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for e, p in zip(ema.parameters(), transformer.parameters()):
                e.lerp_(p, 1 - 0.999)
        step += 1
        if step % 100 == 0:
            _log(log, stage="denoiser", step=step, loss=loss.item(), lr=lr, elapsed_s=elapsed,
                 steps_per_s=step / max(elapsed, 1e-6))
    return ema.eval()


def models_file() -> dict:
    common = {"dtype": "auto", "device": "auto", "max_sequence_length": MAX_TOKENS}
    return {
        "pipelines": {"flux": {"family": "flux", "source": "./pipelines/flux", "dtype": "auto", "device": "auto",
                               "width": SIZE, "height": SIZE, "steps": 20, "guidance": 0.0, "true_cfg_scale": 3.0}},
        "encoders": {TEACHER.role: {"kind": "teacher", "source": f"./encoders/{TEACHER.role}", **common},
                     **{s.role: {"kind": "student", "source": f"./encoders/{s.role}", **common} for s in STUDENTS}},
    }


def train_world(out_dir: str | Path, *, vae_minutes: float, minutes: float, seed: int = 0) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "train_log.jsonl"
    log.write_text("")
    rng = random.Random(seed)
    torch.manual_seed(seed)

    # 1. Tokenizers, the frozen teacher T5 and the null CLIP.
    t5_tokenizer, clip_tokenizer = build_t5_tokenizer(), build_clip_tokenizer()
    teacher = build_teacher(t5_tokenizer, seed, size=TEACHER).requires_grad_(False)
    clip = null_clip(clip_tokenizer)

    # 2. The VAE, then the denoiser conditioned on the teacher.
    torch.manual_seed(seed + 1)
    vae = build_vae()
    train_vae(vae, vae_minutes, rng, log)
    torch.manual_seed(seed + 2)
    transformer = train_denoiser(build_transformer(), vae, teacher, t5_tokenizer, minutes, rng, log)

    # 3. The kit: the pipeline, the teacher, untrained students, the models file.
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tokenizer, text_encoder_2=None,
                 tokenizer_2=None, transformer=transformer).save_pretrained(out / "pipelines" / "flux")
    teacher.save_pretrained(out / "encoders" / TEACHER.role)
    t5_tokenizer.save_pretrained(out / "encoders" / TEACHER.role)
    for index, size in enumerate(STUDENTS, start=1):
        build_student(size, t5_tokenizer, seed=seed + 10 + index, project_out_dim=TEACHER.d_model).save_pretrained(
            out / "encoders" / size.role)
        t5_tokenizer.save_pretrained(out / "encoders" / size.role)
    (out / "models.yaml").write_text("# The miniature world's model kit (`t2i world train`). Paths are relative.\n"
                                     + yaml.safe_dump(models_file(), sort_keys=False))
    return out
