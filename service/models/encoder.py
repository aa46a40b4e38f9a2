"""A T5 text encoder (the teacher or a student) with its tokenizer, loaded from a registry spec.

Encoding happens here, outside any diffusers pipeline, exactly as the pipelines do it (ids padded to
`max_sequence_length`, no attention mask), so that the result can be cached, computed on another device than the
denoiser, and swapped per request. Prompts longer than `max_sequence_length` tokens are truncated, as the stock
pipelines do, and the truncation is reported back (a warning in the log and in the job result), never silent.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase, T5EncoderModel

from service.errors import ModelLoadError
from service.models.devices import module_bytes, module_params, resolve_device, resolve_dtype
from service.models.registry import EncoderSpec, Source
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


def _is_student(config) -> bool:
    return "T5EncoderWithProjection" in (getattr(config, "architectures", None) or []) or hasattr(
        config, "project_out_dim"
    )


class TextEncoder:
    """A loaded encoder. `encode(prompts)` returns embeddings on the encoder's own device."""

    def __init__(self, spec: EncoderSpec, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase):
        self.spec = spec
        self.model = model
        self.tokenizer = tokenizer
        self.fingerprint = tokenizer_fingerprint(tokenizer)
        self.identity = f"{spec.name}|{weights_identity(spec, model)}|{self.fingerprint}"

    # -- loading -----------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, spec: EncoderSpec, *, device: str | None = None) -> "TextEncoder":
        what = f"encoder {spec.name!r}"
        # 1. Where and in what precision.
        torch_device = resolve_device(device or spec.device)
        dtype = resolve_dtype(spec.dtype, torch_device)

        # 2. Tokenizer first: it is cheap and a wrong one makes the weights useless.
        tokenizer = load_tokenizer(spec.tokenizer_source, what)

        # 3. Weights: a student (T5 + projection) or a plain T5 encoder, told apart by the config.
        spec.check_local(what)
        try:
            config = AutoConfig.from_pretrained(spec.source, **spec.hf_kwargs())
            model_cls = T5EncoderWithProjection if _is_student(config) else T5EncoderModel
            model = model_cls.from_pretrained(spec.source, dtype=dtype, **spec.hf_kwargs())
        except Exception as exc:  # missing files, a corrupt safetensors header, a config that is not T5, ...
            raise ModelLoadError(f"{what}: cannot load weights from {spec.describe()}: {exc}", field=what) from exc
        model.to(torch_device).eval().requires_grad_(False)

        # 4. The ids the tokenizer makes must exist in the embedding table.
        vocab_rows = model.get_input_embeddings().num_embeddings
        if len(tokenizer) > vocab_rows:
            raise ModelLoadError(
                f"{what}: tokenizer has {len(tokenizer)} tokens but the model's embedding has {vocab_rows} rows",
                field=what,
            )
        return cls(spec, model, tokenizer)

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

    @property
    def num_params(self) -> int:
        return module_params(self.model)

    @property
    def num_bytes(self) -> int:
        return module_bytes(self.model)

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
