"""What distillation and evaluation hold: the frozen denoiser, the teacher (live or not needed), the student.

Everything that can be checked from configs is checked before any weights load: the student's tokenizer against the
teacher's, and the student's projection width against the denoiser's `joint_attention_dim`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, T5EncoderModel

from service.errors import ConfigError, ModelLoadError
from service.models.denoiser import Denoiser
from service.models.encoder import TextEncoder, load_tokenizer, tokenizer_fingerprint
from service.models.registry import EncoderSpec, Registry, Source, load_registry
from service.models.sizes import pipeline_row
from service.models.student import T5EncoderWithProjection
from trainer.config import DistillConfig


def registry_for(config: DistillConfig) -> Registry:
    return Registry.from_file(config.models_file) if config.models_file else load_registry()


def student_source(config: DistillConfig, registry: Registry) -> Path:
    if config.student in registry.encoders:
        return Path(registry.encoder(config.student).source)
    path = Path(config.student).expanduser()
    if not path.is_dir():
        raise ConfigError(f"`student`={config.student!r} is neither a registry encoder "
                          f"({', '.join(registry.encoders)}) nor a directory", field="student")
    return path


class Components:
    def __init__(self, config: DistillConfig, *, device: torch.device, live_teacher: bool = True,
                 with_student: bool = True):
        self.config = config
        registry = registry_for(config)
        self.registry = registry
        teacher_spec = registry.encoder(config.teacher) if config.teacher else registry.teacher
        if teacher_spec is None:
            raise ConfigError("the models file registers no teacher; set `teacher`", field="teacher")
        teacher_spec = teacher_spec.model_copy(update={"max_sequence_length": config.max_sequence_length})
        pipeline_spec = registry.pipeline(config.pipeline)

        # 1. Checks from configs alone: tokenizer and projection width.
        self.tokenizer = load_tokenizer(teacher_spec.tokenizer_source, f"encoder {teacher_spec.name!r}")
        self.student_dir = student_source(config, registry)
        student_config = AutoConfig.from_pretrained(self.student_dir, local_files_only=True)
        if (self.student_dir / "tokenizer.json").exists() or (self.student_dir / "spiece.model").exists():
            student_tokenizer = load_tokenizer(Source(source=str(self.student_dir)), "student")
            if tokenizer_fingerprint(student_tokenizer) != tokenizer_fingerprint(self.tokenizer):
                raise ModelLoadError(f"student {str(self.student_dir)!r}: its tokenizer differs from the teacher "
                                     f"{teacher_spec.name!r}'s; a student must use the teacher's tokenizer",
                                     field="student")
        width = pipeline_row(pipeline_spec).width
        out_dim = getattr(student_config, "project_out_dim", None)
        if out_dim is not None and width is not None and out_dim != width:
            raise ModelLoadError(f"student {str(self.student_dir)!r} projects to width {out_dim} but pipeline "
                                 f"{pipeline_spec.name!r} expects joint_attention_dim={width}", field="student")

        # 2. The frozen denoiser: no gradients, no optimizer state, eval mode.
        dtype = {"auto": "auto", "float32": "float32", "bfloat16": "bfloat16"}[config.denoiser_dtype]
        self.denoiser = Denoiser.load(pipeline_spec.model_copy(update={"dtype": dtype}), device=str(device))
        for component in self.denoiser.components.values():
            component.requires_grad_(False).eval()

        # 3. The teacher encoder, only when its embeddings are not cached.
        self.teacher_spec = teacher_spec
        self.teacher: TextEncoder | None = None
        if live_teacher:
            self.teacher = TextEncoder.load(teacher_spec, device=str(device))

        # 4. The student, in fp32 (the master weights), starting from the weights it was given.
        self.student = None
        if with_student:
            self.student = load_student(self.student_dir, width or self.denoiser.joint_attention_dim).to(device)

    @property
    def teacher_name(self) -> str:
        return self.teacher_spec.name

    def token_ids(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(prompts, padding="max_length", max_length=self.config.max_sequence_length,
                              truncation=True, return_tensors="pt").input_ids

    @torch.no_grad()
    def teacher_conditioning(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(teacher T5 embeddings, CLIP tokens or None, pooled CLIP) as the pipeline conditions on them."""
        if self.teacher is None:
            raise ConfigError("no live teacher: this run reads the teacher cache")
        t5 = self.teacher.encode(prompts).embeds.clone()  # out of inference mode: usable as a loss target
        clip, pooled = self.denoiser.clip_conditioning(prompts)
        return t5, clip, pooled


def load_student(path: Path, project_out_dim: int, device: torch.device | str = "cpu") -> torch.nn.Module:
    """On `device`: a student dir loads as is; so does a T5 encoder dir already of the teacher's width (a quantized
    teacher from `t2i models quantize`, say, evaluated like a student); a narrower plain T5 encoder dir is wrapped
    with a fresh projection (its weights kept)."""
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    quantized = getattr(config, "quantization_config", None) is not None
    try:
        if getattr(config, "project_out_dim", None) is not None:
            return T5EncoderWithProjection.from_pretrained(path, dtype=torch.float32, local_files_only=True,
                                                           **({"device_map": str(device)} if quantized else {}))
        if quantized or config.d_model == project_out_dim:
            return T5EncoderModel.from_pretrained(path, dtype=torch.float32, local_files_only=True,
                                                  device_map=str(device))
        t5 = T5EncoderModel.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"student {str(path)!r}: cannot load weights: {exc}", field="student") from exc
    return T5EncoderWithProjection.from_t5(t5, project_out_dim).to(device)


def student_spec(name: str, path: str | Path, max_sequence_length: int) -> EncoderSpec:
    return EncoderSpec(name=name, kind="student", source=str(path), max_sequence_length=max_sequence_length)
