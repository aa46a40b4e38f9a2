"""`t2i distill export CKPT -o DIR`: a distilled student as a Hugging Face model directory.

DIR gets model.safetensors + config.json (`T5EncoderWithProjection`, the published layout), the teacher's tokenizer,
and README.md, a model card with the training config and the evaluation table. A models file points at DIR
(`kind: student, source: DIR`), and plain diffusers loads it:
`FluxPipeline.from_pretrained(..., text_encoder_2=T5EncoderWithProjection.from_pretrained(DIR))`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from service.errors import ConfigError
from service.models.student import T5EncoderWithProjection
from trainer import checkpoint

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model")


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir, or a run dir (its latest checkpoint)."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    found = checkpoint.checkpoint_dirs(path)
    if not found:
        raise ConfigError(f"{str(path)!r} is neither a checkpoint nor a run directory with checkpoints",
                          field="CKPT")
    return found[-1]


def export(ckpt: str | Path, out_dir: str | Path) -> Path:
    ckpt = resolve_checkpoint(ckpt)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    student = T5EncoderWithProjection.from_pretrained(ckpt, local_files_only=True)
    student.save_pretrained(out_dir)
    for name in TOKENIZER_FILES:
        if (ckpt / name).exists():
            shutil.copy(ckpt / name, out_dir / name)
    state = checkpoint.read_state(ckpt)
    (out_dir / "README.md").write_text(model_card(student, ckpt, state))
    return out_dir


def model_card(student: T5EncoderWithProjection, ckpt: Path, state: dict) -> str:
    config = student.config
    n_params = sum(p.numel() for p in student.parameters())
    lines = [
        "---",
        "library_name: transformers",
        "tags: [text-encoder, t5, distillation, text-to-image]",
        "---",
        "",
        "# Distilled T5 text encoder (T5EncoderWithProjection)",
        "",
        f"A T5 encoder (d_model {config.d_model}, {config.num_layers} layers) with a projection to width "
        f"{config.project_out_dim}, distilled by vision-based (step-following) distillation so that a frozen "
        f"diffusion transformer conditioned on it predicts as it does with the teacher encoder. {n_params:,} parameters.",
        "",
        "```python",
        "from service.models.student import T5EncoderWithProjection",
        f'student = T5EncoderWithProjection.from_pretrained("{ckpt.name}")',
        "pipe = FluxPipeline.from_pretrained(..., text_encoder_2=student)",
        "```",
        "",
        f"## Training (checkpoint `{ckpt.name}`, step {state['step']})",
        "",
        "```yaml",
        (ckpt / "config.yaml").read_text().rstrip(),
        "```",
        "",
        "## Evaluation: held-out vision loss (denoiser prediction MSE vs the teacher's)",
        "",
        "| step | vision loss |",
        "|---|---|",
    ]
    lines += [f"| {e['step']} | {e['vision_loss']:.4e} |" for e in state["history"]["eval"]]
    report = ckpt.parent.parent / "eval" / "report.json"
    if report.is_file():
        lines += ["", "## Evaluation against the teacher (`t2i eval`)", "", _report_table(json.loads(report.read_text()))]
    return "\n".join(lines) + "\n"


def _report_table(report: dict) -> str:
    from trainer.evaluate import markdown_table

    return markdown_table(report)
