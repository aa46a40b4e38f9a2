"""Device, dtype and thread choices: CUDA with bf16 when present, CPU with fp32 otherwise."""

from __future__ import annotations

from pathlib import Path

import torch

from service.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """`auto` is the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r} is not a device name (auto, cpu, cuda, cuda:N)", field="device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for but no CUDA device is available", field="device")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 on CUDA (what FLUX and SD3 are trained in) and fp32 on the CPU (bf16 matmuls are slow there)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def bf16_arithmetic(device: torch.device, cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """What gives `device` bfloat16 arithmetic in hardware (a CUDA device that supports it; a CPU with AVX-512 BF16
    or AMX), or None where bfloat16 is emulated: slower than float32 there, not faster."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device) if torch.cuda.is_bf16_supported() else None
    try:
        flags = set(next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags"))
                    .partition(":")[2].split())
    except (OSError, StopIteration):
        return None
    return ", ".join(f for f in ("avx512_bf16", "amx_bf16") if f in flags) or None


def set_threads(threads: int) -> None:
    """Pin torch's intra-op threads. On a busy 2-core machine one thread is often 10x faster than two."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:
        pass  # only settable before the first parallel op; the intra-op count is what matters


def _unique(tensors) -> list[torch.Tensor]:
    """Tensors with shared (tied) ones counted once."""
    return list({id(t): t for t in tensors}.values())


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (shared tensors counted once)."""
    return sum(t.numel() * t.element_size() for t in _unique([*module.parameters(), *module.buffers()]))


def module_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in _unique(module.parameters()))
