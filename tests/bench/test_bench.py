"""The benchmarks run (on tiny settings: a check, not a measurement) and the report renders from their records."""

import json
import os
import subprocess
import sys

from bench.__main__ import BENCHMARKS
from bench.common import machine
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
        assert record["machine"]["cores"] and record["machine"]["cpu_id"] and record["command"].endswith("--tiny")
        assert record["rows"], name
        for t in record["targets"]:
            assert set(t) >= {"name", "value", "target", "met"}
    assert json.loads((out / "cache.json").read_text())["identical_images"] is True
    overhead = json.loads((out / "overhead.json").read_text())  # Redis through its unix socket and over TCP
    assert {(c["redis"], c["client"]) for c in overhead["clients"]} == {
        (t, c) for t in ("unix", "tcp") for c in ("http.client", "httpx")}
    assert set(overhead["redis_round_trip"]) == {f"{t}_{w}_us" for t in ("tcp", "unix") for w in ("busy", "idle")}
    (out / "gpu.json").write_text((out / "gpu-tiny.json").read_text())  # the report's gpu section, from the check
    report = render(out).read_text()
    assert f"Machine: {machine()['cpu']} ({machine()['cpu_id']}), " in report
    for title in ("Encoder cost", "Quantized T5-XXL", "Service overhead", "Throughput", "Prompt-embedding cache",
                  "Trainer", "Miniature world", "startup", "GPU"):
        assert title in report
    assert (out / "encoders.png").exists() and (out / "throughput.png").exists()
    assert "MISS" in result.stdout or "met" in result.stdout


def test_two_hosts_of_one_cpu_name_are_told_apart(tmp_path):
    """Cloud CPUs often name themselves only "AMD EPYC": the record adds family, model, clock and vector unit."""
    block = "processor\t: {n}\ncpu family\t: 25\nmodel\t\t: {model}\nmodel name\t: AMD EPYC\ncpu MHz\t\t: {mhz}\n" \
            "flags\t\t: fpu sse avx avx2 {extra}\n\n"
    for name, model, mhz, extra, expected in (("zen3", 1, "2445.428", "", "family 25 model 1, 2445 MHz, AVX2"),
                                              ("zen4", 17, "2600.000", "avx512f avx512bw",
                                               "family 25 model 17, 2600 MHz, AVX-512")):
        info = tmp_path / name
        info.write_text(block.format(n=0, model=model, mhz=mhz, extra=extra) + block.format(n=1, model=0, mhz=1, extra=""))
        m = machine(info)
        assert m["cpu"] == "AMD EPYC" and m["cpu_id"] == expected, m
    assert machine(tmp_path / "missing")["cpu_id"] is None
