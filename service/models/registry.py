"""The model registry: named pipeline and text-encoder specs read from one models file (YAML or TOML).

The CLI, the API and the trainer all read this one list. It imports no torch, so the API can use it.

A models file looks like::

    pipelines:
      flux:
        family: flux                  # flux | sd3
        source: ./pipelines/flux      # a local directory (relative to this file) or a Hub id
        revision: null                # Hub revision (commit, tag or branch)
        dtype: auto                   # auto | float32 | bfloat16 | float16
        device: auto                  # auto | cpu | cuda | cuda:N
    encoders:
      t5-xxl:
        kind: teacher                 # teacher | student
        source: ./encoders/t5-xxl
        max_sequence_length: 512
      t5-xxl-int8:                    # the same weights on disk, quantized as they load
        kind: teacher
        source: ./encoders/t5-xxl
        quantization: {method: int8-weight-only}   # one of QUANT_METHODS, with its options
    loras:                            # LoRA adapters, switched per request
      flux-style: {pipeline: flux, source: ./loras/flux-style, weight_name: pytorch_lora_weights.safetensors}
    controlnets:                      # ControlNets, chosen per request
      flux-canny: {pipeline: flux, source: ./controlnets/flux-canny, condition: canny, scale: 1.0}
    routes:                           # `encoder=auto`: an encoder per prompt (service.models.routing)
      auto:
        rules: [{name: written-text, text: true, encoder: t5-xxl-int8}]
        default: t5-base
        fallback: [t5-xxl-int8, t5-xxl]

See `models.example.yaml` for the real checkpoints.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError as PydanticValidationError, model_validator

from service.errors import ConfigError, UnknownNameError
from service.models.routing import RouteSpec

Dtype = Literal["auto", "float32", "bfloat16", "float16"]


class Source(BaseModel):
    """Where weights come from: a local directory or a Hub repository id (+ revision), optionally a subfolder."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str = Field(description="Local directory, or a Hub id such as `black-forest-labs/FLUX.1-dev`.")
    subfolder: str | None = Field(None, description="Subfolder inside the source (e.g. `text_encoder_2`).")
    revision: str | None = Field(None, description="Hub revision; ignored for a local directory.")

    @property
    def is_local(self) -> bool:
        return self.source.startswith(("/", ".", "~")) or Path(self.source).exists()

    def describe(self) -> str:
        where = self.source + (f" [{self.subfolder}]" if self.subfolder else "")
        if self.is_local:
            return f"local {where}"
        return f"hub {where}" + (f" @ {self.revision}" if self.revision else "")

    def hf_kwargs(self) -> dict:
        """Keyword arguments for `from_pretrained`."""
        kwargs: dict = {}
        if self.subfolder:
            kwargs["subfolder"] = self.subfolder
        if self.is_local:
            kwargs["local_files_only"] = True
        elif self.revision:
            kwargs["revision"] = self.revision
        return kwargs

    def check_local(self, what: str) -> None:
        """Refuse a local source whose directory is missing, naming it."""
        if not self.is_local:
            return
        path = Path(self.source).expanduser()
        if self.subfolder:
            path = path / self.subfolder
        if not path.is_dir():
            from service.errors import ModelLoadError

            raise ModelLoadError(f"{what}: weights directory {str(path)!r} does not exist", field=what)


class PipelineSpec(Source):
    name: str
    family: Literal["flux", "sd3"] = Field(description="Which diffusers pipeline class the weights belong to.")
    dtype: Dtype = "auto"
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    width: int = Field(1024, ge=8, le=4096, description="Default image width in pixels.")
    height: int = Field(1024, ge=8, le=4096, description="Default image height in pixels.")
    steps: int = Field(28, ge=1, le=200, description="Default number of denoising steps.")
    guidance: float = Field(3.5, ge=0.0, le=50.0, description="Default guidance scale.")
    true_cfg_scale: float = Field(
        1.0, ge=1.0, le=50.0, description="FLUX only: > 1 runs true classifier-free guidance against an empty prompt."
    )

    def check_request(self, prompt: str, negative_prompt: str | None) -> None:
        """Checks every entry point shares (the API before queueing, the generator before running)."""
        from service.errors import ValidationError

        if not prompt.strip():
            raise ValidationError("`prompt` is blank", field="prompt")
        if negative_prompt is not None and self.family != "sd3":
            raise ValidationError(
                f"`negative_prompt` is used by sd3 pipelines only; {self.name!r} is {self.family}",
                field="negative_prompt",
            )


class QuantMethod(BaseModel):
    """What one quantization method is built on, which options it takes, and where it has kernels."""

    model_config = ConfigDict(frozen=True)

    backend: Literal["torchao", "bitsandbytes"]
    bits: int
    options: dict[str, type] = Field(default_factory=dict)
    devices: tuple[str, ...] = ("cpu", "cuda")
    min_cuda_capability: tuple[int, int] | None = None


