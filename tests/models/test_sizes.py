"""Real-size architectures on the meta device: counts without allocating."""

import resource

import torch

from service.models.registry import QUANT_METHODS
from service.models.sizes import encoder_row, pipeline_row, reference_rows


def test_reference_counts_match_the_published_sizes():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    all_rows = reference_rows()
    rows = {r.name: r for r in all_rows if r.quantization is None}
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert 4.70e9 < rows["t5-xxl"].params < 4.80e9  # the T5-XXL encoder: ~4.76 B
    assert 1.05e8 < rows["t5-base"].params < 1.15e8  # T5-Base encoder: ~110 M
    assert rows["t5-xxl"].params / rows["t5-base"].params > 35
    assert 11.5e9 < rows["flux.1"].params < 12.5e9  # FLUX.1 transformer: ~12 B
    assert rows["t5-base+proj4096"].width == 4096
    assert rows["t5-xxl"].bytes == 2 * rows["t5-xxl"].params  # bf16
    assert grown_mib < 1024, f"meta-device counting allocated {grown_mib:.0f} MiB"
    # T5-XXL under each method, also without allocating: parameters kept, bytes as the methods store them.
    quantized = {r.quantization: r for r in all_rows if r.quantization}
    assert set(quantized) == set(QUANT_METHODS)
    assert all(r.params == rows["t5-xxl"].params for r in quantized.values())
    gib = {m: r.bytes / 2**30 for m, r in quantized.items()}
    assert 4.4 < gib["int8-weight-only"] < 4.7 and 4.4 < gib["fp8-weight-only"] < 4.7  # ~4.9 GB: all Linear at 8 bits
    assert 5.3 < gib["bnb-int8"] < 5.7  # `wo` (a fifth of the weights) kept in bf16 by bitsandbytes
    assert 3.8 < gib["bnb-nf4"] < 4.2 and gib["int4-weight-only"] < gib["bnb-nf4"]


def test_the_int8_teacher_is_within_10_percent_of_what_8_bits_imply():
    from accelerate import init_empty_weights

    from service.models.sizes import build_t5, t5_config

    with init_empty_weights():
        model = build_t5(t5_config("t5-xxl"))
    row = next(r for r in reference_rows() if r.quantization == "int8-weight-only")
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    rest = row.params - linear  # the (tied) embedding and the norms
    implied = linear * 1 + rest * 2  # 8-bit Linear weights, the rest in bf16
    assert implied <= row.bytes <= 1.1 * implied


def test_registry_rows_are_read_from_configs(registry):
    teacher = encoder_row(registry.encoder("t5-xxl"))
    student = encoder_row(registry.encoder("t5-small"))
    assert teacher.width == student.width == 64
    assert teacher.params > 5 * student.params
    assert teacher.bytes == 4 * teacher.params and teacher.dtype == "float32" and teacher.device == "cpu"
    flux = pipeline_row(registry.pipeline("flux"))
    assert flux.params and flux.width == 64
