"""The frozen denoiser's sampling trajectory, walked the way the FLUX and SD3 pipelines walk it.

Distillation needs the denoiser's prediction for a given noisy latent, timestep and text conditioning, and the next
latent along the teacher's path; this module gives both, for either family, with diffusers' own scheduler and the
pipelines' own latent packing.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline, calculate_shift

from service.models.denoiser import Denoiser


class Trajectory:
    def __init__(self, denoiser: Denoiser, steps: int, resolution: int):
        self.denoiser = denoiser
        self.family = denoiser.family
        self.steps = steps
        self.resolution = resolution
        pipe = denoiser.pipe
        denoiser.check_size(resolution, resolution)
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        if self.family == "flux":
            side = 2 * (resolution // (pipe.vae_scale_factor * 2))
            self.latent_shape = (pipe.transformer.config.in_channels // 4, side, side)
            seq_len = (side // 2) ** 2
            mu = calculate_shift(
                seq_len,
                scheduler.config.get("base_image_seq_len", 256),
                scheduler.config.get("max_image_seq_len", 4096),
                scheduler.config.get("base_shift", 0.5),
                scheduler.config.get("max_shift", 1.15),
            )
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu, device="cpu")
            self.img_ids = FluxPipeline._prepare_latent_image_ids(1, side // 2, side // 2, denoiser.device,
                                                                  denoiser.dtype)
        else:
            side = resolution // pipe.vae_scale_factor
            self.latent_shape = (pipe.transformer.config.in_channels, side, side)
            scheduler.set_timesteps(steps, device="cpu")
        self.sigmas = scheduler.sigmas.to(torch.float32)  # steps + 1 values, the last one 0
        self.timesteps = scheduler.timesteps.to(torch.float32)

    def noise(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """Initial latents (packed for FLUX), from a CPU generator: the same noise on any device and world size."""
        latents = torch.randn((batch_size, *self.latent_shape), generator=generator, dtype=torch.float32)
        if self.family == "flux":
            c, h, w = self.latent_shape
            latents = FluxPipeline._pack_latents(latents, batch_size, c, h, w)
        return latents.to(self.denoiser.device)

    def predict(self, latents: torch.Tensor, step: int, encoder_hidden_states: torch.Tensor, pooled: torch.Tensor,
                guidance: float) -> torch.Tensor:
        """The denoiser's prediction (flow velocity) at trajectory step `step`. Differentiable in the embeddings."""
        transformer = self.denoiser.pipe.transformer
        batch = latents.shape[0]
        dtype = self.denoiser.dtype
        t = self.timesteps[step].to(self.denoiser.device).expand(batch)
        if self.family == "flux":
            guidance_tensor = None
            if transformer.config.guidance_embeds:
                guidance_tensor = torch.full((batch,), guidance, device=self.denoiser.device, dtype=torch.float32)
            txt_ids = torch.zeros(encoder_hidden_states.shape[1], 3, device=self.denoiser.device, dtype=dtype)
            return transformer(
                hidden_states=latents.to(dtype), timestep=t / 1000, guidance=guidance_tensor,
                pooled_projections=pooled.to(dtype), encoder_hidden_states=encoder_hidden_states.to(dtype),
                txt_ids=txt_ids, img_ids=self.img_ids, return_dict=False,
            )[0]
        return transformer(
            hidden_states=latents.to(dtype), timestep=t, encoder_hidden_states=encoder_hidden_states.to(dtype),
            pooled_projections=pooled.to(dtype), return_dict=False,
        )[0]

    def advance(self, latents: torch.Tensor, step: int, velocity: torch.Tensor) -> torch.Tensor:
        """One Euler step along the path (what FlowMatchEulerDiscreteScheduler.step does), in fp32."""
        delta = (self.sigmas[step + 1] - self.sigmas[step]).item()
        return latents + delta * velocity.to(torch.float32)
