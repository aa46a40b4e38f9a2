"""Train the miniature world's text-to-image model from scratch: `t2i world train -o DIR`.

    t2i world train -o kit --threads 1          # the default budget: about 2 h on one CPU core, in the background
    t2i world train -o kit --steps 1000 --vae-steps 300      # a quick look
    t2i world train -o kit2 --from kit --steps 1000 --lr 3e-4 --mix single=1      # a second stage from kit's denoiser

It writes a complete model kit: DIR/pipelines/flux (a real diffusers FluxPipeline: FluxTransformer2DModel +
AutoencoderKL + FlowMatchEulerDiscreteScheduler, and a null CLIP), DIR/encoders/t5-xxl (the teacher T5, frozen and
randomly initialised: the denoiser learns to read it, as FLUX learnt to read a T5 it did not train), untrained students
at about 1/4, 1/16 and 1/64 of the teacher's parameters, DIR/models.yaml, and DIR/train_log.jsonl.

Budgets are in steps, not minutes, so a run is reproducible from its seed on one machine, and a GPU runs the same
command faster (`--device auto`, the default, takes the first CUDA device when there is one; the data and the noise are
drawn on the CPU either way, so both draw the same batches). Every batch is drawn from generators seeded by (seed,
stage, step), so the run needs no random state on disk: it checkpoints the VAE once trained and the denoiser, its EMA
and the optimizer every `--checkpoint-every` steps under DIR/work/ (safetensors and JSON), and rerunning the same
command resumes where it stopped.

Choices: the CLIP slot is a null encoder (its pooled output is zero) so that the T5 encoder alone carries the prompt
and encoders can be compared sharply; the VAE is a small AutoencoderKL trained first (32x32 -> 16x16x4 by default, 64
image tokens after FLUX's 2x2 packing), so the stock pipeline runs unchanged; the denoiser is trained by rectified flow
(the FLUX objective) with logit-normal timesteps, 10% caption dropout for classifier-free guidance, and an EMA of its
weights. Training never sees the held-out combinations of `captions.is_novel`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel, T5EncoderModel

from service.errors import ConfigError, ValidationError
from service.models.demo import T5Size, _clip_config, build_clip_tokenizer, build_student, build_t5_tokenizer
from service.models.demo import build_teacher
from service.models.devices import bf16_arithmetic, resolve_device
from service.models.registry import auto_route, quantized_teacher_entries
from trainer.checkpoint import load_optimizer, save_optimizer
from trainer.world.captions import training_scene
from trainer.world.scene import SIZE, render

TEACHER = T5Size("t5-xxl", 256, 4, 4, 512)
STUDENTS = (T5Size("t5-large", 128, 4, 4, 256), T5Size("t5-base", 64, 3, 4, 128), T5Size("t5-small", 32, 2, 2, 64))
MAX_TOKENS = 16
KIND_WEIGHTS = {"single": 0.3, "count": 0.3, "relation": 0.28, "text": 0.12}  # the VAE's caption mix
# The shipped kit's recipe (docs/miniature.md, "The models"): the denoiser's caption mix, where its training
# timesteps sit, its teacher, and the guidance chosen for it on the validation prompts (best of 1.0, 1.5, 2 and 3).
DENOISER_MIX = {"single": 0.15, "count": 0.45, "relation": 0.25, "text": 0.15}
TRUE_CFG_SCALE = 1.0  # no guidance: best for the 8-head denoiser (the 4-head one's was 1.5)


@dataclass(frozen=True)
class WorldConfig:
    """What `t2i world train` builds and how long it trains it."""

    vae_channels: tuple[int, ...] = (16, 32)  # one down-sampling per extra entry: 32x32 -> 16x16
    latent_channels: int = 4
    vae_steps: int = 1500
    vae_batch: int = 32
    vae_lr: float = 1e-3
    layers: int = 2  # FLUX double-stream blocks
    single_layers: int = 4
    heads: int = 8  # of 32 dims each (the shipped kit's; the two earlier kits had 4, docs/miniature.md)
    steps: int = 5000
    batch: int = 64
    lr: float = 1e-3  # the denoiser's peak learning rate
    warmup: int = 200
    ema: float = 0.999  # the kit's denoiser is this EMA of its weights; 0 keeps the trained weights themselves
    checkpoint_every: int = 250
    # Location of the logit-normal training timesteps (0: centred on sigma 0.5, as FLUX and SD3 train). Above 0 trains
    # more at high noise, where an image's layout (how many objects, which where) is decided.
    timestep_mean: float = 1.0
    # The denoiser's caption mix, (kind, weight) in the order of KINDS: how often each kind of scene is drawn. The VAE
    # always trains on KIND_WEIGHTS, so runs that differ only here share their VAE.
    mix: tuple[tuple[str, float], ...] = tuple(DENOISER_MIX.items())
    # The frozen teacher's attention: "random" as initialised (its heads attend almost uniformly, so each output is
    # mostly its own word plus the caption's mean), or "local" (see `local_attention`).
    teacher: str = "local"
    # The arithmetic of the denoiser's forward and backward passes: "float32", or "bfloat16" under autocast (its
    # weights, optimizer state and EMA stay float32). bfloat16 is faster on a CPU with AVX-512 BF16 or AMX and on a
    # GPU, and slower where the CPU must emulate it (AVX2 only).
    precision: str = "float32"
    # Where the denoiser starts: None from random weights; otherwise a digest of a kit's denoiser weights, for a second
    # stage that goes on from that kit's denoiser, VAE and teacher (`t2i world train --from KIT`).
    start: str | None = None

    @property
    def latent_size(self) -> int:
        return SIZE // 2 ** (len(self.vae_channels) - 1)

    @property
    def architecture(self) -> dict:
        """What a checkpoint's weights depend on: a run resumes only with the same."""
        return {"vae_channels": list(self.vae_channels), "latent_channels": self.latent_channels,
                "layers": self.layers, "single_layers": self.single_layers, "heads": self.heads}

    @property
    def recipe(self) -> dict:
        """What a resumed run must keep besides the architecture for its steps to follow the same objective (the
        step budget may grow: its schedule is cosine over the new budget)."""
        return {"timestep_mean": self.timestep_mean, "mix": dict(self.mix), "teacher": self.teacher,
                "batch": self.batch, "precision": self.precision, "lr": self.lr, "warmup": self.warmup,
                "ema": self.ema, "start": self.start}


