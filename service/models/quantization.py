"""Quantized encoders: the registry's `quantization` turned into transformers' own `quantization_config`
(`TorchAoConfig` for torchao, `BitsAndBytesConfig` for bitsandbytes), refused where the device has no kernel for it;
a pre-quantized directory's method read back from its config; and bytes as they really are in memory.

Nothing here quantizes a tensor by hand: transformers replaces the layers and the backends hold the kernels.

Bytes: quantization keeps parameter counts and changes bytes, and `numel() * element_size()` of the parameters is wrong
for packed 4-bit weights and for torchao's tensor subclasses. `state_bytes` counts the tensors a loaded model really
holds (a subclass by the plain tensors inside it, tied tensors once); `estimate_bytes` predicts the same figure from a
model built on the meta device, so real-size T5-XXL can be sized under every method without allocating it. The tests
hold the two equal on every CPU method.
"""

from __future__ import annotations

import importlib.util
import math

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from service.errors import ModelLoadError
from service.models.registry import Quantization

PACKAGES = {"torchao": "torchao", "bitsandbytes": "bitsandbytes"}
NF4_BLOCKSIZE = 64
INT4_GROUP_SIZE = 128


def check_backend(quant: Quantization, what: str) -> None:
    """The backend package must be importable; the message names what to install."""
    package = PACKAGES[quant.spec.backend]
    if importlib.util.find_spec(package) is None:
        raise ModelLoadError(
            f"{what}: quantization {quant.method!r} needs the {package!r} package, which is not installed; "
            f"install it with `pip install {package}` (t2i-slim's own install includes it)", field=what)


def check_device(quant: Quantization, device: torch.device, what: str) -> None:
    """Refuse, at load, a method that has no kernel on `device` (not a crash deep inside a matmul)."""
    method = quant.spec
    if device.type not in method.devices:
        raise ModelLoadError(
            f"{what}: quantization {quant.method!r} has no kernel on {device.type!r} (it runs on "
            f"{', '.join(method.devices)}); place the encoder on one of those with `device:` or pick another method",
            field=what)
    if device.type == "cuda" and method.min_cuda_capability:
        capability = torch.cuda.get_device_capability(device)
        if capability < method.min_cuda_capability:
            need = ".".join(map(str, method.min_cuda_capability))
            raise ModelLoadError(
                f"{what}: quantization {quant.method!r} needs a GPU of compute capability >= {need}; "
                f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}", field=what)


def check_shapes(quant: Quantization, meta_model: torch.nn.Module, device: torch.device, what: str) -> None:
    """bitsandbytes' NF4 CPU kernel repacks each weight in blocks along its input dimension: refuse, at load, a
    model with a layer it cannot repack (real T5 widths all fit; tiny test models may not)."""
    if quant.method != "bnb-nf4" or device.type != "cpu":
        return
    blocksize = quant.options.get("blocksize", NF4_BLOCKSIZE)
    for name in converted_linears(meta_model, quant):
        layer = meta_model.get_submodule(name)
        if layer.in_features % blocksize:
            raise ModelLoadError(
                f"{what}: quantization 'bnb-nf4' has no CPU kernel for layer {name!r}: its {layer.in_features} inputs "
                f"are not a multiple of the block size {blocksize}; keep it unquantized with "
                f"`options: {{modules_to_not_convert: [{name.rsplit('.', 1)[-1]}]}}` or place the encoder on cuda",
                field=what)


def hf_config(quant: Quantization, dtype: torch.dtype):
    """transformers' `quantization_config` for a method and its options."""
    options = dict(quant.options)
    skip = options.pop("modules_to_not_convert", None)
    if quant.spec.backend == "torchao":
        from torchao.quantization import (Float8WeightOnlyConfig, Int4WeightOnlyConfig,
                                          Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig)
        from transformers import TorchAoConfig

        build = {"int8-weight-only": Int8WeightOnlyConfig, "int8-dynamic": Int8DynamicActivationInt8WeightConfig,
                 "fp8-weight-only": Float8WeightOnlyConfig, "int4-weight-only": Int4WeightOnlyConfig}[quant.method]
        return TorchAoConfig(build(**options), modules_to_not_convert=skip)
    from transformers import BitsAndBytesConfig

    if quant.method == "bnb-int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=options.get("threshold", 6.0),
                                  llm_int8_skip_modules=skip)
    compute = options.get("compute_dtype")
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=options.get("double_quant", False),
        bnb_4bit_compute_dtype=getattr(torch, compute) if compute else dtype, llm_int8_skip_modules=skip,
        **({"bnb_4bit_blocksize": options["blocksize"]} if "blocksize" in options else {}))


