"""A T5 text encoder (the teacher or a student) with its tokenizer, loaded from a registry spec.

Encoding happens here, outside any diffusers pipeline, exactly as the pipelines do it (ids padded to
`max_sequence_length`, no attention mask), so that the result can be cached, computed on another device than the
denoiser, and swapped per request. Prompts longer than `max_sequence_length` tokens are truncated, as the stock
pipelines do, and the truncation is reported back (a warning in the log and in the job result), never silent.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase, T5EncoderModel

from service.errors import ModelLoadError
from service.models.devices import resolve_device, resolve_dtype
from service.models.quantization import check_backend, check_device, check_shapes, detect, hf_config, state_bytes
from service.models.registry import EncoderSpec, Quantization, Source
from service.models.sizes import build_t5, meta_params
from service.models.student import T5EncoderWithProjection

log = logging.getLogger(__name__)


@dataclass
class Encoded:
    """Per-token embeddings `(batch, max_sequence_length, width)`; per prompt, whether it was truncated and how many
    of its tokens are real (the rest is padding)."""

    embeds: torch.Tensor
    truncated: list[bool]
    lengths: list[int]


def load_tokenizer(source: Source, what: str) -> PreTrainedTokenizerBase:
    source.check_local(what)
    try:
        return AutoTokenizer.from_pretrained(source.source, **source.hf_kwargs())
    except Exception as exc:  # transformers raises OSError, ValueError or KeyError for bad tokenizer files
        raise ModelLoadError(f"{what}: cannot load the tokenizer from {source.describe()}: {exc}", field=what) from exc


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Identity of a tokenizer's mapping: equal fingerprints mean equal ids for every prompt."""
    payload = json.dumps(
        [sorted(tokenizer.get_vocab().items()), tokenizer.pad_token_id, tokenizer.eos_token_id], ensure_ascii=False
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def weights_identity(spec: EncoderSpec, model: torch.nn.Module) -> str:
    """What the weights are, for the embedding cache: the models file's `cache_key`, else the Hub commit the weights
    came from, else a SHA-256 of the local weight and config files (streamed once per load)."""
    if spec.cache_key:
        return spec.cache_key
    commit = getattr(model.config, "_commit_hash", None)
    if commit and not spec.is_local:
        return f"{spec.source}@{commit}"
    folder = Path(spec.source).expanduser() / (spec.subfolder or "")
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if path.suffix in (".safetensors", ".bin", ".json") and path.is_file():
            digest.update(path.name.encode())
            with open(path, "rb") as f:
                while chunk := f.read(8 * 2**20):
                    digest.update(chunk)
    return digest.hexdigest()[:32]


def quantization_of(spec: EncoderSpec, config, what: str) -> Quantization | None:
    """The quantization an encoder loads with: the models file's, or that of a pre-quantized directory; refused when
    the two disagree."""
    try:
        on_disk = detect(config)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{what}: {spec.describe()}: {exc}", field=what) from None
    wanted = spec.quantization
    if wanted and on_disk and wanted.method != on_disk.method:
        raise ModelLoadError(
            f"{what}: the weights in {spec.describe()} are pre-quantized with {on_disk.method!r} but the models file "
            f"says quantization {wanted.method!r}; make them agree (or point at the unquantized weights)", field=what)
    return wanted or on_disk


def load_weights(spec: EncoderSpec, torch_device: torch.device, dtype: torch.dtype,
                 what: str) -> tuple[torch.nn.Module, Quantization | None]:
    """A student (T5 + projection) or a plain T5 encoder, told apart by the config, on `torch_device` in eval mode;
    quantized as it loads when the models file says so, or already quantized on disk (which must agree)."""
    spec.check_local(what)
    try:
        config = AutoConfig.from_pretrained(spec.source, **spec.hf_kwargs())
    except Exception as exc:  # missing files, a config that is not T5, ...
        raise ModelLoadError(f"{what}: cannot load weights from {spec.describe()}: {exc}", field=what) from exc
    quantization = quantization_of(spec, config, what)
    kwargs = dict(spec.hf_kwargs())
    if quantization is not None:
        check_backend(quantization, what)
        check_device(quantization, torch_device, what)
        with init_empty_weights(include_buffers=True):
            check_shapes(quantization, build_t5(config), torch_device, what)
        kwargs["device_map"] = str(torch_device)  # quantized weights are placed as they load, never moved
        if getattr(config, "quantization_config", None) is None:
            kwargs["quantization_config"] = hf_config(quantization, dtype)
    model_cls = T5EncoderWithProjection if _is_student(config) else T5EncoderModel
    try:
        model = model_cls.from_pretrained(spec.source, dtype=dtype, **kwargs)
    except Exception as exc:  # missing files, a corrupt safetensors header, a backend that fails, ...
        gc.collect()  # nothing half-loaded stays
        raise ModelLoadError(f"{what}: cannot load weights from {spec.describe()}"
                             f"{f' with quantization {quantization.describe()}' if quantization else ''}: {exc}",
                             field=what) from exc
    if quantization is None:
        model.to(torch_device)
    else:
        model.tie_weights()  # a device_map load can leave the student's tied embedding as two copies
    return model.eval().requires_grad_(False), quantization


def _is_student(config) -> bool:
    return "T5EncoderWithProjection" in (getattr(config, "architectures", None) or []) or hasattr(
        config, "project_out_dim"
    )


class TextEncoder:
    """A loaded encoder. `encode(prompts)` returns embeddings on the encoder's own device."""

    def __init__(self, spec: EncoderSpec, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                 quantization: Quantization | None = None):
        self.spec = spec
        self.model = model
        self.tokenizer = tokenizer
        self.quantization = quantization
        self.fingerprint = tokenizer_fingerprint(tokenizer)
        quant = quantization.describe() if quantization else "none"
        self.identity = f"{spec.name}|{weights_identity(spec, model)}|{self.fingerprint}|q={quant}"
        # Counted once: parameters as the architecture has them (quantization packs weights, it does not remove
        # parameters), bytes as the model really holds them.
        self.num_params = meta_params(lambda: build_t5(model.config))
        self.num_bytes = state_bytes(model)

    # -- loading -----------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, spec: EncoderSpec, *, device: str | None = None) -> "TextEncoder":
        what = f"encoder {spec.name!r}"
        # 1. Where and in what precision.
        torch_device = resolve_device(device or spec.device)
        dtype = resolve_dtype(spec.dtype, torch_device)

        # 2. Tokenizer first: it is cheap and a wrong one makes the weights useless.
        tokenizer = load_tokenizer(spec.tokenizer_source, what)

        # 3. Weights, quantized as the models file or the directory says.
        model, quantization = load_weights(spec, torch_device, dtype, what)

        # 4. The ids the tokenizer makes must exist in the embedding table.
        vocab_rows = model.get_input_embeddings().num_embeddings
        if len(tokenizer) > vocab_rows:
            raise ModelLoadError(
                f"{what}: tokenizer has {len(tokenizer)} tokens but the model's embedding has {vocab_rows} rows",
                field=what,
            )
        return cls(spec, model, tokenizer, quantization)

    # -- facts -------------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def output_width(self) -> int:
        config = self.model.config
        return getattr(config, "project_out_dim", None) or config.d_model

    # -- encoding ----------------------------------------------------------------------------------------------
    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, list[bool]]:
        ids, truncated, _ = self._tokenize(prompts)
        return ids, truncated

    def _tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, list[bool], list[int]]:
        max_len = self.spec.max_sequence_length
        tokens = self.tokenizer(prompts, padding="max_length", max_length=max_len, truncation=True,
                                return_tensors="pt")
        ids = tokens.input_ids
        full_lengths = [len(x) for x in self.tokenizer(prompts, truncation=False).input_ids]
        truncated = [n > max_len for n in full_lengths]
        for n, cut in zip(full_lengths, truncated):
            if cut:  # the prompt itself is not logged: prompts may be private
                log.warning("encoder %s: a prompt of %d tokens was truncated to max_sequence_length=%d",
                            self.name, n, max_len)
        return ids, truncated, tokens.attention_mask.sum(dim=1).tolist()

    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> Encoded:
        ids, truncated, lengths = self._tokenize(prompts)
        embeds = self.model(ids.to(self.device), output_hidden_states=False)[0]
        return Encoded(embeds=embeds, truncated=truncated, lengths=lengths)
