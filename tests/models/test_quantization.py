"""Quantized encoders: every CPU method loads through transformers' own quantization_config, holds the bytes the
registry predicts, stays close to the unquantized teacher, round-trips exactly through a pre-quantized directory, and
bad input is refused with the names and values involved. `int4-weight-only` has no CPU kernel: refused here, run by
the `gpu` test."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from service.errors import ConfigError, ModelLoadError
from service.models.encoder import TextEncoder
from service.models.quantization import state_bytes
from service.models.registry import QUANT_METHODS, EncoderSpec, Quantization, Registry
from service.models.sizes import encoder_row

CPU_METHODS = [m for m, spec in QUANT_METHODS.items() if "cpu" in spec.devices]
PROMPTS = ["a red circle above a blue square", "two green triangles on the left"]


def spec_for(registry, name: str, method: str | None, **options) -> EncoderSpec:
    base = registry.encoder(name)
    quant = Quantization(method=method, options=options) if method else None
    return base.model_copy(update={"name": f"{name}-{method}", "quantization": quant, "device": "cpu"})


@pytest.fixture(scope="module")
def reference(registry):
    return {name: TextEncoder.load(spec_for(registry, name, None)).encode(PROMPTS).embeds
            for name in ("t5-xxl", "t5-base")}


@pytest.mark.parametrize("method", CPU_METHODS)
@pytest.mark.parametrize("name", ["t5-xxl", "t5-base"])  # the teacher (T5EncoderModel) and a student (+ projection)
def test_every_cpu_method_loads_is_sized_honestly_and_stays_close(registry, reference, name, method):
    spec = spec_for(registry, name, method)
    if (name, method) == ("t5-base", "bnb-nf4"):  # the demo student's 32-wide layers are below NF4's CPU block
        with pytest.raises(ModelLoadError, match="no CPU kernel for layer .*32 inputs .*block size 64"):
            TextEncoder.load(spec)
        spec = spec.model_copy(update={"quantization": Quantization(method=method, options={
            "modules_to_not_convert": ["q", "k", "v", "o", "wi_0", "wi_1", "final_projection.0"]})})
    encoder = TextEncoder.load(spec)
    # Quantized for real: torchao swaps Linear weights for its tensor subclasses, bitsandbytes swaps the layers.
    if QUANT_METHODS[method].backend == "torchao":
        assert {type(m.weight).__name__ for m in encoder.model.modules() if isinstance(m, torch.nn.Linear)} & {
            "Int8Tensor", "Float8Tensor"}
    else:
        assert {type(m).__name__ for m in encoder.model.modules()} & {"Linear8bitLt", "Linear4bit"}
    # Bytes: what the registry predicts from the config alone equals what the loaded model holds (NF4's serialized
    # state is a JSON blob whose length varies by a few bytes).
    predicted = encoder_row(spec).bytes
    assert abs(predicted - encoder.num_bytes) <= 0.001 * encoder.num_bytes, (predicted, encoder.num_bytes)
    unquantized = TextEncoder.load(spec_for(registry, name, None))
    assert encoder.num_params == unquantized.num_params  # quantization keeps parameters; only bytes change
    # Smaller; less so for the tiny student, whose embedding and last projection (kept unquantized) weigh most.
    assert encoder.num_bytes < (0.6 if name == "t5-xxl" else 1.0) * unquantized.num_bytes
    # Close to the unquantized encoder, not equal to it.
    out = encoder.encode(PROMPTS).embeds.float()
    cosine = torch.nn.functional.cosine_similarity(out.flatten(), reference[name].flatten(), dim=0).item()
    assert 0.95 < cosine < 1.0, cosine
    assert method in encoder.identity  # the embedding cache never mixes a quantized encoder with its source


def test_the_int8_teacher_quantizes_the_layers_the_8_bit_width_implies(registry):
    """int8 weight-only: every Linear but the tied/last ones at one byte per weight plus a scale per row."""
    encoder = TextEncoder.load(spec_for(registry, "t5-xxl", "int8-weight-only"))
    linear = sum(m.weight.numel() for m in TextEncoder.load(spec_for(registry, "t5-xxl", None)).model.modules()
                 if isinstance(m, torch.nn.Linear))
    rest = encoder.num_params - linear
    implied = linear * 1 + rest * 4  # int8 weights, fp32 for the rest (the CPU's `auto` dtype)
    assert implied <= encoder.num_bytes <= 1.1 * implied


@pytest.mark.parametrize("method", CPU_METHODS)
def test_quantize_once_round_trips_exactly(registry, tmp_path, method):
    """`t2i models quantize` writes a directory that plain from_pretrained loads; reloaded, it encodes identically,
    and the registry accepts it as a source with its method read from its config."""
    from transformers import T5EncoderModel

    from service.cli import main

    out = tmp_path / method
    assert main(["models", "quantize", "t5-xxl", "--method", method, "-o", str(out),
                 "--models-file", str(registry.path)]) == 0
    fresh = TextEncoder.load(spec_for(registry, "t5-xxl", method)).encode(PROMPTS).embeds
    plain = T5EncoderModel.from_pretrained(out, device_map="cpu")  # plain transformers, nothing of ours
    ids = TextEncoder.load(spec_for(registry, "t5-xxl", None)).tokenize(PROMPTS)[0]
    with torch.inference_mode():
        assert torch.equal(plain(ids)[0], fresh)
    spec = EncoderSpec(name="pre", kind="teacher", source=str(out), device="cpu",
                       max_sequence_length=registry.teacher.max_sequence_length)
    loaded = TextEncoder.load(spec)
    assert loaded.quantization.method == method and torch.equal(loaded.encode(PROMPTS).embeds, fresh)
    assert encoder_row(spec).quantization == method
    # The same directory named with another method is refused, naming both.
    other = next(m for m in CPU_METHODS if m != method)
    with pytest.raises(ModelLoadError, match=f"pre-quantized with '{method}'.*says quantization '{other}'"):
        TextEncoder.load(spec.model_copy(update={"quantization": Quantization(method=other)}))


@pytest.mark.parametrize(
    "quantization, words",
    [
        ({"method": "int3"}, ["encoders.q.quantization", "unknown quantization method 'int3'", "bnb-nf4"]),
        ({"method": "bnb-nf4", "options": {"group_size": 64}}, ["takes no option 'group_size'", "double_quant"]),
        ({"method": "bnb-int8", "options": {"threshold": "high"}}, ["'threshold'", "must be float", "'high'"]),
        ({"method": "bnb-nf4", "bits": 4}, ["encoders.q.quantization.bits"]),
    ],
)
def test_bad_quantization_in_the_models_file_is_refused_with_names(tmp_path, quantization, words):
    with pytest.raises(ConfigError) as err:
        Registry.from_dict({"encoders": {"q": {"kind": "teacher", "source": "./x", "quantization": quantization}}},
                           base_dir=tmp_path)
    for word in words:
        assert word in str(err.value), str(err.value)


def test_a_method_without_a_kernel_on_the_device_is_refused_at_load(registry):
    with pytest.raises(ModelLoadError, match="'int4-weight-only' has no kernel on 'cpu' .*runs on cuda"):
        TextEncoder.load(spec_for(registry, "t5-xxl", "int4-weight-only"))


def test_a_missing_backend_package_is_named(registry, monkeypatch):
    """A simulated fault, named as such: the package is installed here, so its absence is made by hiding it from
    `importlib.util.find_spec`, which is what the check asks."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name))
    with pytest.raises(ModelLoadError, match="needs the 'bitsandbytes' package.*pip install bitsandbytes"):
        TextEncoder.load(spec_for(registry, "t5-xxl", "bnb-nf4"))