# Every method goes through transformers' own `quantization_config` (TorchAoConfig, BitsAndBytesConfig): nothing is
# quantized by hand here. `modules_to_not_convert` keeps the named modules (e.g. `wo`) in the model's dtype.
_COMMON = {"modules_to_not_convert": list}
QUANT_METHODS: dict[str, QuantMethod] = {
    "int8-weight-only": QuantMethod(backend="torchao", bits=8, options=_COMMON),
    "int8-dynamic": QuantMethod(backend="torchao", bits=8, options=_COMMON),
    "fp8-weight-only": QuantMethod(backend="torchao", bits=8, options=_COMMON, min_cuda_capability=(8, 9)),
    "int4-weight-only": QuantMethod(backend="torchao", bits=4, options={**_COMMON, "group_size": int},
                                    devices=("cuda",)),
    "bnb-int8": QuantMethod(backend="bitsandbytes", bits=8, options={**_COMMON, "threshold": float}),
    "bnb-nf4": QuantMethod(backend="bitsandbytes", bits=4,
                           options={**_COMMON, "compute_dtype": str, "double_quant": bool, "blocksize": int}),
}


# The teacher's quantized forms that the shipped kits register beside it (one copy of the weights on disk).
TEACHER_QUANTIZED = {"int8": "int8-weight-only", "fp8": "fp8-weight-only", "nf4": "bnb-nf4"}


def quantized_teacher_entries(teacher: str, body: dict) -> dict[str, dict]:
    """Models-file entries `TEACHER-int8`, `-fp8`, `-nf4`: the teacher's own entry with a `quantization`."""
    return {f"{teacher}-{suffix}": {**body, "quantization": {"method": method}}
            for suffix, method in TEACHER_QUANTIZED.items()}


def auto_route(teacher: str, student: str = "t5-base", second: str = "t5-large") -> dict[str, dict]:
    """The kits' `auto` route (models-file form): prompts that ask for written text to the teacher, the rest to the
    `student`; when the pick has no live worker, the teacher's int8 form, the teacher, the `second` student, then the
    `student` (quality first: a fallback never serves a prompt with a smaller encoder than the pick unless nothing
    bigger is live)."""
    return {"auto": {"rules": [{"name": "written-text", "text": True, "encoder": teacher}], "default": student,
                     "fallback": [f"{teacher}-int8", teacher, second, student]}}


class Quantization(BaseModel):
    """How an encoder's weights are quantized when it loads (or were, for a pre-quantized directory)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: str = Field(description=f"One of {', '.join(QUANT_METHODS)}.")
    options: dict = Field(default_factory=dict, description="Options of the method (see QUANT_METHODS).")

    @model_validator(mode="after")
    def _known(self) -> "Quantization":
        if self.method not in QUANT_METHODS:
            raise ValueError(f"unknown quantization method {self.method!r}; known: {', '.join(QUANT_METHODS)}")
        allowed = QUANT_METHODS[self.method].options
        for key, value in self.options.items():
            if key not in allowed:
                raise ValueError(f"method {self.method!r} takes no option {key!r}; its options: "
                                 f"{', '.join(allowed) or 'none'}")
            want = allowed[key]
            if not isinstance(value, want) or (want in (int, float) and isinstance(value, bool)):
                if not (want is float and isinstance(value, int) and not isinstance(value, bool)):
                    raise ValueError(f"option {key!r} of {self.method!r} must be {want.__name__}, got {value!r}")
        return self

    @property
    def spec(self) -> QuantMethod:
        return QUANT_METHODS[self.method]

    def describe(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return self.method + (f"({extra})" if extra else "")


class EncoderSpec(Source):
    name: str
    kind: Literal["teacher", "student"]
    dtype: Dtype = "auto"
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N; may differ from the denoiser's.")
    max_sequence_length: int = Field(512, ge=1, le=4096, description="Token ids are padded/truncated to this.")
    tokenizer: Source | None = Field(
        None, description="Where the tokenizer is, if not beside the weights (e.g. FLUX's `tokenizer_2`)."
    )
    cache_key: str | None = Field(
        None, max_length=200, description="Identity of the weights in the embedding cache. Default: the Hub commit, "
                                          "or a hash of the local weight files (read once at load)."
    )
    quantization: Quantization | None = Field(
        None, description="Quantize the weights at load (the same source may be registered under several names, "
                          "one per method, with one copy on disk); or describe a pre-quantized directory."
    )

    @property
    def tokenizer_source(self) -> Source:
        if self.tokenizer is not None:
            return self.tokenizer
        return Source(source=self.source, subfolder=self.subfolder, revision=self.revision)


class LoraSpec(Source):
    """A LoRA adapter for one pipeline, loaded with diffusers' `load_lora_weights` and switched per request."""

    name: str
    pipeline: str = Field(description="Registry name of the pipeline the adapter was trained for.")
    weight_name: str | None = Field(None, description="File inside the source, e.g. `pytorch_lora_weights.safetensors`.")
    scale: float = Field(1.0, ge=-4.0, le=4.0, description="Default scale when a request names no scale.")


