"""What every benchmark shares: the machine, timing, medians, peak memory, and the result record."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"


def machine(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict:
    """The host a record was made on. Cloud CPUs often name themselves only "AMD EPYC" or "Intel Xeon Processor", so
    `cpu_id` adds the family, model, clock and widest vector unit: two hosts of one name can differ by 2x."""
    cpu, cpu_id = platform.processor() or platform.machine(), None
    try:
        fields = {}
        for line in cpuinfo.read_text().splitlines():
            if not line.strip():
                break  # the first processor's block
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        cpu = fields.get("model name", cpu)
        flags = set(fields.get("flags", "").split())
        vector = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"))
                       if flag in flags), None)
        parts = [f"family {fields['cpu family']} model {fields['model']}" if "cpu family" in fields else None,
                 f"{float(fields['cpu MHz']):.0f} MHz" if "cpu MHz" in fields else None, vector]
        cpu_id = ", ".join(p for p in parts if p) or None
    except (OSError, ValueError):
        pass
    try:
        mem = int(next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal"))
                  .split()[1]) * 1024
    except (OSError, StopIteration):
        mem = None
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return {"cpu": cpu, "cpu_id": cpu_id, "cores": os.cpu_count(), "memory_bytes": mem, "gpu": gpu,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")


def rss_bytes() -> int:
    """The process's resident memory now (its peak: `service.worker.memory.peak_bytes` on the CPU)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def random_module(module, device, dtype):
    """A module built on the meta device, given storage on `device` in `dtype` (tied weights tied again) and filled
    with N(0, 0.02): real shapes, random weights, one allocation."""
    import torch

    module = module.to(dtype).to_empty(device=device)
    if hasattr(module, "tie_weights"):
        module.tie_weights()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.02)
    return module.eval().requires_grad_(False)


def in_subprocess(module: str, args: list[str], timeout_s: float = 3600) -> dict:
    """Run `python -m module args` and parse the JSON it prints last: a fresh process for a clean peak memory."""
    result = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout_s,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    if result.returncode != 0:
        raise RuntimeError(f"{module} {args} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def target(name: str, value: float, op: str, bound: float, unit: str = "") -> dict:
    met = {">=": value >= bound, "<=": value <= bound}[op]
    return {"name": name, "value": value, "target": f"{op} {bound:g}{unit}", "met": bool(met), "unit": unit}


def save(name: str, record: dict, out: Path | None = None) -> Path:
    """Write one benchmark's record to $BENCH_OUT (tiny runs) or docs/benchmarks/."""
    out = out or Path(os.environ.get("BENCH_OUT") or OUT)
    out.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": name, "machine": machine(), **record}
    path = out / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
