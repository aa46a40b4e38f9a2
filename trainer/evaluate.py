"""`t2i eval CONFIG --student DIR [--student DIR ...]`: students against the teacher on held-out prompts.

Per criterion (image quality, semantics, text rendering) and student: the vision loss (denoiser prediction MSE on the
teacher's trajectory), PSNR and SSIM of the student's image against the teacher's for the same seed (generated through
the service's own generation code), the cosine of the per-token embeddings, and the CLIP score when `--clip-model`
names a local CLIP model. Writes OUT/report.json, OUT/report.md and OUT/grid.png (rows prompts, columns teacher and
students).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from service.models.generation import ControlInput, GenerationRequest, Generator
from service.models.registry import Registry
from trainer.components import Components, load_student, student_spec
from trainer.config import CRITERIA, DistillConfig
from trainer.dataset import read_split
from trainer.distill import vision_loss
from trainer.trajectory import Trajectory

METRICS = ("vision_loss", "psnr", "ssim", "embedding_cosine", "clip_score")
LOWER_IS_BETTER = {"vision_loss"}


def _tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def evaluate(config: DistillConfig, students: list[str | Path], out_dir: str | Path, *, per_criterion: int = 8,
             clip_model: str | None = None, grid_rows: int = 2, loras: tuple[tuple[str, float | None], ...] = (),
             control: ControlInput | None = None) -> dict:
    """`loras` and `control` (registered in the config's models file) apply to the teacher's and every student's
    images alike, to check that a student keeps a LoRA's style or a ControlNet's structure as the teacher does."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # 1. The teacher and the frozen denoiser; the students registered beside the teacher under their dir names.
    components = Components(config, device=device, live_teacher=True, with_student=False)
    names = [Path(s).name for s in students]
    if len(set(names)) != len(names):
        names = [f"{i}-{n}" for i, n in enumerate(names)]
    registry = components.registry
    encoders = {components.teacher_name: components.teacher_spec}
    encoders.update({n: student_spec(n, s, config.max_sequence_length) for n, s in zip(names, students)})
    generator = Generator(Registry(pipelines=registry.pipelines, encoders=encoders, loras=registry.loras,
                                   controlnets=registry.controlnets, path=registry.path),
                          device=str(device), encoder_device=str(device))
    modules = {n: load_student(Path(s), components.denoiser.joint_attention_dim, device).eval()
               for n, s in zip(names, students)}
    trajectory = Trajectory(components.denoiser, config.trajectory_steps, config.resolution)
    clip_scorer = None
    if clip_model:
        from torchmetrics.multimodal.clip_score import CLIPScore

        clip_scorer = CLIPScore(model_name_or_path=clip_model)

    # 2. Held-out prompts per criterion.
    rows = read_split(config.data, "validation")
    chosen = {c: [r for r in rows if r["criterion"] == c][:per_criterion] for c in CRITERIA}
    guidance = sorted(config.guidance_choices)[len(config.guidance_choices) // 2]

    # 3. Every prompt: teacher image, then each student's metrics.
    values: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    grid: list[tuple[str, list[Image.Image]]] = []
    for criterion, picked in chosen.items():
        for k, row in enumerate(picked):
            prompt, seed = row["prompt"], config.seed + k
            request = dict(prompt=prompt, pipeline=config.pipeline, seed=seed, loras=loras, control=control)
            teacher_image = generator.generate(GenerationRequest(encoder=components.teacher_name, **request)).images[0]
            t5, clip, pooled = components.teacher_conditioning([prompt])
            ids = components.token_ids([prompt])
            images = [teacher_image]
            for name in names:
                image = generator.generate(GenerationRequest(encoder=name, **request)).images[0]
                images.append(image)
                with torch.no_grad():
                    student_t5 = modules[name](ids.to(device))[0]
                record = values[criterion][name]
                record["vision_loss"].append(vision_loss(components, trajectory, modules[name], ids, t5, clip, pooled,
                                                         guidance, noise_seed=seed))
                record["psnr"].append(peak_signal_noise_ratio(_tensor(image), _tensor(teacher_image),
                                                              data_range=1.0).item())
                record["ssim"].append(structural_similarity_index_measure(_tensor(image), _tensor(teacher_image),
                                                                          data_range=1.0).item())
                record["embedding_cosine"].append(F.cosine_similarity(student_t5.float(), t5.float(), dim=-1)
                                                  .mean().item())
                if clip_scorer is not None:
                    pixels = torch.from_numpy(np.asarray(image.convert("RGB"))).permute(2, 0, 1)
                    record["clip_score"].append(clip_scorer(pixels, prompt).item())
            if k < grid_rows:
                grid.append((prompt, images))

    # 4. The report: means per criterion and student, and which student is closest to the teacher.
    report = {
        "teacher": components.teacher_name, "pipeline": config.pipeline, "students": names,
        "prompts_per_criterion": {c: len(p) for c, p in chosen.items()},
        "clip_score": "computed" if clip_scorer else "not configured (pass --clip-model DIR)",
        "loras": [{"name": n, "scale": sc} for n, sc in loras],
        "control": None if control is None else {"name": control.name, "scale": control.scale},
        "results": {c: {n: {m: float(np.mean(v)) for m, v in values[c][n].items()} for n in names}
                    for c in CRITERIA if chosen[c]},
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "report.md").write_text(f"# Students vs teacher `{report['teacher']}` on `{report['pipeline']}`\n\n"
                                       + markdown_table(report) + "\n")
    draw_grid(grid, [components.teacher_name, *names], out_dir / "grid.png")
    return report


def markdown_table(report: dict) -> str:
    metrics = [m for m in METRICS if any(m in r for c in report["results"].values() for r in c.values())]
    header = "| criterion | student | " + " | ".join(metrics) + " |"
    lines = [header, "|" + "---|" * (len(metrics) + 2)]
    for criterion, by_student in report["results"].items():
        for name, row in by_student.items():
            lines.append(f"| {criterion} | {name} | " + " | ".join(f"{row[m]:.4g}" for m in metrics) + " |")
    lines.append("")
    lines.append("vision_loss: lower is closer to the teacher; psnr, ssim, embedding_cosine: higher is closer.")
    return "\n".join(lines)


def draw_grid(rows: list[tuple[str, list[Image.Image]]], columns: list[str], path: Path, cell: int = 128) -> None:
    label_h, text_w = 18, 220
    canvas = Image.new("RGB", (text_w + cell * len(columns), label_h + cell * max(len(rows), 1)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(columns):
        draw.text((text_w + j * cell + 4, 3), name, fill="black")
    for i, (prompt, images) in enumerate(rows):
        y = label_h + i * cell
        draw.text((4, y + 4), "\n".join(prompt[k:k + 34] for k in range(0, min(len(prompt), 170), 34)), fill="black")
        for j, image in enumerate(images):
            canvas.paste(image.convert("RGB").resize((cell, cell), Image.NEAREST), (text_w + j * cell, y))
    canvas.save(path)
