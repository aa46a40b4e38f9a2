"""A canny ControlNet for the miniature world, and the edge-correlation measure that shows it works.

    t2i world controlnet --kit service/models/miniature --steps 1500     # train, save, register in models.yaml
    t2i world control-eval --kit service/models/miniature               # edge correlation with vs without control

Training: a diffusers `FluxControlNetModel` made from the kit's transformer (`from_transformer`: its first blocks'
weights, zero-initialised output projections, so it starts with no effect), trained by the same rectified-flow loss as
the denoiser with the denoiser frozen. The control is `service.models.control.canny` of the ground-truth render, the
same preprocessor the service runs, encoded by the kit's VAE as `FluxControlNetPipeline` does. 30% of captions are
dropped so that structure is learnt from the control, not only from the words.

Measure: the Pearson correlation between the edges of the generated image and the control's edges (both blurred by one
pixel so that a one-pixel shift still counts), averaged over squares at several places and seeds, for the same prompts
and seeds with and without the ControlNet.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from service.models.control import canny
from trainer.world.scene import SIZE, Scene, Thing, render, sample

CONTROLNET_NAME = "flux-canny"
KINDS = {"single": 0.45, "count": 0.3, "relation": 0.25}  # no text: a sign's outline says nothing about the word


def _control_batch(rng: random.Random, n: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from trainer.world.captions import caption

    kinds = rng.choices(list(KINDS), weights=list(KINDS.values()), k=n)
    scenes = [sample(rng, k) for k in kinds]
    renders = [render(s) for s in scenes]
    controls = [np.asarray(canny(Image.fromarray(r))) for r in renders]
    to_tensor = lambda arrays: torch.from_numpy(np.stack(arrays).astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)  # noqa: E731
    return to_tensor(renders), to_tensor(controls), [caption(s, rng) for s in scenes]


def _packed_latents(vae, images: torch.Tensor, *, sample_posterior: bool) -> torch.Tensor:
    from diffusers import FluxPipeline

    dist = vae.encode(images).latent_dist
    z = dist.sample() if sample_posterior else dist.mean
    z = (z - vae.config.shift_factor) * vae.config.scaling_factor
    return FluxPipeline._pack_latents(z, z.shape[0], z.shape[1], z.shape[2], z.shape[3])


def train_controlnet(kit: str | Path, *, steps: int | None = None, minutes: float | None = None, seed: int = 0,
                     batch_size: int = 32, lr: float = 5e-4, dtype: str = "float16", device: str = "auto") -> Path:
    """Train the kit's canny ControlNet, save it under KIT/controlnets/flux-canny and register it in KIT/models.yaml.
    The budget is `steps` (the same weights from the same seed on any machine) or `minutes` (as many steps as fit),
    exactly one of them; the learning rate decays over it. `dtype` is how its weights are stored (float16 halves the
    bytes); it trains in float32 whatever the kit stores, and the service loads it in the models file's dtype.
    `device` is where it trains (`auto`: the first CUDA device when there is one, else the CPU); the data and the noise
    are drawn on the CPU either way."""
    if (steps is None) == (minutes is None):
        raise ValueError("give the ControlNet's budget as steps or as minutes, exactly one")
    from diffusers import FluxControlNetModel, FluxPipeline
    from transformers import AutoTokenizer, T5EncoderModel

    from service.models.devices import resolve_device

    where = resolve_device(device)  # a bad name is refused before the kit's log is touched
    kit = Path(kit).resolve()
    raw = yaml.safe_load((kit / "models.yaml").read_text())
    teacher_name = next(n for n, e in raw["encoders"].items() if e["kind"] == "teacher")
    max_tokens = raw["encoders"][teacher_name]["max_sequence_length"]
    log = kit / "controlnets" / "train_log.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    rng = random.Random(seed)
    torch.manual_seed(seed)

    # 1. The kit's frozen parts: VAE, transformer, teacher T5.
    pipe = FluxPipeline.from_pretrained(kit / "pipelines" / "flux", text_encoder_2=None, tokenizer_2=None)
    vae, transformer = pipe.vae.requires_grad_(False).to(where), pipe.transformer.requires_grad_(False).to(where)
    teacher = T5EncoderModel.from_pretrained(kit / "encoders" / teacher_name).requires_grad_(False).to(where)
    tokenizer = AutoTokenizer.from_pretrained(kit / "encoders" / teacher_name)

    # 2. The ControlNet: the transformer's first double and single blocks, zero-initialised outputs.
    config = transformer.config
    controlnet = FluxControlNetModel.from_transformer(
        transformer, num_layers=1, num_single_layers=2, attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.num_attention_heads)
    controlnet.train().to(where)
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=lr, weight_decay=0.0)
    pooled = torch.zeros(batch_size, config.pooled_projection_dim, device=where)
    grid = SIZE // (pipe.vae_scale_factor * 2)  # latent pixels per side, packed 2x2 into tokens: the kit's own
    img_ids = FluxPipeline._prepare_latent_image_ids(1, grid, grid, where, torch.float32)
    txt_ids = torch.zeros(max_tokens, 3, device=where)

    # 3. Rectified flow with the denoiser frozen; only the ControlNet learns.
    start, step = time.monotonic(), 0

    def done_fraction(elapsed: float) -> float:
        return step / steps if steps is not None else min(elapsed / (minutes * 60), 1.0)

    while (progress := done_fraction(elapsed := time.monotonic() - start)) < 1.0:
        current_lr = lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = current_lr
        images, controls, captions = (part.to(where) if torch.is_tensor(part) else part
                                      for part in _control_batch(rng, batch_size))
        captions = ["" if rng.random() < 0.3 else c for c in captions]
        with torch.no_grad():
            x0 = _packed_latents(vae, images, sample_posterior=False)
            cond = _packed_latents(vae, controls, sample_posterior=True)
            ids = tokenizer(captions, padding="max_length", max_length=max_tokens, truncation=True,
                            return_tensors="pt").input_ids
            text = teacher(ids.to(where))[0]
        sigma = torch.sigmoid(torch.randn(batch_size)).to(where)
        noise = torch.randn(x0.shape).to(where)
        x_t = (1 - sigma.view(-1, 1, 1)) * x0 + sigma.view(-1, 1, 1) * noise
        common = dict(hidden_states=x_t, timestep=sigma, encoder_hidden_states=text, pooled_projections=pooled,
                      txt_ids=txt_ids, img_ids=img_ids, return_dict=False)
        blocks, single_blocks = controlnet(controlnet_cond=cond, conditioning_scale=1.0, **common)
        pred = transformer(controlnet_block_samples=blocks, controlnet_single_block_samples=single_blocks,
                           **common)[0]
        loss = F.mse_loss(pred, noise - x0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % 50 == 0:
            record = {"stage": "controlnet", "step": step, "loss": loss.item(), "lr": current_lr,
                      "elapsed_s": round(elapsed, 1)}
            with open(log, "a") as f:
                f.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)

    # 4. Save in the diffusers format and register it.
    out = kit / "controlnets" / CONTROLNET_NAME
    controlnet.eval().to("cpu", getattr(torch, dtype)).save_pretrained(out)
    raw.setdefault("controlnets", {})[CONTROLNET_NAME] = {
        "pipeline": "flux", "source": f"./controlnets/{CONTROLNET_NAME}", "condition": "canny", "scale": 1.0}
    header = (kit / "models.yaml").read_text().splitlines()[0]
    (kit / "models.yaml").write_text(header + "\n" + yaml.safe_dump(raw, sort_keys=False))
    return out


# -- the measure -----------------------------------------------------------------------------------------------
def _blurred_edges(image: Image.Image) -> np.ndarray:
    edges = np.asarray(canny(image))[:, :, 0].astype(np.float32) / 255.0
    padded = np.pad(edges, 1)
    return sum(padded[dy:dy + edges.shape[0], dx:dx + edges.shape[1]] for dy in range(3) for dx in range(3)) / 9.0


def edge_correlation(image: Image.Image, control_edges: Image.Image) -> float:
    """Pearson correlation of the image's (blurred) canny edges with the (blurred) control edges; 0 for a blank."""
    a = _blurred_edges(image.convert("RGB").resize(control_edges.size))
    b = np.asarray(control_edges.convert("L"), dtype=np.float32) / 255.0
    padded = np.pad(b, 1)
    b = sum(padded[dy:dy + b.shape[0], dx:dx + b.shape[1]] for dy in range(3) for dx in range(3)) / 9.0
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def square_controls() -> list[tuple[str, Image.Image]]:
    """Grey squares at each of the world's positions, as (name, source image); the service's canny preprocessor
    turns each into its control."""
    out = []
    for position, center in (("left", (9, 16)), ("right", (23, 16)), ("top", (16, 9)), ("bottom", (16, 23))):
        scene = Scene("single", (Thing("square", "yellow", center, 12),))
        out.append((position, Image.fromarray(render(scene))))
    return out


