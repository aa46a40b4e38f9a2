"""Vision-based distillation of a T5 student: `t2i distill train CONFIG [--key=value ...]`.

    t2i distill train tiny-cpu --data=data --output_dir=runs/tiny                      # CPU, demo kit, minutes
    torchrun --standalone --nproc_per_node=8 -m service.cli distill train flux-t5-base  # 8 GPUs, DDP
    accelerate launch --multi_gpu --num_processes 8 -m service.cli distill train flux-t5-base

Modes:
- step-following (the paper): from Gaussian noise, walk the teacher's own sampling trajectory; at each step the
  frozen denoiser predicts with the teacher's embeddings (no grad) and with the student's; the loss is the MSE
  between the two predictions, backpropagated through the frozen denoiser into the student; one optimizer step;
  then the latent advances with the teacher's prediction.
- random-timestep: one step per batch, at a random point of the teacher's trajectory.
- embedding-mse: the naive baseline, MSE between student and teacher embeddings; no denoiser.

Correct where the authors' public code is not: the student starts from the weights it is given; its master weights
stay fp32 under bf16 autocast; gradients are clipped on the student's parameters; the frozen denoiser has no
gradients and no optimizer state. A crash or Ctrl-C loses at most the steps since the last checkpoint; running the
same command again resumes exactly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from tqdm.auto import tqdm

from service.errors import TrainingError
from service.models.devices import set_threads
from trainer import checkpoint
from trainer.components import Components, load_student
from trainer.config import DistillConfig, to_yaml
from trainer.dataset import read_split
from trainer.teacher_cache import TeacherCache
from trainer.trajectory import Trajectory

log = logging.getLogger("t2i.distill")


def _generator(*key: int) -> torch.Generator:
    """A CPU generator seeded by a tuple of ints: the same draws for the same (seed, batch, ...) anywhere."""
    return torch.Generator().manual_seed(hash(key) & 0x7FFF_FFFF_FFFF)


class Conditioner:
    """Teacher conditioning for rows of a split: from the cache, or from the live teacher."""

    def __init__(self, components: Components, cache: TeacherCache | None, splits: dict[str, list[dict]]):
        self.components, self.cache, self.splits = components, cache, splits

    def __call__(self, split: str, indices: list[int]):
        if self.cache is not None:
            t5, clip, pooled = self.cache.get(split, indices)
        else:
            t5, clip, pooled = self.components.teacher_conditioning([self.splits[split][i]["prompt"] for i in indices])
        device = self.components.denoiser.device
        return t5.to(device), (clip.to(device) if clip is not None else None), pooled.to(device)


def set_dropout(module: torch.nn.Module, p: float | None) -> None:
    if p is None:
        return
    for sub in module.modules():
        if isinstance(sub, torch.nn.Dropout):
            sub.p = p


def vision_loss(components: Components, trajectory: Trajectory, student, ids: torch.Tensor, t5, clip, pooled,
                guidance: float, noise_seed: int, steps: list[int] | None = None) -> float:
    """Held-out vision loss: mean over the trajectory of the MSE between the denoiser's predictions with the
    teacher's and the student's embeddings, on the teacher's path from fixed noise. No gradients."""
    denoiser = components.denoiser
    with torch.no_grad():
        was_training = student.training
        student.eval()
        student_t5 = student(ids.to(denoiser.device))[0]
        student.train(was_training)
        teacher_states, student_states = denoiser.join(clip, t5), denoiser.join(clip, student_t5)
        latents = trajectory.noise(ids.shape[0], _generator(noise_seed))
        losses = []
        for i in range(trajectory.steps):
            v_teacher = trajectory.predict(latents, i, teacher_states, pooled, guidance)
            if steps is None or i in steps:
                v_student = trajectory.predict(latents, i, student_states, pooled, guidance)
                losses.append(F.mse_loss(v_student.float(), v_teacher.float()).item())
            latents = trajectory.advance(latents, i, v_teacher)
    return sum(losses) / len(losses)


def _check_finite(loss: float, grad_norm, step: int, run_dir: Path, config: DistillConfig) -> None:
    """Stop before a step whose loss or gradients are not finite: it would leave the student's weights NaN, and every
    later step, checkpoint and export with them. The gradient norm is taken after DDP's all-reduce, so every rank stops
    at the same step."""
    norm = float(grad_norm)
    if math.isfinite(loss) and math.isfinite(norm):
        return
    what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {norm}"
    hint = (" The denoiser runs in bfloat16 here (`denoiser_dtype` auto on a GPU); --denoiser_dtype=float32 keeps it in "
            "float32." if config.denoiser_dtype != "float32" and torch.cuda.is_available() else "")
    raise TrainingError(f"step {step} of {run_dir}: the distillation's {what}, so the run stops before the student's "
                        f"weights stop being finite (its checkpoints up to here are kept). Run it again into a new "
                        f"--output_dir with a smaller --lr (now {config.lr}).{hint}", field="lr")


