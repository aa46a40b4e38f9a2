"""Device choices: which devices have bfloat16 arithmetic (where `--precision bfloat16` is faster, not emulated)."""

import torch

from service.models.devices import bf16_arithmetic


def test_a_cpu_has_bfloat16_arithmetic_only_with_avx512_bf16_or_amx(tmp_path):
    def cpu(flags: str):
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: {flags}\n")
        return bf16_arithmetic(torch.device("cpu"), info)

    assert cpu("fpu sse2 avx2 fma avx512f avx512_bf16 avx512_vnni") == "avx512_bf16"
    assert cpu("fpu avx2 avx512f amx_bf16 amx_tile avx512_bf16") == "avx512_bf16, amx_bf16"
    assert cpu("fpu sse2 avx2 fma") is None  # AVX2 only (the Zen 3 host): emulated
    assert bf16_arithmetic(torch.device("cpu"), tmp_path / "missing") is None