def detect(config) -> Quantization | None:
    """The method of a pre-quantized directory, from the `quantization_config` in its config.json."""
    raw = getattr(config, "quantization_config", None)
    if raw is None:
        return None
    raw = raw if isinstance(raw, dict) else raw.to_dict()
    backend = raw.get("quant_method")
    if backend == "bitsandbytes":
        if raw.get("load_in_4bit") and raw.get("bnb_4bit_quant_type") == "nf4":
            return Quantization(method="bnb-nf4")
        if raw.get("load_in_8bit"):
            return Quantization(method="bnb-int8")
    if backend == "torchao":
        quant_type = raw.get("quant_type")
        name = quant_type.get("default", quant_type) if isinstance(quant_type, dict) else quant_type
        name = (name.get("_type") if isinstance(name, dict) else type(name).__name__ if name is not None else "")
        by_class = {"Int8WeightOnlyConfig": "int8-weight-only", "Int8DynamicActivationInt8WeightConfig":
                    "int8-dynamic", "Float8WeightOnlyConfig": "fp8-weight-only",
                    "Int4WeightOnlyConfig": "int4-weight-only"}
        if name in by_class:
            return Quantization(method=by_class[name])
    raise ModelLoadError(f"the weights are quantized by a method this service does not serve: {raw}")


def _plain_tensors(tensor: torch.Tensor):
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        for name in names:
            yield from _plain_tensors(getattr(tensor, name))
    else:
        yield tensor


def state_bytes(model: torch.nn.Module) -> int:
    """Bytes of every tensor the model holds, as saved: quantized weights with their scales and quantization state,
    tensor subclasses by their inner tensors, tied tensors once."""
    seen: set[tuple] = set()
    total = 0
    for value in model.state_dict(keep_vars=True).values():
        for t in _plain_tensors(value):
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype) if t.numel() else (id(t),)
            if key in seen:
                continue
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def converted_linears(model: torch.nn.Module, quant: Quantization) -> list[str]:
    """Names of the Linear modules transformers quantizes under `quant`, by transformers' own rule: not the tied or
    last module, not `modules_to_not_convert`, not the class's `_keep_in_fp32_modules` (T5's `wo`: about a fifth of
    T5-XXL). torchao matches those patterns against parameter names and bitsandbytes against module names, so the
    same pattern can keep a layer unquantized under one backend and not the other (T5's `wo` is quantized by
    torchao, kept by bitsandbytes)."""
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    patterns = HfQuantizer.get_modules_to_not_convert(
        model, quant.options.get("modules_to_not_convert"), getattr(model, "_keep_in_fp32_modules", None))
    suffix = ".weight" if quant.spec.backend == "torchao" else ""
    return [name for name, module in model.named_modules()
            if type(module) is torch.nn.Linear and should_convert_module(name + suffix, patterns)]


def _linear_bytes(quant: Quantization, out_features: int, in_features: int) -> int:
    n = out_features * in_features
    method = quant.method
    if method in ("int8-weight-only", "int8-dynamic"):
        return n + out_features * (4 + 1)  # int8 data, a float32 scale and an int8 zero point per row
    if method == "fp8-weight-only":
        return n + out_features * 4  # float8 data, a float32 scale per row
    if method == "int4-weight-only":
        group = quant.options.get("group_size", INT4_GROUP_SIZE)
        return n // 2 + out_features * math.ceil(in_features / group) * 2 * 2  # packed, bf16 scale and zero/group
    if method == "bnb-int8":
        return n + out_features * 4 + 1  # int8 data, a float32 scale per row, the format byte
    blocksize = quant.options.get("blocksize", NF4_BLOCKSIZE)
    blocks = math.ceil(n / blocksize)
    state = 80  # the serialized quant state (a small JSON blob)
    if quant.options.get("double_quant"):
        return n // 2 + blocks + math.ceil(blocks / 256) * 4 + 256 * 4 + 4 + 16 * 4 + state
    return n // 2 + blocks * 4 + 16 * 4 + state  # packed 4-bit, a float32 absmax per block, the NF4 code book


def estimate_bytes(model: torch.nn.Module, quant: Quantization | None, dtype: torch.dtype) -> int:
    """`state_bytes` predicted from a model on the meta device (no weights allocated): quantized Linear weights
    by the method's storage, every other tensor at `dtype`."""
    element = torch.empty((), dtype=dtype).element_size()
    quantized: set[int] = set()
    total = 0
    for name in converted_linears(model, quant) if quant is not None else []:
        module = model.get_submodule(name)
        total += _linear_bytes(quant, module.out_features, module.in_features)
        quantized.add(id(module.weight))
    seen: set[int] = set()
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in quantized or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * (element if tensor.is_floating_point() else tensor.element_size())
    return total