def control_eval(registry, encoders: list[str], *, seeds: int = 4, prompt: str = "a large blue square",
                 controlnet: str = CONTROLNET_NAME, grid: str | Path | None = None) -> dict:
    """Mean edge correlation with the control, with and without the ControlNet, per encoder. With `grid`, also
    draws a picture: per control, its edges, then each encoder's image without and with the ControlNet (seed 0)."""
    from service.models.generation import ControlInput, GenerationRequest, Generator

    generator = Generator(registry)
    results: dict[str, dict] = {}
    cells: dict[tuple[str, str], list[Image.Image]] = {}
    for encoder in encoders:
        with_cn, without = [], []
        for position, source in square_controls():
            edges = canny(source)
            for seed in range(seeds):
                base = dict(prompt=prompt, pipeline="flux", encoder=encoder, seed=seed)
                plain = generator.generate(GenerationRequest(**base)).images[0]
                guided = generator.generate(GenerationRequest(
                    **base, control=ControlInput(name=controlnet, image=source))).images[0]
                without.append(edge_correlation(plain, edges))
                with_cn.append(edge_correlation(guided, edges))
                if seed == 0:
                    cells[(position, encoder)] = [plain, guided]
        results[encoder] = {"with_control": float(np.mean(with_cn)), "without_control": float(np.mean(without)),
                            "margin": float(np.mean(with_cn) - np.mean(without)), "n": len(with_cn)}
    if grid is not None:
        _draw_grid(cells, encoders, Path(grid), prompt)
    return results


def _draw_grid(cells: dict, encoders: list[str], path: Path, prompt: str, cell: int = 96) -> None:
    from PIL import ImageDraw

    controls = square_controls()
    columns = ["control"] + [f"{e} {kind}" for e in encoders for kind in ("without", "with")]
    canvas = Image.new("RGB", (cell * len(columns), 20 + cell * len(controls) + 18), "white")
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(columns):
        draw.text((j * cell + 3, 4), name, fill="black")
    for i, (position, source) in enumerate(controls):
        row = [canny(source)] + [im for e in encoders for im in cells[(position, e)]]
        for j, image in enumerate(row):
            canvas.paste(image.resize((cell, cell), Image.NEAREST), (j * cell, 20 + i * cell))
    draw.text((3, 20 + cell * len(controls) + 3), f'prompt: "{prompt}", seed 0', fill="black")
    canvas.save(path)