def train(config: DistillConfig, *, show_progress: bool = True, stop_after: int | None = None) -> dict:
    """Run (or resume) a distillation. `stop_after` ends early after that many optimizer steps (for tests of
    resumption). Returns a summary: final step, the eval curve, the run dir."""
    # 1. Processes, devices, threads. torchrun / accelerate launch set the world; a plain call is one process.
    set_threads(config.threads)
    # Accelerate keeps its mixed-precision choice in a process-wide singleton: forget an earlier run's (one that ended
    # or stopped on an error), so that this one, in the same process (tests, notebooks), may choose another. The process
    # group (PartialState) stays.
    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available())
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    run_dir = Path(config.output_dir)
    checkpoint.check_resumable(run_dir, config)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(config))

    # 2. Data, and the teacher: from its cache when there is one, else live.
    splits = {"train": read_split(config.data, "train"), "validation": read_split(config.data, "validation")}
    components = Components(config, device=device, live_teacher=config.teacher_cache is None)
    cache = TeacherCache(config.teacher_cache, config, components.teacher_name, splits) if config.teacher_cache \
        else None
    conditioner = Conditioner(components, cache, splits)
    train_ids = components.token_ids([r["prompt"] for r in splits["train"]])
    eval_rows = list(range(min(config.eval_prompts, len(splits["validation"]))))
    eval_ids = components.token_ids([splits["validation"][i]["prompt"] for i in eval_rows])
    eval_t5, eval_clip, eval_pooled = conditioner("validation", eval_rows)
    if config.zero_pooled:
        eval_pooled = torch.zeros_like(eval_pooled)
    eval_guidance = sorted(config.guidance_choices)[len(config.guidance_choices) // 2]

    # 3. The student (fp32 master weights) and its optimizer; only the student is prepared for DDP.
    student = components.student
    student.train()
    set_dropout(student, config.student_dropout)
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    student, optimizer = accelerator.prepare(student, optimizer)
    trajectories: dict[int, Trajectory] = {}

    def trajectory_at(step: int) -> Trajectory:
        resolution = config.resolution
        if config.high_resolution and config.high_resolution_from_step is not None \
                and step >= config.high_resolution_from_step:
            resolution = config.high_resolution
        if resolution not in trajectories:
            trajectories[resolution] = Trajectory(components.denoiser, config.trajectory_steps, resolution)
        return trajectories[resolution]

    # 4. Resume from the latest complete checkpoint, if any.
    step, batch_index, history = 0, 0, {"eval": [], "loss": []}
    existing = checkpoint.checkpoint_dirs(run_dir)
    if existing:
        latest = existing[-1]
        state = checkpoint.read_state(latest)
        resumed = load_student(latest, accelerator.unwrap_model(student).output_width)
        accelerator.unwrap_model(student).load_state_dict(resumed.state_dict())
        checkpoint.load_optimizer(latest, optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer)
        step, batch_index, history = state["step"], state["batch"], state["history"]
        if accelerator.is_main_process:
            log.info("resumed from %s at step %d", latest, step)
    elif accelerator.is_main_process:
        initial = vision_loss(components, trajectory_at(0), accelerator.unwrap_model(student), eval_ids, eval_t5,
                              eval_clip, eval_pooled, eval_guidance, noise_seed=config.seed + 7)
        history["eval"].append({"step": 0, "vision_loss": initial})

    # 5. The loop: one global batch of prompts per iteration, each rank taking its slice.
    micro, accum = config.micro_batch_size, config.grad_accum_steps
    global_batch = micro * accum * world
    n_train = len(splits["train"])
    bar = tqdm(total=config.max_steps, initial=step, desc="distill", unit="step",
               disable=not (show_progress and accelerator.is_main_process))
    log_path = run_dir / "log.jsonl"
    started, steps_this_run = time.perf_counter(), 0
    while step < config.max_steps and (stop_after is None or steps_this_run < stop_after):
        # 5a. Which prompts: an epoch-wise permutation from the seed; this rank's micro-batches of the global batch.
        positions = [batch_index * global_batch + k for k in range(global_batch)]
        order = {}
        for pos in positions:
            epoch = pos // n_train
            if epoch not in order:
                order[epoch] = torch.randperm(n_train, generator=_generator(config.seed, epoch)).tolist()
        rows = [order[p // n_train][p % n_train] for p in positions]
        mine = [rows[(rank * accum + a) * micro:(rank * accum + a + 1) * micro] for a in range(accum)]

        # 5b. Noise and guidance for the whole global batch (sliced per rank), dropout seeded per (batch, rank).
        trajectory = trajectory_at(step)
        noise = trajectory.noise(global_batch, _generator(config.seed, batch_index, 1))
        guidance = random.Random(hash((config.seed, batch_index, 2))).choice(config.guidance_choices)
        torch.manual_seed(hash((config.seed, batch_index, rank, 3)) & 0x7FFF_FFFF)
        micro_batches = []
        for a, indices in enumerate(mine):
            t5, clip, pooled = conditioner("train", indices)
            if config.zero_pooled:
                pooled = torch.zeros_like(pooled)
            offset = (rank * accum + a) * micro
            micro_batches.append({
                "ids": train_ids[indices].to(device), "t5": t5, "clip": clip, "pooled": pooled,
                "latents": noise[offset:offset + micro], "teacher_states": components.denoiser.join(clip, t5),
            })

        # 5c. The optimizer steps this batch gives: every trajectory step (step-following), one random step
        #     (random-timestep), or one embedding step.
        if config.mode == "step-following":
            loss_steps = list(range(trajectory.steps))
        elif config.mode == "random-timestep":
            loss_steps = [random.Random(hash((config.seed, batch_index, 4))).randrange(trajectory.steps)]
        else:
            loss_steps = [0]
        for i in range(trajectory.steps if config.mode != "embedding-mse" else 1):
            if i in loss_steps:
                total = 0.0
                for a, mb in enumerate(micro_batches):
                    # gradients sync across ranks on the last micro-batch only
                    sync = contextlib.nullcontext() if a == accum - 1 else accelerator.no_sync(student)
                    with sync, accelerator.autocast():
                        student_t5 = student(mb["ids"])[0]
                        if config.mode == "embedding-mse":
                            loss = F.mse_loss(student_t5.float(), mb["t5"].float())
                        else:
                            with torch.no_grad():
                                v_teacher = trajectory.predict(mb["latents"], i, mb["teacher_states"], mb["pooled"],
                                                               guidance)
                            states = components.denoiser.join(mb["clip"], student_t5)
                            v_student = trajectory.predict(mb["latents"], i, states, mb["pooled"], guidance)
                            loss = F.mse_loss(v_student.float(), v_teacher.float())
                            mb["v_teacher"] = v_teacher.detach()
                        accelerator.backward(loss / accum)
                    total += loss.item() / accum
                norm = accelerator.clip_grad_norm_(student.parameters(), config.max_grad_norm)  # the student's only
                _check_finite(total, norm, step + 1, run_dir, config)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                steps_this_run += 1
                loss_value = accelerator.reduce(torch.tensor(total, device=device), reduction="mean").item()
                if step % config.log_every == 0:
                    history["loss"].append([step, loss_value])
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3e}", steps_per_s=f"{steps_this_run / (time.perf_counter() - started):.2f}")
                if accelerator.is_main_process and step % config.log_every == 0:
                    with open(log_path, "a") as f:
                        f.write(json.dumps({"step": step, "loss": loss_value, "lr": config.lr, "guidance": guidance,
                                            "steps_per_s": steps_this_run / (time.perf_counter() - started),
                                            "time": time.time()}) + "\n")
            if config.mode == "embedding-mse":
                break
            # advance every micro-batch along the teacher's path
            for mb in micro_batches:
                v_teacher = mb.pop("v_teacher", None)
                if v_teacher is None:
                    with torch.no_grad():
                        v_teacher = trajectory.predict(mb["latents"], i, mb["teacher_states"], mb["pooled"], guidance)
                mb["latents"] = trajectory.advance(mb["latents"], i, v_teacher)
            if step >= config.max_steps:
                break
        batch_index += 1

        # 5d. Held-out vision loss, the loss curve, and a checkpoint, at batch boundaries.
        if accelerator.is_main_process and (step % config.eval_every < config.steps_per_batch
                                             or step >= config.max_steps):
            value = vision_loss(components, trajectory_at(0), accelerator.unwrap_model(student), eval_ids, eval_t5,
                                eval_clip, eval_pooled, eval_guidance, noise_seed=config.seed + 7)
            history["eval"].append({"step": step, "vision_loss": value})
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": step, "eval_vision_loss": value, "time": time.time()}) + "\n")
            plot_losses(history, run_dir / "loss.png")
        if step % config.checkpoint_every < config.steps_per_batch or step >= config.max_steps:
            if accelerator.is_main_process:
                checkpoint.save(run_dir, step, accelerator.unwrap_model(student), optimizer, components.tokenizer,
                                config, {"batch": batch_index, "history": history}, keep=config.keep_checkpoints)
            accelerator.wait_for_everyone()
    bar.close()
    accelerator.wait_for_everyone()
    summary = {"step": step, "eval": history["eval"], "run_dir": str(run_dir), "world_size": world}
    if accelerator.is_main_process:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.end_training()
    AcceleratorState._reset_state()  # as at the start, for whatever runs next in this process
    return summary


def plot_losses(history: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if history["loss"]:
        steps, losses = zip(*history["loss"])
        ax.plot(steps, losses, lw=0.8, alpha=0.6, label="train loss")
    if history["eval"]:
        ax.plot([e["step"] for e in history["eval"]], [e["vision_loss"] for e in history["eval"]], "o-",
                label="held-out vision loss")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
