"""Text-to-image generation with a T5 encoder chosen per call.

The denoiser of each pipeline is assembled once and kept; encoders load on first use; prompt embeddings go through
the embedding cache when one is given. `Generator.generate_batch` is the one long function, written as numbered steps
(`generate` is a batch of one). Run it from the CLI:

    t2i generate --pipeline flux --encoder t5-base --prompt "a red fox in snow" --seed 7 -o fox.png   # CPU or GPU
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from diffusers import FluxPipeline
from PIL import Image

from service.errors import CancelledError, ModelLoadError, ValidationError
from service.models import control as control_images
from service.models.denoiser import Denoiser
from service.models.embedding_cache import EmbeddingCache, Entry
from service.models.encoder import TextEncoder, load_tokenizer, tokenizer_fingerprint
from service.models.encoder_pool import EncoderPool
from service.models.registry import Registry

MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class ControlInput:
    """A ControlNet for one call: a registered name and the control image, before preprocessing."""

    name: str
    image: Image.Image
    mode: str | None = None  # union ControlNets only
    preprocess: control_images.Preprocess = "auto"
    canny_low: int = control_images.CANNY_LOW
    canny_high: int = control_images.CANNY_HIGH
    scale: float | None = None  # None: the registered default
    start: float = 0.0
    end: float = 1.0


@dataclass(frozen=True)
class GenerationRequest:
    """One call. Fields left None take the pipeline's defaults from the models file."""

    prompt: str
    pipeline: str
    encoder: str
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    negative_prompt: str | None = None
    num_images: int = 1
    loras: tuple[tuple[str, float | None], ...] = ()  # (registered LoRA name, scale or None for its default)
    control: ControlInput | None = None


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seed: int
    timings: dict[str, float]  # seconds: adapters (LoRA switch, ControlNet load), encode (T5), clip, control
    # (preprocessing), denoise, decode
    warnings: list[str] = field(default_factory=list)
    embedding: torch.Tensor | None = None  # the prompt's T5 embeddings over its real tokens, (tokens, width), CPU
    batch_size: int = 1  # requests denoised together in the call that made this result


StepCallback = Callable[[int, int], None]  # (steps done, steps in all)


