"""A kit whose teacher's embeddings have a few channels of very large magnitude, as real T5 v1.1 encoders' do, and
which draws the same images as the kit it is made from: `t2i world outliers --kit KIT -o OUT`.

    t2i world outliers --kit service/models/miniature -o kit-outliers --channels 4 --scale 100
    t2i world paper --kit kit-outliers -o paper-outliers     # step-following against embedding-MSE on it

The teacher's final RMS norm multiplies the chosen channels by `scale`, and every consumer of the teacher's embeddings
(the denoiser's context embedder, the ControlNet's) divides its weights on those channels by `scale`: the product the
denoiser sees is unchanged (exact up to float rounding), so the teacher's images are the same, while a loss taken in
the embedding space (embedding-MSE distillation) now sees a few channels `scale` times larger than the rest. The
untrained students are kept as they are.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import FluxControlNetModel, FluxTransformer2DModel
from transformers import T5EncoderModel

from trainer.world.train import TEACHER


def make_outlier_kit(kit: str | Path, out: str | Path, *, channels: int = 4, scale: float = 100.0,
                     seed: int = 0) -> dict:
    """Copy KIT to OUT with `channels` of the teacher's output channels (drawn from `seed`) scaled by `scale` and the
    embedding consumers scaled back. Returns {"channels": [...], "scale": scale}."""
    kit, out = Path(kit), Path(out)
    # 1. A copy of the kit to change.
    shutil.copytree(kit, out, ignore=shutil.ignore_patterns("work", "__pycache__"))

    # 2. The teacher: its final norm's weights on the chosen channels, times `scale`.
    teacher_dir = out / "encoders" / TEACHER.role
    teacher = T5EncoderModel.from_pretrained(teacher_dir)
    width = teacher.config.d_model
    picked = sorted(torch.randperm(width, generator=torch.Generator().manual_seed(seed))[:channels].tolist())
    with torch.no_grad():
        teacher.encoder.final_layer_norm.weight[picked] *= scale
    teacher.save_pretrained(teacher_dir)

    # 3. Its consumers: the context embedders' input weights on those channels, divided by `scale`.
    consumers = [(FluxTransformer2DModel, out / "pipelines" / "flux" / "transformer")]
    consumers += [(FluxControlNetModel, path.parent) for path in sorted((out / "controlnets").glob("*/config.json"))]
    for cls, path in consumers:
        model = cls.from_pretrained(path)
        with torch.no_grad():
            model.context_embedder.weight[:, picked] /= scale
        model.save_pretrained(path)
    return {"channels": picked, "scale": scale, "width": width}
