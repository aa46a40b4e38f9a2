"""Render docs/benchmarks.md and the charts from the records in docs/benchmarks/*.json (`python -m bench report`)."""

from __future__ import annotations

import json
from pathlib import Path

ORDER = ("encoders", "quantized", "overhead", "throughput", "cache", "trainer", "world", "startup", "gpu")
TITLES = {
    "encoders": "Encoder cost at real sizes (CPU)",
    "quantized": "Quantized T5-XXL beside the distilled students (CPU)",
    "overhead": "Service overhead",
    "throughput": "Throughput and dynamic batching",
    "cache": "Prompt-embedding cache",
    "trainer": "Trainer: teacher-embedding cache vs live teacher",
    "world": "Miniature world: denoiser training in float32 and bfloat16",
    "startup": "Worker startup",
    "gpu": "GPU: real-size FLUX.1 and SD3.5 Large",
}
# What each table means, and why a figure is what it is; read with the numbers.
NOTES = {
    "encoders": (
        "Random bf16 weights in the real T5 v1.1 shapes, one prompt, each size in a fresh process. `peak added` is "
        "the process's peak RSS minus its RSS before the model was built: weights plus activations. On a CPU, small "
        "encoders are bound by per-layer overhead rather than by their matrix products, so their time ratio to XXL "
        "falls below their parameter ratio; the long prompts (512 tokens) are the fairest comparison and are the "
        "ones the ratios use. The student projection to 4096 adds a fixed two-layer MLP (2 x 4096^2 weights), a "
        "large share of the smallest students. Where a memory target is missed, the cause is the part of the peak "
        "that does not shrink with the model (activations at 512 tokens, allocator workspace: tens of MB): it is "
        "a large share of T5-small's peak and pulls XXL/base just under 35x; the weights alone (bf16 columns) follow "
        "the parameter ratio exactly."),
    "quantized": (
        "The rows go through the service's own loading path (transformers' `quantization_config`: torchao for "
        "int8 weight-only, int8 dynamic and fp8 weight-only, bitsandbytes for int8 and NF4) from a bf16 safetensors "
        "directory of random weights. T5-XXL's 24 blocks are identical, so its rows load 2 of them at full width and "
        "scale bytes (beyond the embedding) and time by 12; `GB predicted` is what the registry computes for the "
        "whole model from its config alone (`t2i models sizes`), which the tests hold equal to the measured bytes. "
        "Bytes are counted from the tensors the model really holds (packed 4-bit weights, scales, the layers a "
        "method leaves unquantized: bitsandbytes keeps T5's `wo`, a fifth of the weights, in bf16). On a CPU, "
        "quantization saves memory, not time: only int8 kernels come near bf16, and fp8 runs as a slow fallback; a "
        "GPU has its own kernels (`python -m bench run gpu` has the same rows, int4 too)."),
    "overhead": (
        "Both routes run the same demo FLUX model with one thread per process, the same prompts and seeds, "
        "interleaved job by job. The stock loop is `FluxPipeline` with its T5 inside; the service encodes outside "
        "the pipeline, queues through Redis, runs in a worker process and answers over HTTP (`?wait=true`). "
        "Two services run side by side, one whose API and worker reach Redis over loopback TCP (as `t2i serve` "
        "connects them) and one through the server's unix socket. Each prompt is served four times, each time after "
        "a stock call, in an order that rotates from prompt to prompt: on each service through the standard "
        "library's `http.client` (the thinnest Python client, so that the figures are the service's) and through "
        "httpx (what figures before the fourth round used). The figures and the target are TCP's through "
        "`http.client`; the routes table shows what the other transport and httpx's own work change. "
        "`HTTP + queue` is the client's latency minus the worker's own time for the job. The stage table splits "
        "each job's added latency by the wall-clock stamps the client, the API (`created_at`) and the worker "
        "(`started_at`, `finished_at`, the model stages' timings) take, so the stages sum to the added latency; "
        "`generation_vs_stock` is what the worker's model stages cost beyond the stock call. It carries most of the "
        "noise (the same call varies by several milliseconds from one to the next, in either direction), so the "
        "target is checked on the other four stages' sum, which never credits a model call that ran faster. The "
        "profile is py-spy sampling the running API and "
        "worker during the served jobs (`BENCH_PROFILE=DIR`; no code change), idle samples left out. The PNG "
        "table encodes one 1024x1024 result at zlib levels 1 (the service's `T2I_PNG_COMPRESS_LEVEL` default) "
        "and 6 by the service's encoder (libpng through OpenCV, zlib's run-length strategy, the Up row filter), "
        "by libpng with its adaptive row filters (the service's before the fifth round) and by PIL's (before the "
        "third), the fastest of five each."),
    "throughput": (
        "Sixteen clients submit jobs and wait for each; one worker (one thread) serves them. With batching on, the "
        "worker claims the jobs queued on a stream in one read (up to `T2I_MAX_BATCH`) and denoises those that share "
        "pipeline, encoder, size and steps in one call. On these tiny models a call is dominated by its fixed "
        "per-step cost, which a batch shares; on a GPU with real models the gain comes from filling the device. "
        "The 16 clients are threads of the benchmark's own process, on the same two cores as the service, so the "
        "client library's own CPU time is taken from the service: the targets are checked through the standard "
        "library's `http.client` (the thinnest Python client, as in the overhead benchmark), and httpx's rows run "
        "beside them on the same services (the figures before the fifth round of the overhead work were httpx's). "
        "What a batch does not share is each job's HTTP request and wait and its PNG encoding (a batch's start "
        "and finish scripts go in one round trip each). The second stock row calls the pipeline with the default "
        "batch's number of prompts at once, each with its own seed: how much the model itself gains from batching "
        "on this machine, which bounds what the service's batching can gain."),
    "cache": (
        "A hit returns the very tensor the encoder produced (safetensors bytes in Redis, the tensor itself in "
        "memory), so images are compared for exact equality. A hit in Redis costs a round trip and "
        "deserialisation; a hit in the worker's memory costs a hash and a dictionary lookup."),
    "trainer": (
        "`t2i distill cache-teacher` writes the teacher's embeddings (and its trajectories) once; training then "
        "never loads the teacher. The teacher here is widened to ~100 M parameters so that its weights stand out "
        "from the process's other memory."),
    "world": (
        "`t2i world train --precision bfloat16` runs the denoiser's forward and backward passes under bfloat16 "
        "autocast; its weights, optimizer state and EMA stay float32. Each row is the trainer's own loop, data "
        "drawing, VAE encoding and the teacher included, so the ratio is what a whole run gains. Whether it gains "
        "depends on the hardware: a CPU without bfloat16 arithmetic emulates it. On the same host with torch and "
        "oneDNN held to AVX2 (`BENCH_OUT=/tmp/avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python -m bench "
        "run world`, an AVX2-only CPU such as Zen 3 imitated, its record kept out of these figures; stopped after "
        "its first round, 2026-12-05, the distillation beside "
        "it paused) a step took 2.41 s in float32 and 21.0 s in bfloat16: emulated, bfloat16 is about 9x slower, "
        "so `t2i world train` warns when it is asked for on a device without it. What the arithmetic does to the "
        "kit's accuracy is measured on validation prompts in docs/miniature.md."),
    "startup": (
        "From spawning `t2i worker` to its first heartbeat (it loads every served denoiser first, so it is ready "
        "when it says so), then the first job (which loads its encoder) against a warm one."),
    "gpu": ("Not measured here: this machine has no GPU. `python -m bench run gpu` on a GPU host fills this table."),
}