class Generator:
    """Holds the denoisers and encoders of one process. Not thread-safe: one generation at a time."""

    def __init__(
        self,
        registry: Registry,
        *,
        device: str | None = None,
        encoder_device: str | None = None,
        encoders: EncoderPool | None = None,
        embedding_cache: EmbeddingCache | None = None,
    ):
        self.registry = registry
        self.device = device
        self.encoder_device = encoder_device
        self.denoisers: dict[str, Denoiser] = {}
        self.encoders = encoders if encoders is not None else EncoderPool()
        self.embedding_cache = embedding_cache
        self._teacher_fingerprint: str | None = None

    # -- components --------------------------------------------------------------------------------------------
    def denoiser(self, name: str) -> Denoiser:
        if name not in self.denoisers:
            self.denoisers[name] = Denoiser.load(self.registry.pipeline(name), device=self.device)
        return self.denoisers[name]

    def encoder(self, name: str) -> TextEncoder:
        spec = self.registry.encoder(name)

        def load() -> TextEncoder:
            encoder = TextEncoder.load(spec, device=self.encoder_device)
            self.check_tokenizer(encoder)
            return encoder

        return self.encoders.get(name, load)

    def check_tokenizer(self, encoder: TextEncoder) -> None:
        """A student must tokenize exactly as the teacher does: the distillation compared per-token embeddings."""
        teacher = self.registry.teacher
        if teacher is None or encoder.spec.kind == "teacher":
            return
        if self._teacher_fingerprint is None:
            tokenizer = load_tokenizer(teacher.tokenizer_source, f"encoder {teacher.name!r}")
            self._teacher_fingerprint = tokenizer_fingerprint(tokenizer)
        if encoder.fingerprint != self._teacher_fingerprint:
            raise ModelLoadError(
                f"encoder {encoder.name!r}: its tokenizer differs from the teacher {teacher.name!r}'s "
                f"(fingerprint {encoder.fingerprint} vs {self._teacher_fingerprint}); a student must use the "
                "teacher's tokenizer",
                field="encoder",
            )

    def load(self, pipeline: str, encoder: str) -> tuple[Denoiser, TextEncoder]:
        """Both components, checked to fit together (the check happens at load time, not deep inside a matmul)."""
        denoiser, text_encoder = self.denoiser(pipeline), self.encoder(encoder)
        denoiser.check_encoder_width(text_encoder.name, text_encoder.output_width)
        return denoiser, text_encoder

    # -- generation --------------------------------------------------------------------------------------------
    def generate(
        self,
        request: GenerationRequest,
        *,
        on_step: StepCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        return self.generate_batch([request], on_step=on_step, should_stop=should_stop)[0]

    def generate_batch(
        self,
        requests: list[GenerationRequest],
        *,
        on_step: StepCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[GenerationResult]:
        """Requests with equal `batch_key`s in one denoising call. Each keeps its own seed, drawn by the pipeline's
        own `prepare_latents` exactly as for a call of its own, so each image equals its unbatched image (up to the
        rounding of batched kernels). One request is a batch of one: there is a single code path."""
        timings: dict[str, float] = {}
        warnings: list[list[str]] = [[] for _ in requests]

        # 1. Check inputs and fill defaults from the pipeline's spec; every request shares one batch key.
        request = requests[0]
        spec = self.registry.pipeline(request.pipeline)
        self.registry.encoder(request.encoder)
        width, height = request.width or spec.width, request.height or spec.height
        steps = request.steps or spec.steps
        guidance = spec.guidance if request.guidance is None else request.guidance
        seeds = [secrets.randbelow(MAX_SEED) if r.seed is None else r.seed for r in requests]
        for r in requests:
            spec.check_request(r.prompt, r.negative_prompt)
            if not 1 <= r.num_images <= 16:
                raise ValidationError(f"`num_images`={r.num_images} is out of range [1, 16]", field="num_images")
            if batch_key(r) != batch_key(request):
                raise ValueError(f"requests of one batch must share a batch key: {batch_key(r)} != "
                                 f"{batch_key(request)}")
        if request.control is not None and len(requests) > 1:
            raise ValueError("requests with a control image run one at a time")

        # 2. Components: the denoiser (kept) and the chosen encoder (loaded on first use), checked to fit; then
        #    exactly the requested LoRA adapters active on the denoiser, and the ControlNet pipeline if one is asked
        #    for (it shares the denoiser's components).
        loras = [(self.registry.lora(name, spec.name), scale) for name, scale in request.loras]
        control = request.control
        control_spec = self.registry.controlnet(control.name, spec.name) if control else None
        control_mode = control_spec.mode_index(control.mode) if control else None
        if control and not 0.0 <= control.start < control.end <= 1.0:
            raise ValidationError(f"control `start`={control.start} and `end`={control.end} must satisfy "
                                  "0 <= start < end <= 1", field="control.start")
        denoiser, encoder = self.load(request.pipeline, request.encoder)
        denoiser.check_size(width, height)
        timings["adapters"] = denoiser.use_loras(
            [(lora, lora.scale if scale is None else scale) for lora, scale in loras]
        )
        pipe = denoiser.pipe
        if control_spec is not None:
            start = time.perf_counter()
            pipe = denoiser.control_pipe(control_spec)
            timings["adapters"] += time.perf_counter() - start

        # 3. Encode the prompts with the chosen T5 encoder (and the negative prompts when SD3 uses CFG, or FLUX true
        #    CFG), through the embedding cache when there is one: a hit skips the encoder.
        start = time.perf_counter()
        true_cfg = spec.family == "flux" and spec.true_cfg_scale > 1.0
        use_negative = (spec.family == "sd3" and guidance > 1.0) or true_cfg
        prompts = [r.prompt for r in requests]
        negatives = [r.negative_prompt or "" for r in requests] if use_negative else []
        entries = self.encode(encoder, prompts + negatives)
        embeds = torch.stack([e.embeds for e in entries]).to(encoder.device)
        timings["encode"] = time.perf_counter() - start
        for i, entry in enumerate(entries[: len(requests)]):
            if entry.truncated:
                warnings[i].append(f"prompt truncated to max_sequence_length={encoder.spec.max_sequence_length} "
                                   f"tokens of encoder {encoder.name!r}")

        # 4. Join with the pipeline's CLIP conditioning; one copy per image.
        start = time.perf_counter()
        n = len(requests)
        negative = (negatives, embeds[n:]) if use_negative else None
        cond = denoiser.conditioning(prompts, embeds[:n], negative)
        extra = {"true_cfg_scale": spec.true_cfg_scale} if true_cfg else {}
        cond = {k: v.repeat_interleave(request.num_images, dim=0) for k, v in cond.items()}
        timings["clip"] = time.perf_counter() - start

        # 5. The control image, preprocessed as the ControlNet expects (canny edges, or a given map as is); the
        #    pipeline resizes it to the output size. Its pipeline draws from the seed's generator itself.
        noise = torch.Generator(device="cpu").manual_seed(seeds[0])  # CPU noise: the same image on any device
        if control is not None:
            start = time.perf_counter()
            extra.update(
                generator=noise,
                control_image=control_images.prepare(control.image, control.preprocess, control_spec.condition,
                                                     low=control.canny_low, high=control.canny_high),
                controlnet_conditioning_scale=control_spec.scale if control.scale is None else control.scale,
                control_guidance_start=control.start, control_guidance_end=control.end,
            )
            if control_mode is not None:
                extra["control_mode"] = control_mode
            timings["control"] = time.perf_counter() - start
        else:
            # 6. The initial noise of each request from its own seed, by the pipeline's own `prepare_latents`
            #    (as the pipeline would draw it for that request alone), stacked. Timed with denoising, as the
            #    stock pipeline draws it inside its call.
            noise_start = time.perf_counter()
            extra["latents"] = torch.cat([
                initial_latents(pipe, request.num_images, height, width, cond["prompt_embeds"].dtype, denoiser.device,
                                torch.Generator(device="cpu").manual_seed(seed))
                for seed in seeds])

        # 7. Denoise with the stock pipeline. The step callback reports progress, honours cancellation at the next
        #    step, and marks where denoising ends so that decoding is timed apart.
        marks = {"start": time.perf_counter() if control is not None else noise_start}

        def step_end(pipe, step_index, timestep, callback_kwargs):
            marks["last_step"] = time.perf_counter()
            if on_step is not None:
                on_step(step_index + 1, steps)
            if should_stop is not None and should_stop():
                raise CancelledError(f"job cancelled at denoising step {step_index + 1} of {steps}")
            return callback_kwargs

        output = pipe(
            **cond,
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=guidance,
            num_images_per_prompt=1,
            max_sequence_length=encoder.spec.max_sequence_length,
            callback_on_step_end=step_end,
            output_type="pil",
            **extra,
        )
        end = time.perf_counter()

        # 8. Timings (the batch's, for each of its requests): denoise up to the last step, decode after it; the
        #    images and prompt embeddings back to their requests.
        timings["denoise"] = marks.get("last_step", end) - marks["start"]
        timings["decode"] = end - marks.get("last_step", end)
        k = request.num_images
        return [
            GenerationResult(images=list(output.images[i * k:(i + 1) * k]), seed=seeds[i], timings=dict(timings),
                             warnings=warnings[i], embedding=entries[i].embeds[: entries[i].length].float(),
                             batch_size=n)
            for i in range(n)
        ]

    def encode(self, encoder: TextEncoder, prompts: list[str]) -> list[Entry]:
        """Per prompt: its embeddings (on the CPU), token count and truncation, from the cache or the encoder."""
        keys = [EmbeddingCache.key(encoder.identity, encoder.dtype, encoder.spec.max_sequence_length, p)
                for p in prompts]
        entries = (self.embedding_cache.get_many(encoder.name, keys) if self.embedding_cache is not None
                   else [None] * len(prompts))
        missing = [i for i, e in enumerate(entries) if e is None]
        unique = list(dict.fromkeys(prompts[i] for i in missing))
        if unique:
            encoded = encoder.encode(unique)
            fresh = {p: Entry(encoded.embeds[j].cpu(), encoded.lengths[j], encoded.truncated[j])
                     for j, p in enumerate(unique)}
            for i in missing:
                entries[i] = fresh[prompts[i]]
            if self.embedding_cache is not None:
                for p, entry in fresh.items():
                    self.embedding_cache.put(keys[prompts.index(p)], entry)
        return entries


def batch_key(request: GenerationRequest) -> tuple:
    """Requests with equal keys can share one denoising call."""
    control = None
    if request.control is not None:
        control = id(request.control)  # a control image is never shared: such requests run alone
    return (request.pipeline, request.encoder, request.width, request.height, request.steps, request.guidance,
            request.num_images, tuple(request.loras), request.negative_prompt is not None, control)


def initial_latents(pipe, num_images: int, height: int, width: int, dtype: torch.dtype, device: torch.device,
                    generator: torch.Generator) -> torch.Tensor:
    """The noise the pipeline would draw for one call of `num_images` images: its own `prepare_latents`."""
    if isinstance(pipe, FluxPipeline):
        channels = pipe.transformer.config.in_channels // 4
        latents, _ids = pipe.prepare_latents(num_images, channels, height, width, dtype, device, generator)
        return latents
    return pipe.prepare_latents(num_images, pipe.transformer.config.in_channels, height, width, dtype, device,
                                generator)