class ControlNetSpec(Source):
    """A ControlNet for one pipeline: `FluxControlNetModel` (single or union) for flux, `SD3ControlNetModel` for sd3."""

    name: str
    pipeline: str = Field(description="Registry name of the pipeline the ControlNet was trained for.")
    condition: str = Field("canny", min_length=1, max_length=40,
                           description="What its control images are (canny, depth, pose, ...); `canny` makes the "
                                       "server run the canny preprocessor unless a request says `preprocess: none`.")
    modes: list[str] = Field(default_factory=list, max_length=32,
                             description="Union models only: the control modes in the model's index order "
                                         "(e.g. canny, tile, depth, blur, pose, gray, lq); a request names one.")
    scale: float = Field(1.0, ge=0.0, le=4.0, description="Default `controlnet_conditioning_scale`.")

    def mode_index(self, mode: str | None) -> int | None:
        """The index a union model needs for `mode`; None for a single-condition model."""
        from service.errors import ValidationError

        if not self.modes:
            if mode is not None:
                raise ValidationError(f"controlnet {self.name!r} is not a union model; `control.mode` must be unset",
                                      field="control.mode")
            return None
        if mode is None or mode not in self.modes:
            raise ValidationError(f"controlnet {self.name!r} needs `control.mode`, one of {self.modes} (got {mode!r})",
                                  field="control.mode")
        return self.modes.index(mode)


class ModelsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pipelines: dict[str, dict] = Field(default_factory=dict)
    encoders: dict[str, dict] = Field(default_factory=dict)
    loras: dict[str, dict] = Field(default_factory=dict)
    controlnets: dict[str, dict] = Field(default_factory=dict)
    routes: dict[str, dict] = Field(default_factory=dict)