def _fmt(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value:,}"
    return "–" if value is None else str(value)


def _table(rows: list[dict], columns: list[str] | None = None) -> list[str]:
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    return lines


def _encoders_rows(record: dict) -> list[dict]:
    out = []
    for r in record["rows"]:
        row = {"encoder": r["name"], "params (M)": r["params"] / 1e6, "bf16 GB": r["bytes_bf16"] / 1e9,
               "fp32 GB": r["bytes_fp32"] / 1e9, "peak added GB": r["peak_added_bytes"] / 1e9}
        for length, seconds in r["latency_s"].items():
            row[f"{length} tok (s)"] = seconds
        if "ratios_vs_xxl" in r:
            q = r["ratios_vs_xxl"]
            row["XXL/x params"], row["XXL/x time"], row["XXL/x memory"] = q["params"], q["time"], q["memory"]
        out.append(row)
    return out


def _chart_encoders(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in record["rows"] if "+proj" not in r["name"]]
    longest = str(record["lengths"][-1])
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    params = [r["params"] / 1e6 for r in rows]
    ax.loglog(params, [r["latency_s"][longest] for r in rows], "o-", label=f"encode time, {longest} tokens (s)")
    ax.loglog(params, [r["peak_added_bytes"] / 1e9 for r in rows], "s-", label="peak added memory (GB)")
    for r, x in zip(rows, params):
        ax.annotate(r["name"], (x, r["latency_s"][longest]), textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax.set_xlabel("parameters (M)")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _chart_throughput(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["rows"]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    labels = [r["route"].replace("service, concurrency 16, ", "service, ").replace(" (sequential)", "")
              + (f" ({r['client']})" if r.get("client", "-") != "-" else "") for r in rows]
    ax.barh(labels, [r["jobs_per_s"] for r in rows], color=["#888" if r.get("client", "-") == "-" else "#2456d6"
                                                            for r in rows])
    ax.set_xlabel("jobs/s")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _overhead_details(record: dict) -> list[str]:
    """The added latency by stage, PNG encoding by level, and where the profile found the processes busy."""
    lines: list[str] = []
    if record.get("stages_p50_ms"):
        lines += ["| stage | p50 ms | what it spans |", "|---|---|---|"]
        lines += [f"| {k} | {v:.2f} | {record['stages'][k]} |" for k, v in record["stages_p50_ms"].items()] + [""]
    if record.get("clients"):
        stages = [k for k in record["stages"] if k != "generation_vs_stock"]
        lines += ["The same jobs by route to Redis (the API's and the worker's) and by client, side by side (p50 ms; "
                  "CPU time per job of the client's request, the API process and the Redis server, from Linux's "
                  "scheduler statistics):", "",
                  "| Redis | client | outside the model | " + " | ".join(stages)
                  + " | client CPU | API CPU | Redis CPU |", "|---" * (len(stages) + 6) + "|"]
        lines += [f"| {c['redis']} | {c['client']} | {c['outside_model_p50_ms']:.2f} | "
                  + " | ".join(f"{c['stages_p50_ms'][k]:.2f}" for k in stages)
                  + f" | {c['client_cpu_ms_per_job']:.2f} | {c['api_cpu_ms_per_job']:.2f} | "
                  f"{c['redis_cpu_ms_per_job']:.2f} |" for c in record["clients"]] + [""]
    if record.get("png_1024"):
        lines += _table(record["png_1024"]) + [""]
    if record.get("redis_round_trip"):
        trip = record["redis_round_trip"]
        lines += [f"A Redis round trip (PING, p50) costs {trip['tcp_busy_us']:.0f} us over loopback TCP from a process "
                  f"that was just busy and {trip['tcp_idle_us']:.0f} us from one that slept 5 ms first, as each "
                  f"process on a job's path does between its turns; through the server's unix socket, "
                  f"{trip['unix_busy_us']:.0f} and {trip['unix_idle_us']:.0f} us.", ""]
    if record.get("wake_penalty"):
        wake = record["wake_penalty"]
        lines += [f"Code that has just woken runs slower: the API's building of a job's view and its JSON takes "
                  f"{wake['warm_us']:.0f} us back to back and {wake['woken_us']:.0f} us after a 40 ms sleep (p50, "
                  f"{wake['woken_us'] / wake['warm_us']:.1f}x), and every process on a job's path sleeps while the "
                  "model runs.", ""]
    for process, profile in (record.get("profile") or {}).items():
        if not profile.get("busy_samples"):
            continue
        lines += [f"Profile of the {process} (py-spy, {profile['busy_samples']:,} busy samples at 1 kHz, "
                  f"{profile['idle_samples']:,} idle left out); the project's frames by share of busy samples:", ""]
        lines += ["| share | frame |", "|---|---|"]
        lines += [f"| {f['share']:.1%} | `{f['frame']}` |" for f in profile["inclusive"][:10]] + [""]
    return lines


def render(out_dir: Path) -> Path:
    records = {p.stem: json.loads(p.read_text()) for p in sorted(out_dir.glob("*.json"))}
    lines = ["# Benchmarks", "",
             "Every figure below is a comparison measured side by side in one run (medians of repetitions) on the "
             "machine named in its section. Rerun everything with `python -m bench run` (about 20 minutes on a "
             "2-core CPU; `python -m bench run NAME` for one; `python -m bench run gpu` on a GPU host), which also "
             "rewrites this file from `docs/benchmarks/*.json`. CI runs `python -m bench run --tiny` (a quick check "
             "that each benchmark runs; its figures are not kept).", ""]
    for name in ORDER:
        lines += [f"## {TITLES[name]}", ""]
        record = records.get(name)
        if record is None:
            lines += [NOTES[name] if name == "gpu" else "Not run yet.", ""]
            if name == "gpu":
                lines += ["The script is ready (`bench/gpu.py`): real-size FLUX.1 and SD3.5 Large transformers with "
                          "random bf16 weights, the FLUX VAE shape and each T5 size; per-stage latency at 1024x1024 "
                          "(FLUX 4 and 28 steps), peak VRAM for T5-XXL resident / offloaded to the CPU / a student "
                          "on the GPU / a student on the CPU, and a fits-in-24-GB column. CI runs it with `--tiny` "
                          "on the CPU.", ""]
            continue
        m = record["machine"]
        cpu = m["cpu"] + (f" ({m['cpu_id']})" if m.get("cpu_id") else "")
        lines += [f"Command: `{record['command']}`  ", f"Machine: {cpu}, {m['cores']} cores"
                  + (f", {m['gpu']}" if m.get("gpu") else ", no GPU") + f"; {m['date']}  ",
                  f"Setting: {record.get('setting') or ''}".rstrip(), ""]
        if name == "encoders":
            lines += _table(_encoders_rows(record)) + [""]
            _chart_encoders(record, out_dir / "encoders.png")
            lines += ["![encode time and memory against parameters](benchmarks/encoders.png)", ""]
        elif name == "gpu":
            lines += _table(record["encoders"]) + [""] + _table(record["rows"]) + [""]
            if record.get("quantized"):
                lines += _table(record["quantized"]) + [""]
        elif name == "startup":
            lines += _table(record["rows"]) + ["", f"Median: ready in {record['ready_p50_s']:.2f} s; first job "
                                                   f"{record['first_job_p50_s']:.3f} s; warm job "
                                                   f"{record['warm_job_p50_s']:.3f} s.", ""]
        else:
            lines += _table(record["rows"]) + [""]
            if name == "throughput":
                _chart_throughput(record, out_dir / "throughput.png")
                lines += ["![jobs per second](benchmarks/throughput.png)", ""]
                if "httpx_on_vs_off" in record:
                    lines += [f"Through httpx, batching on against off: {record['httpx_on_vs_off']:.2f}x.", ""]
                if "model_batching_gain" in record:
                    lines += [f"The stock pipeline alone gains {record['model_batching_gain']:.2f}x from batching on "
                              f"this machine (its prompts in calls of the default batch, against one by one); the "
                              f"service's on/off ratio is {record['share_of_model_gain']:.0%} of that gain.", ""]
            if name == "overhead":
                if "outside_model_p50_ms" in record:
                    lines += [f"Added latency per job (p50): **{record['outside_model_p50_ms']:.1f} ms** outside the "
                              f"model (the four stages' sum, job by job); {record['added_p50_ms']:.1f} ms as service "
                              f"minus stock loop, of which HTTP and queue {record['http_and_queue_p50_ms']:.1f} ms.",
                              ""]
                else:
                    lines += [f"Added latency per job (p50, service minus stock loop): "
                              f"**{record['added_p50_ms']:.1f} ms**, of which HTTP and queue "
                              f"{record['http_and_queue_p50_ms']:.1f} ms.", ""]
                lines += _overhead_details(record)
        if record["targets"]:
            lines += ["| target | measured | bound | met |", "|---|---|---|---|"]
            for t in record["targets"]:
                lines.append(f"| {t['name']} | {_fmt(t['value'])}{t['unit']} | {t['target']} | "
                             f"{'yes' if t['met'] else '**no**'} |")
            lines.append("")
        lines += [NOTES[name], ""]
        written = out_dir / f"{name}.md"  # what a record cannot hold (a before/after study): kept as written
        if written.is_file():
            lines += [written.read_text().rstrip(), ""]
    # Measured by tests/deploy/test_image.py, not by a benchmark here: its section is kept as written.
    image = out_dir / "image.md"
    if image.is_file():
        lines += ["## Container image (CPU)", "", image.read_text().rstrip(), ""]
    path = out_dir.parent / "benchmarks.md"
    path.write_text("\n".join(lines))
    return path