def batch(rng: random.Random, n: int, mix: dict[str, float] = KIND_WEIGHTS) -> tuple[torch.Tensor, list[str]]:
    """`n` training images in [-1, 1] and their captions (never a held-out combination), kinds drawn by `mix`."""
    kinds = rng.choices(list(mix), weights=list(mix.values()), k=n)
    scenes, captions = zip(*(training_scene(rng, k) for k in kinds))
    images = np.stack([render(s) for s in scenes]).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(images).permute(0, 3, 1, 2), list(captions)


def build_vae(config: WorldConfig = WorldConfig()) -> AutoencoderKL:
    blocks = len(config.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks, block_out_channels=config.vae_channels, layers_per_block=1,
        latent_channels=config.latent_channels, norm_num_groups=8, sample_size=SIZE, scaling_factor=1.0,
        shift_factor=0.0, use_quant_conv=False, use_post_quant_conv=False,
    )


def build_transformer(config: WorldConfig = WorldConfig()) -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4 * config.latent_channels, num_layers=config.layers,
        num_single_layers=config.single_layers, attention_head_dim=32, num_attention_heads=config.heads,
        joint_attention_dim=TEACHER.d_model, pooled_projection_dim=32, guidance_embeds=False, axes_dims_rope=(8, 12, 12),
    )


LOCAL_BIAS = 10.0


def local_attention(teacher: T5EncoderModel) -> T5EncoderModel:
    """Give the random teacher's first three attention heads a strong relative-position bias toward the previous
    word, the next word and the word itself (the fourth stays as initialised; a two-head T5 gets the first two). T5
    computes that bias once and every layer uses it, so each output then carries its neighbours: the shape word of
    "a red circle" carries "red", as a trained T5's outputs bind neighbouring words (`binding` in `t2i world
    diagnose` reads it)."""
    attention = teacher.encoder.block[0].layer[0].SelfAttention
    config = teacher.config
    with torch.no_grad():
        bias = attention.relative_attention_bias.weight  # [buckets, heads]
        for head, offset in zip(range(config.num_heads), (-1, 1, 0)):
            bucket = attention._relative_position_bucket(torch.tensor(offset), bidirectional=True,
                                                         num_buckets=config.relative_attention_num_buckets,
                                                         max_distance=config.relative_attention_max_distance)
            bias[bucket, head] += LOCAL_BIAS
    return teacher


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