class Registry(BaseModel):
    """All known pipelines and encoders, by name."""

    model_config = ConfigDict(frozen=True)

    pipelines: dict[str, PipelineSpec]
    encoders: dict[str, EncoderSpec]
    loras: dict[str, LoraSpec] = Field(default_factory=dict)
    controlnets: dict[str, ControlNetSpec] = Field(default_factory=dict)
    routes: dict[str, RouteSpec] = Field(default_factory=dict)
    path: Path | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "Registry":
        teachers = [e.name for e in self.encoders.values() if e.kind == "teacher" and e.quantization is None]
        if len(teachers) > 1:
            raise ValueError(f"encoders: at most one teacher (quantized forms of it aside), found {teachers}")
        for section, specs in (("loras", self.loras), ("controlnets", self.controlnets)):
            for spec in specs.values():
                if spec.pipeline not in self.pipelines:
                    raise ValueError(f"{section}.{spec.name}.pipeline: unknown pipeline {spec.pipeline!r}; known: "
                                     f"{', '.join(sorted(self.pipelines))}")
        for route in self.routes.values():
            if route.name in self.encoders:
                raise ValueError(f"routes.{route.name}: the route's name shadows the encoder {route.name!r}; "
                                 "name the route differently")
            for name in route.encoders:
                if name in self.routes:
                    raise ValueError(f"routes.{route.name}: names the route {name!r}; a route names encoders only "
                                     f"(a route of routes could form a cycle: {route.name} -> {name})")
                if name not in self.encoders:
                    raise ValueError(f"routes.{route.name}: unknown encoder {name!r}; known: "
                                     f"{', '.join(sorted(self.encoders))}")
        return self

    # -- lookups -----------------------------------------------------------------------------------------------
    def pipeline(self, name: str) -> PipelineSpec:
        if name not in self.pipelines:
            raise UnknownNameError("pipeline", name, list(self.pipelines))
        return self.pipelines[name]

    def encoder(self, name: str) -> EncoderSpec:
        if name not in self.encoders:
            raise UnknownNameError("encoder", name, list(self.encoders), routes=list(self.routes))
        return self.encoders[name]

    def route(self, name: str) -> RouteSpec | None:
        """The route of that name; None for an encoder's name; 422 listing encoders and routes otherwise."""
        if name in self.routes:
            return self.routes[name]
        self.encoder(name)
        return None

    def lora(self, name: str, pipeline: str) -> LoraSpec:
        """A LoRA by name, refused when it belongs to another pipeline."""
        from service.errors import ValidationError

        if name not in self.loras:
            raise UnknownNameError("lora", name, list(self.loras), field="loras")
        spec = self.loras[name]
        if spec.pipeline != pipeline:
            raise ValidationError(f"lora {name!r} is for pipeline {spec.pipeline!r}, not {pipeline!r}", field="loras")
        return spec

    def controlnet(self, name: str, pipeline: str) -> ControlNetSpec:
        """A ControlNet by name, refused when it belongs to another pipeline."""
        from service.errors import ValidationError

        if name not in self.controlnets:
            raise UnknownNameError("controlnet", name, list(self.controlnets), field="control.name")
        spec = self.controlnets[name]
        if spec.pipeline != pipeline:
            raise ValidationError(f"controlnet {name!r} is for pipeline {spec.pipeline!r}, not {pipeline!r}",
                                  field="control.name")
        return spec

    @property
    def teacher(self) -> EncoderSpec | None:
        """The reference encoder: the teacher as it was trained (its quantized forms are teachers too, not this)."""
        return next((e for e in self.encoders.values() if e.kind == "teacher" and e.quantization is None),
                    next((e for e in self.encoders.values() if e.kind == "teacher"), None))

    # -- loading -----------------------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path) -> "Registry":
        path = Path(path).expanduser()
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"models file {str(path)!r} cannot be read: {exc.strerror}", field="models_file")
        try:
            raw = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
        except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"models file {str(path)!r} is not valid {path.suffix[1:] or 'YAML'}: {exc}")
        return cls.from_dict(raw or {}, base_dir=path.parent, path=path)

    @classmethod
    def from_dict(cls, raw: dict, *, base_dir: Path, path: Path | None = None) -> "Registry":
        where = str(path) if path else "models file"
        prefix: tuple = ()
        try:
            parsed = ModelsFile.model_validate(raw)
            sections = (("pipelines", PipelineSpec), ("encoders", EncoderSpec), ("loras", LoraSpec),
                        ("controlnets", ControlNetSpec), ("routes", RouteSpec))
            specs: dict[str, dict] = {section: {} for section, _ in sections}
            for section, spec_cls in sections:
                for name, body in getattr(parsed, section).items():
                    prefix = (section, name)
                    specs[section][name] = spec_cls.model_validate(_resolve({**body, "name": name}, base_dir))
            prefix = ()
            return cls(**specs, path=path)
        except PydanticValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in prefix + tuple(first["loc"]))
            got = f" (got {first['input']!r})" if not isinstance(first.get("input"), dict) else ""
            raise ConfigError(f"{where}: {loc}: {first['msg']}{got}", field=loc) from None
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None


def _resolve(body: dict, base_dir: Path) -> dict:
    """Make relative local sources absolute against the models file's directory."""
    body = dict(body)
    for key in ("source",):
        value = body.get(key)
        if isinstance(value, str) and value.startswith("."):
            body[key] = str((base_dir / value).resolve())
    if isinstance(body.get("tokenizer"), dict):
        body["tokenizer"] = _resolve(body["tokenizer"], base_dir)
    elif isinstance(body.get("tokenizer"), str):
        body["tokenizer"] = _resolve({"source": body["tokenizer"]}, base_dir)
    return body


def with_absolute_sources(raw: dict, base_dir: Path) -> dict:
    """A models-file dict (as read from YAML) whose relative sources are made absolute against `base_dir`, so that it
    can be written anywhere; sections without sources (routes) are kept as they are."""
    return {section: {name: _resolve(body, base_dir) if isinstance(body, dict) and "source" in body else body
                      for name, body in (bodies or {}).items()}
            for section, bodies in raw.items()}


MINIATURE_KIT = Path(__file__).parent / "miniature" / "models.yaml"


def default_models_file() -> Path:
    """The models file in force: `T2I_MODELS_FILE`, else the miniature world's kit shipped with the package (trained
    models that draw what the prompt says), else the demo kit under `T2I_HOME` (random tiny models)."""
    from service.settings import get_settings

    settings = get_settings()
    if settings.models_file is not None:
        return settings.models_file
    if MINIATURE_KIT.exists():
        return MINIATURE_KIT
    return settings.demo_dir / "models.yaml"


def load_registry(models_file: Path | None = None) -> Registry:
    """The registry from `models_file`, or the default (see `default_models_file`)."""
    models_file = models_file or default_models_file()
    if not models_file.exists():
        raise ConfigError(
            f"models file {str(models_file)!r} does not exist; for the demo kit run `t2i models make-demo "
            f"{models_file.parent}` (the CLI and `t2i serve` do it for you)",
            field="models_file",
        )
    return Registry.from_file(models_file)
