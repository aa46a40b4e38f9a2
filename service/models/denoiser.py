"""The denoiser side of a pipeline: transformer, VAE, CLIP encoders and scheduler, with the T5 slot left empty.

It is assembled once per worker with the stock diffusers pipeline class (`FluxPipeline`,
`StableDiffusion3Pipeline`) and is handed T5 embeddings computed elsewhere, so any encoder whose output width equals
the transformer's `joint_attention_dim` can drive it.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import (
    DiffusionPipeline,
    FluxControlNetModel,
    FluxControlNetPipeline,
    FluxPipeline,
    SD3ControlNetModel,
    StableDiffusion3ControlNetPipeline,
    StableDiffusion3Pipeline,
)

from service.errors import ModelLoadError, ValidationError
from service.models.devices import module_bytes, module_params, resolve_device, resolve_dtype
from service.models.registry import ControlNetSpec, LoraSpec, PipelineSpec

# family -> (pipeline class, the keyword of its T5 slot(s) to leave empty)
FAMILIES: dict[str, tuple[type[DiffusionPipeline], dict[str, None]]] = {
    "flux": (FluxPipeline, {"text_encoder_2": None, "tokenizer_2": None}),
    "sd3": (StableDiffusion3Pipeline, {"text_encoder_3": None, "tokenizer_3": None}),
}
# family -> (ControlNet model class, the ControlNet pipeline built from the same components)
CONTROL_FAMILIES: dict[str, tuple[type[torch.nn.Module], type[DiffusionPipeline]]] = {
    "flux": (FluxControlNetModel, FluxControlNetPipeline),
    "sd3": (SD3ControlNetModel, StableDiffusion3ControlNetPipeline),
}


class Denoiser:
    def __init__(self, spec: PipelineSpec, pipe: DiffusionPipeline):
        self.spec = spec
        self.pipe = pipe
        self.loaded_loras: set[str] = set()
        self.active_loras: tuple[tuple[str, float], ...] = ()
        self.control_pipes: dict[str, DiffusionPipeline] = {}
        # Where and in what dtype the denoiser runs: read once (the module walk behind `.device` costs per job).
        self.device: torch.device = pipe.transformer.device
        self.dtype: torch.dtype = pipe.transformer.dtype
        self._sizes: tuple[int, int] | None = None  # (params, bytes), counted on first use and after a LoRA loads

    @classmethod
    def load(cls, spec: PipelineSpec, *, device: str | None = None) -> "Denoiser":
        what = f"pipeline {spec.name!r}"
        torch_device = resolve_device(device or spec.device)
        dtype = resolve_dtype(spec.dtype, torch_device)
        pipeline_cls, empty_t5 = FAMILIES[spec.family]
        spec.check_local(what)
        try:
            pipe = pipeline_cls.from_pretrained(spec.source, dtype=dtype, **empty_t5, **spec.hf_kwargs())
        except Exception as exc:  # missing components, corrupt weights, a repo of another family
            raise ModelLoadError(f"{what}: cannot load {spec.describe()}: {exc}", field=what) from exc
        pipe.to(torch_device)
        pipe.set_progress_bar_config(disable=True)
        return cls(spec, pipe)

    # -- facts -------------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def joint_attention_dim(self) -> int:
        return self.pipe.transformer.config.joint_attention_dim

    @property
    def size_multiple(self) -> int:
        """Width and height must be multiples of this (FLUX packs 2x2 latents; SD3 patches them)."""
        if self.family == "flux":
            return self.pipe.vae_scale_factor * 2
        return self.pipe.vae_scale_factor * self.pipe.transformer.config.patch_size

    @property
    def components(self) -> dict[str, torch.nn.Module]:
        return {k: v for k, v in self.pipe.components.items() if isinstance(v, torch.nn.Module)}

    def _count(self) -> tuple[int, int]:
        if self._sizes is None:
            components = self.components.values()
            self._sizes = (sum(module_params(m) for m in components), sum(module_bytes(m) for m in components))
        return self._sizes

    @property
    def num_params(self) -> int:
        return self._count()[0]

    @property
    def num_bytes(self) -> int:
        return self._count()[1]

    # -- checks ------------------------------------------------------------------------------------------------
    def check_encoder_width(self, encoder_name: str, width: int) -> None:
        if width != self.joint_attention_dim:
            raise ModelLoadError(
                f"encoder {encoder_name!r} outputs width {width} but pipeline {self.name!r} expects "
                f"joint_attention_dim={self.joint_attention_dim}",
                field="encoder",
            )

    def check_size(self, width: int, height: int) -> None:
        m = self.size_multiple
        for field, value in (("width", width), ("height", height)):
            if value % m:
                raise ValidationError(
                    f"`{field}`={value} is not a multiple of {m}, which pipeline {self.name!r} needs", field=field
                )

    # -- adapters ----------------------------------------------------------------------------------------------
    def use_loras(self, loras: list[tuple[LoraSpec, float]]) -> float:
        """Make exactly these LoRA adapters active at these scales (none: every adapter off), with diffusers' own
        adapter API: each is loaded once (`load_lora_weights`), then switched by `set_adapters` / `disable_lora`,
        never fused, so nothing leaks into the next job. Returns the seconds the switch took (0 when unchanged)."""
        wanted = tuple((spec.name, float(scale)) for spec, scale in loras)
        if wanted == self.active_loras:
            return 0.0
        start = time.perf_counter()
        for spec, _ in loras:
            if spec.name in self.loaded_loras:
                continue
            spec.check_local(f"lora {spec.name!r}")
            kwargs = spec.hf_kwargs()
            if spec.weight_name:
                kwargs["weight_name"] = spec.weight_name
            try:
                self.pipe.load_lora_weights(spec.source, adapter_name=spec.name, **kwargs)
            except Exception as exc:  # missing file, weights for another architecture
                raise ModelLoadError(f"lora {spec.name!r}: cannot load {spec.describe()}: {exc}", field="loras") from exc
            self.loaded_loras.add(spec.name)
            self._sizes = None  # the adapter's weights now count
        if wanted:
            self.pipe.enable_lora()
            self.pipe.set_adapters([name for name, _ in wanted], adapter_weights=[scale for _, scale in wanted])
        else:
            self.pipe.disable_lora()
        self.active_loras = wanted
        return time.perf_counter() - start

    def control_pipe(self, spec: ControlNetSpec) -> DiffusionPipeline:
        """The diffusers ControlNet pipeline for this ControlNet, sharing every component (and so the active LoRA
        adapters) with the plain pipeline: only the ControlNet's own weights are loaded, once."""
        if spec.name not in self.control_pipes:
            model_cls, pipeline_cls = CONTROL_FAMILIES[self.family]
            what = f"controlnet {spec.name!r}"
            spec.check_local(what)
            try:
                controlnet = model_cls.from_pretrained(spec.source, dtype=self.dtype, **spec.hf_kwargs())
            except Exception as exc:  # missing files, weights of another family
                raise ModelLoadError(f"{what}: cannot load {spec.describe()}: {exc}", field="control.name") from exc
            pipe = pipeline_cls.from_pipe(self.pipe, controlnet=controlnet.to(self.device))
            pipe.set_progress_bar_config(disable=True)
            self.control_pipes[spec.name] = pipe
        return self.control_pipes[spec.name]

    @property
    def controlnet_bytes(self) -> int:
        return sum(module_bytes(p.controlnet) for p in self.control_pipes.values())

    # -- conditioning ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def conditioning(
        self, prompts: list[str], t5_embeds: torch.Tensor, negative: tuple[list[str], torch.Tensor] | None = None
    ) -> dict[str, Any]:
        """The pipeline keywords (`prompt_embeds`, `pooled_prompt_embeds`, negatives for SD3) for these prompts.

        The CLIP half is computed by the pipeline's own CLIP helpers, the T5 half is given, and they are joined the
        way the pipeline's `encode_prompt` joins them, so the result equals the stock route bit for bit.
        """
        clip_tokens, pooled = self.clip_conditioning(prompts)
        kwargs = {"prompt_embeds": self.join(clip_tokens, t5_embeds), "pooled_prompt_embeds": pooled}
        if negative is not None:  # SD3's CFG, or FLUX's true CFG
            neg_tokens, neg_pooled = self.clip_conditioning(negative[0])
            kwargs.update(negative_prompt_embeds=self.join(neg_tokens, negative[1]),
                          negative_pooled_prompt_embeds=neg_pooled)
        return kwargs

    def clip_conditioning(self, prompts: list[str]) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(per-token CLIP embeddings or None, pooled CLIP vector). FLUX uses only the pooled CLIP-L vector; SD3
        also prepends both CLIPs' penultimate hidden states to the T5 tokens."""
        if self.family == "flux":
            return None, self.pipe._get_clip_prompt_embeds(prompts, num_images_per_prompt=1, device=self.device)
        clip_l, pooled_l = self.pipe._get_clip_prompt_embeds(prompts, device=self.device, clip_model_index=0)
        clip_g, pooled_g = self.pipe._get_clip_prompt_embeds(prompts, device=self.device, clip_model_index=1)
        return torch.cat([clip_l, clip_g], dim=-1), torch.cat([pooled_l, pooled_g], dim=-1)

    def join(self, clip_tokens: torch.Tensor | None, t5_embeds: torch.Tensor) -> torch.Tensor:
        """The transformer's `encoder_hidden_states`: the T5 tokens (FLUX), or CLIP tokens padded to the T5 width
        followed by the T5 tokens (SD3). Differentiable in `t5_embeds`, for distillation."""
        t5_embeds = t5_embeds.to(self.device, self.dtype)
        if clip_tokens is None:
            return t5_embeds
        clip_tokens = F.pad(clip_tokens.to(self.device, self.dtype), (0, t5_embeds.shape[-1] - clip_tokens.shape[-1]))
        return torch.cat([clip_tokens, t5_embeds], dim=-2)