def _draw(seed: int, stage: int, step: int) -> tuple[random.Random, torch.Generator]:
    """The generators of one step: data from the first, noise from the second; a resumed run draws the same."""
    key = (seed * 1_000_003 + stage) * 10_000_019 + step
    return random.Random(key), torch.Generator().manual_seed(key % 2**63)


def train_vae(vae: AutoencoderKL, config: WorldConfig, seed: int, log: Path) -> None:
    device = vae.device
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr)
    start = time.monotonic()
    vae.train()
    for step in range(1, config.vae_steps + 1):
        rng, gen = _draw(seed, 1, step)
        images = batch(rng, config.vae_batch)[0].to(device)
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample(gen)).sample
        loss = F.mse_loss(recon, images) + 1e-6 * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0:
            _log(log, stage="vae", step=step, loss=loss.item(), elapsed_s=time.monotonic() - start)
    vae.eval().requires_grad_(False)
    # Normalise latents to zero mean, unit variance, as FLUX's VAE config does with shift and scaling factors.
    with torch.no_grad():
        latents = torch.cat([vae.encode(batch(_draw(seed, 2, i)[0], 64)[0].to(device)).latent_dist.mean
                             for i in range(16)])
    vae.register_to_config(shift_factor=latents.mean().item(), scaling_factor=1.0 / latents.std().item())


