"""The benchmarks run (on tiny settings: a check, not a measurement) and the report renders from their records."""

import json
import os
import subprocess
import sys

from bench.__main__ import BENCHMARKS
from bench.report import render


def test_every_benchmark_runs_on_tiny_settings_and_the_report_renders(tmp_path):
    out = tmp_path / "benchmarks"
    result = subprocess.run([sys.executable, "-m", "bench", "run", "--tiny", *BENCHMARKS], capture_output=True,
                            text=True, timeout=1200, env={**os.environ, "BENCH_OUT": str(out)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    written = {p.stem for p in out.glob("*.json")}
    assert written == {*BENCHMARKS} - {"gpu"} | {"gpu-tiny"}, written
    for name in written:
        record = json.loads((out / f"{name}.json").read_text())
        assert record["machine"]["cores"] and record["command"].endswith("--tiny")
        assert record["rows"], name
        for t in record["targets"]:
            assert set(t) >= {"name", "value", "target", "met"}
    assert json.loads((out / "cache.json").read_text())["identical_images"] is True
    (out / "gpu.json").write_text((out / "gpu-tiny.json").read_text())  # the report's gpu section, from the check
    report = render(out).read_text()
    for title in ("Encoder cost", "Quantized T5-XXL", "Service overhead", "Throughput", "Prompt-embedding cache", "Trainer", "startup",
                  "GPU"):
        assert title in report
    assert (out / "encoders.png").exists() and (out / "throughput.png").exists()
    assert "MISS" in result.stdout or "met" in result.stdout
