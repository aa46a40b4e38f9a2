"""Parameter counts and bytes without allocating: architectures are instantiated on the meta device.

Covers the real-size references (T5 v1.1 small/base/large/xl/xxl, each also as a student with a projection to 4096;
the FLUX.1 and SD3 transformers) and whatever a models file registers, read from its config files alone.

    t2i models sizes        # the reference table
    t2i models list         # the registry, with the same counts
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate import init_empty_weights
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from transformers import AutoConfig, T5Config, T5EncoderModel

from service.models.devices import DTYPES, module_params, resolve_device, resolve_dtype
from service.models.registry import QUANT_METHODS, EncoderSpec, PipelineSpec, Quantization
from service.models.student import T5EncoderWithProjection

# google/t5-v1_1-* (FLUX and SD3 ship the XXL encoder); the paper's students are FLAN-T5, the same architecture.
T5_SIZES: dict[str, dict] = {
    "t5-small": dict(d_model=512, d_ff=1024, num_layers=8, num_heads=6),
    "t5-base": dict(d_model=768, d_ff=2048, num_layers=12, num_heads=12),
    "t5-large": dict(d_model=1024, d_ff=2816, num_layers=24, num_heads=16),
    "t5-xl": dict(d_model=2048, d_ff=5120, num_layers=24, num_heads=32),
    "t5-xxl": dict(d_model=4096, d_ff=10240, num_layers=24, num_heads=64),
}
TEACHER_WIDTH = 4096

TRANSFORMERS: dict[str, tuple[type, dict]] = {
    "flux.1": (FluxTransformer2DModel, dict(guidance_embeds=True)),  # FLUX.1-dev; schnell has no guidance embedder
    "sd3-medium": (
        SD3Transformer2DModel,
        dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
             num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
             pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192),
    ),
    "sd3.5-large": (
        SD3Transformer2DModel,
        dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
             num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
             pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm"),
    ),
}


def t5_config(size: str, *, project_out_dim: int | None = None) -> T5Config:
    config = T5Config(
        vocab_size=32128, d_kv=64, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
        tie_word_embeddings=False, **T5_SIZES[size],
    )
    if project_out_dim is not None:
        config.project_in_dim = config.d_model
        config.project_out_dim = project_out_dim
    return config


def build_t5(config: T5Config) -> torch.nn.Module:
    """The encoder class a config describes (a student when it carries a projection)."""
    if getattr(config, "project_out_dim", None):
        return T5EncoderWithProjection(config)
    return T5EncoderModel(config)


def meta_params(build: Callable[[], torch.nn.Module]) -> int:
    with init_empty_weights(include_buffers=True):
        return module_params(build())


@dataclass(frozen=True)
class SizeRow:
    name: str
    params: int | None
    bytes: int | None
    width: int | None
    device: str
    dtype: str
    source: str
    note: str = ""
    quantization: str | None = None


def reference_rows() -> list[SizeRow]:
    rows = []
    for size in T5_SIZES:
        for out in (None, TEACHER_WIDTH):
            config = t5_config(size, project_out_dim=out)
            n = meta_params(lambda: build_t5(config))
            name = size if out is None else f"{size}+proj{out}"
            rows.append(SizeRow(name, n, 2 * n, out or config.d_model, "-", "bfloat16", "reference config"))
    xxl = t5_config("t5-xxl")
    for method in QUANT_METHODS:  # T5-XXL as users quantize it, sized on the meta device (nothing allocated)
        n, nbytes = meta_size(xxl, Quantization(method=method), torch.bfloat16)
        rows.append(SizeRow("t5-xxl", n, nbytes, TEACHER_WIDTH, "-", "bfloat16", "reference config",
                            quantization=method))
    for name, (cls, kwargs) in TRANSFORMERS.items():
        n = meta_params(lambda: cls(**kwargs))
        rows.append(SizeRow(name, n, 2 * n, kwargs.get("joint_attention_dim", 4096), "-", "bfloat16",
                            "reference config"))
    return rows


def _element_size(dtype_name: str, device_name: str) -> tuple[str, int, str]:
    try:
        device = resolve_device(device_name)
    except Exception:
        device = torch.device("cpu")
    dtype = resolve_dtype(dtype_name, device)
    return str(dtype).removeprefix("torch."), torch.empty((), dtype=dtype).element_size(), str(device)


def meta_size(config: T5Config, quant: Quantization | None, dtype: torch.dtype) -> tuple[int, int]:
    """(parameters, bytes in memory) of an encoder under a quantization method, from its config alone."""
    from service.models.quantization import estimate_bytes

    with init_empty_weights(include_buffers=True):
        model = build_t5(config)
    return module_params(model), estimate_bytes(model, quant, dtype)


def encoder_row(spec: EncoderSpec) -> SizeRow:
    dtype, _elem, device = _element_size(spec.dtype, spec.device)
    quant = spec.quantization
    try:
        from service.models.quantization import detect

        config = AutoConfig.from_pretrained(spec.source, **spec.hf_kwargs())
        quant = quant or detect(config)
        n, nbytes = meta_size(config, quant, DTYPES[dtype])
        width = getattr(config, "project_out_dim", None) or config.d_model
        return SizeRow(spec.name, n, nbytes, width, device, dtype, spec.describe(), spec.kind,
                       quant.describe() if quant else None)
    except Exception as exc:  # not downloaded yet, or not readable: say so instead of failing the whole list
        return SizeRow(spec.name, None, None, None, device, dtype, spec.describe(), f"{spec.kind}; {exc}"[:120],
                       quant.describe() if quant else None)


def pipeline_row(spec: PipelineSpec) -> SizeRow:
    """The transformer, the VAE and the CLIP encoders (the T5 is counted with the encoders)."""
    from service.models.denoiser import FAMILIES

    dtype, elem, device = _element_size(spec.dtype, spec.device)
    pipeline_cls, empty_t5 = FAMILIES[spec.family]
    try:
        index = pipeline_cls.load_config(spec.source, **spec.hf_kwargs())
        total, width = 0, None
        for component, (library, class_name) in ((k, v) for k, v in index.items() if isinstance(v, list)):
            if component in empty_t5 or library is None or component.startswith(("tokenizer", "scheduler")):
                continue
            cls = getattr(importlib.import_module(library), class_name)
            kwargs = {**spec.hf_kwargs(), "subfolder": component}
            if library == "transformers":
                config = AutoConfig.from_pretrained(spec.source, **kwargs)
                total += meta_params(lambda: cls(config))
            else:
                config = cls.load_config(spec.source, **kwargs)
                total += meta_params(lambda: cls.from_config(config))
                if component == "transformer":
                    width = config.get("joint_attention_dim")
        return SizeRow(spec.name, total, total * elem, width, device, dtype, spec.describe(), spec.family)
    except Exception as exc:
        return SizeRow(spec.name, None, None, None, device, dtype, spec.describe(), f"{spec.family}; {exc}"[:120])