def train_denoiser(transformer: FluxTransformer2DModel, vae: AutoencoderKL, teacher, tokenizer, config: WorldConfig,
                   seed: int, log: Path, work: Path) -> FluxTransformer2DModel:
    """Rectified flow on the teacher's embeddings; resumes from WORK/denoiser when a checkpoint is there."""
    ema = copy.deepcopy(transformer).requires_grad_(False)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=config.lr, weight_decay=0.0)
    ckpt, first = work / "denoiser", 1
    if (ckpt / "state.json").is_file():
        state = json.loads((ckpt / "state.json").read_text())
        # what a checkpoint's recipe does not record (it predates that setting) was trained with today's default
        saved = {**state.get("architecture", config.architecture), **WorldConfig().recipe, **state.get("recipe", {})}
        current = {**config.architecture, **config.recipe}
        changed = {k: (v, current[k]) for k, v in saved.items() if current.get(k) != v}
        if changed:
            name, (was, now) = next(iter(changed.items()))
            raise ConfigError(f"the checkpoint in {ckpt} was trained with {name}={was}, and this run asks for "
                              f"{name}={now}: resume with the same settings, or train into a new directory",
                              field=name)
        transformer.load_state_dict(load_file(ckpt / "transformer.safetensors"))
        ema.load_state_dict(load_file(ckpt / "ema.safetensors"))  # copied onto the models' device
        load_optimizer(ckpt, optimizer)
        first = json.loads((ckpt / "state.json").read_text())["step"] + 1
        _log(log, stage="denoiser", resumed_at=first)
    n, device = config.batch, transformer.device
    pooled = torch.zeros(n, 32, device=device)
    grid = config.latent_size // 2
    img_ids = FluxPipeline._prepare_latent_image_ids(1, grid, grid, device, torch.float32)
    txt_ids = torch.zeros(MAX_TOKENS, 3, device=device)
    start = time.monotonic()
    transformer.train()
    for step in range(first, config.steps + 1):
        # lr: warm-up, then cosine decay over the step budget
        lr = config.lr * min(1.0, step / config.warmup) * 0.5 * (1 + math.cos(math.pi * step / config.steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        rng, gen = _draw(seed, 3, step)
        images, captions = batch(rng, n, dict(config.mix))
        captions = ["" if rng.random() < 0.1 else c for c in captions]
        with torch.no_grad():
            z = vae.encode(images.to(device)).latent_dist.mean
            z = (z - vae.config.shift_factor) * vae.config.scaling_factor
            x0 = FluxPipeline._pack_latents(z, n, z.shape[1], z.shape[2], z.shape[3])
            ids = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                            return_tensors="pt").input_ids
            text = teacher(ids.to(device))[0]
        sigma = torch.sigmoid(torch.randn(n, generator=gen) + config.timestep_mean).view(-1, 1, 1).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        x_t = (1 - sigma) * x0 + sigma * noise
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bfloat16"):
            pred = transformer(hidden_states=x_t, timestep=sigma.view(-1), encoder_hidden_states=text,
                               pooled_projections=pooled, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise - x0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for e, p in zip(ema.parameters(), transformer.parameters()):
                e.lerp_(p, 1 - config.ema)
        if step % 100 == 0:
            elapsed = time.monotonic() - start
            _log(log, stage="denoiser", step=step, loss=loss.item(), lr=lr, elapsed_s=elapsed,
                 steps_per_s=(step - first + 1) / max(elapsed, 1e-6))
        if step % config.checkpoint_every == 0 or step == config.steps:
            tmp = work / ".denoiser.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_file(transformer.state_dict(), tmp / "transformer.safetensors")
            save_file(ema.state_dict(), tmp / "ema.safetensors")
            save_optimizer(tmp, optimizer)
            (tmp / "state.json").write_text(json.dumps({"step": step, "architecture": config.architecture,
                                                        "recipe": config.recipe}))
            shutil.rmtree(ckpt, ignore_errors=True)
            tmp.rename(ckpt)
    return ema.eval()


def models_file() -> dict:
    common = {"dtype": "auto", "device": "auto", "max_sequence_length": MAX_TOKENS}
    teacher = {"kind": "teacher", "source": f"./encoders/{TEACHER.role}", **common}
    return {
        "pipelines": {"flux": {"family": "flux", "source": "./pipelines/flux", "dtype": "auto", "device": "auto",
                               "width": SIZE, "height": SIZE, "steps": 20, "guidance": 0.0,
                               "true_cfg_scale": TRUE_CFG_SCALE}},
        "encoders": {TEACHER.role: teacher,
                     **quantized_teacher_entries(TEACHER.role, teacher),
                     **{s.role: {"kind": "student", "source": f"./encoders/{s.role}", **common} for s in STUDENTS}},
        "routes": auto_route(TEACHER.role),
    }


def write_untrained_students(directory: Path, tokenizer, seed: int = 0, init: str = "local") -> dict[str, Path]:
    """The students at their untrained start, as a kit trained from `seed` has them, one HF dir per role: random
    weights, and with `init="local"` the local attention prior of `local_attention` (as the paper's students start
    from pretrained T5s, whose heads already attend to neighbouring words, not from random ones)."""
    paths = {}
    for index, size in enumerate(STUDENTS, start=1):
        paths[size.role] = directory / size.role
        student = build_student(size, tokenizer, seed=seed + 10 + index, project_out_dim=TEACHER.d_model)
        if init == "local":
            local_attention(student.encoder)
        student.save_pretrained(paths[size.role])
        tokenizer.save_pretrained(paths[size.role])
    return paths


def start_of(kit: str | Path, config: WorldConfig) -> tuple[Path, str]:
    """A kit a second stage starts from (`t2i world train --from KIT`): its pipeline dir, after checking it has a
    denoiser of `config`'s architecture, a VAE and a teacher; and the digest of its denoiser's weights, which the
    stage records so that a resume from another start is refused."""
    flux = Path(kit) / "pipelines" / "flux"
    for part in (flux / "transformer", flux / "vae", Path(kit) / "encoders" / TEACHER.role):
        if not (part / "config.json").is_file():
            raise ValidationError(f"`--from` {kit}: no {part.relative_to(kit)} (a kit from `t2i world train` has one)",
                                  field="from")
    found = json.loads((flux / "transformer" / "config.json").read_text())
    asked = {"num_attention_heads": ("heads", config.heads), "num_layers": ("layers", config.layers),
             "num_single_layers": ("single_layers", config.single_layers),
             "in_channels": ("latent_channels", 4 * config.latent_channels)}  # as `build_transformer` makes them
    for name, (flag, value) in asked.items():
        if found.get(name) != value:
            raise ValidationError(f"`--from` {kit}: its denoiser has {name}={found.get(name)}, and this run asks "
                                  f"for {value}: give the kit's `--{flag.replace('_', '-')}`", field=flag)
    weights = sorted((flux / "transformer").glob("*.safetensors"))
    digest = hashlib.sha256()
    for path in weights:
        with open(path, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return flux, digest.hexdigest()[:16]


def train_world(out_dir: str | Path, config: WorldConfig = WorldConfig(), *, seed: int = 0,
                denoiser_dtype: str = "float16", device: str = "auto", start: str | Path | None = None) -> Path:
    """Train (or resume) the world and write its kit. `denoiser_dtype` is how the kit stores the denoiser's
    weights (float16 halves its bytes); it trains in float32 either way, and the service loads it in the models
    file's dtype. `device` is where it trains (`auto`: the first CUDA device when there is one, else the CPU); every
    model is made and seeded on the CPU and moved there, and the kit is written from the CPU.

    `start`, a kit, makes this run a second stage: its denoiser goes on from that kit's (for `config.steps` more
    steps, warm-up and cosine decay from `config.lr`, on `config.mix`), with that kit's VAE and teacher, and `seed`
    draws the stage's batches and noise. The new kit has no ControlNet (one is trained against its denoiser) and
    untrained students."""
    where = resolve_device(device)
    out = Path(out_dir)
    if start is not None:
        if out.resolve() == Path(start).resolve():
            raise ValidationError(f"`--from` {start} is the output directory: a second stage writes a new kit",
                                  field="from")
        flux, digest = start_of(start, config)
        config = replace(config, start=digest)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    log = out / "train_log.jsonl"
    _log(log, stage="start", seed=seed, config=asdict(config), device=str(where),
         **({"from": str(start)} if start is not None else {}))
    if config.precision == "bfloat16" and bf16_arithmetic(where) is None:
        _log(log, stage="warning", message=f"--precision bfloat16 on {where}, which has no bfloat16 arithmetic (a CPU "
             "needs avx512_bf16 or amx_bf16, a GPU bfloat16 support): autocast emulates it, several times slower a "
             "step than float32 (docs/benchmarks.md, \"Miniature world\"); --precision float32 trains faster here")

    # 1. Tokenizers, the frozen teacher T5 and the null CLIP.
    t5_tokenizer, clip_tokenizer = build_t5_tokenizer(), build_clip_tokenizer()
    if start is not None:  # the start kit's teacher, which its denoiser learnt to read
        teacher = T5EncoderModel.from_pretrained(Path(start) / "encoders" / TEACHER.role).requires_grad_(False)
    else:
        teacher = build_teacher(t5_tokenizer, seed, size=TEACHER).requires_grad_(False)
        if config.teacher == "local":
            local_attention(teacher)
    teacher.to(where)
    clip = null_clip(clip_tokenizer)

    # 2. The VAE (trained once, then kept in WORK/vae; a second stage's is its start kit's), then the denoiser
    # conditioned on the teacher.
    if (work / "vae" / "config.json").is_file():
        vae = AutoencoderKL.from_pretrained(work / "vae").eval().requires_grad_(False).to(where)
    elif start is not None:
        vae = AutoencoderKL.from_pretrained(flux / "vae").eval().requires_grad_(False).to(where)
        vae.save_pretrained(work / "vae")
    else:
        torch.manual_seed(seed + 1)
        vae = build_vae(config).to(where)
        train_vae(vae, config, seed, log)
        vae.save_pretrained(work / "vae")
    torch.manual_seed(seed + 2)
    if start is not None:
        initial = FluxTransformer2DModel.from_pretrained(flux / "transformer", torch_dtype=torch.float32)
    else:
        initial = build_transformer(config)
    transformer = train_denoiser(initial.to(where), vae, teacher, t5_tokenizer, config, seed, log, work).cpu()
    vae, teacher = vae.cpu(), teacher.cpu()

    # 3. The kit: the pipeline, the teacher, untrained students, the models file.
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tokenizer, text_encoder_2=None,
                 tokenizer_2=None, transformer=transformer.to(getattr(torch, denoiser_dtype))
                 ).save_pretrained(out / "pipelines" / "flux")
    teacher.save_pretrained(out / "encoders" / TEACHER.role)
    t5_tokenizer.save_pretrained(out / "encoders" / TEACHER.role)
    write_untrained_students(out / "encoders", t5_tokenizer, seed, init=config.teacher)
    (out / "models.yaml").write_text("# The miniature world's model kit (`t2i world train`). Paths are relative.\n"
                                     + yaml.safe_dump(models_file(), sort_keys=False))
    return out