def test_quantized_teacher_is_not_a_second_teacher(tmp_path):
    reg = Registry.from_dict({"encoders": {
        "t": {"kind": "teacher", "source": "./t"},
        "t-int8": {"kind": "teacher", "source": "./t", "quantization": {"method": "int8-weight-only"}}}},
        base_dir=tmp_path)
    assert reg.teacher.name == "t"


def test_state_bytes_counts_packed_weights_not_parameters(registry):
    """The trap: numel() * element_size() of NF4's packed parameters says half a byte per weight is 1 byte."""
    encoder = TextEncoder.load(spec_for(registry, "t5-xxl", "bnb-nf4"))
    naive = sum(p.numel() * p.element_size() for p in encoder.model.parameters())
    assert state_bytes(encoder.model) == encoder.num_bytes != naive


@pytest.mark.gpu
@pytest.mark.parametrize("method", list(QUANT_METHODS))
def test_every_method_on_a_gpu(registry, reference, method):
    encoder = TextEncoder.load(spec_for(registry, "t5-xxl", method).model_copy(update={"device": "cuda"}))
    out = encoder.encode(PROMPTS).embeds.float().cpu()
    cosine = torch.nn.functional.cosine_similarity(out.flatten(), reference["t5-xxl"].flatten(), dim=0).item()
    assert cosine > 0.95 and abs(encoder_row(encoder.spec).bytes - encoder.num_bytes) <= 0.001 * encoder.num_bytes
