"""The service against the stock diffusers pipeline, on the demo models (one CPU thread per process):

- overhead: the same prompts and seeds, sequential, through a plain loop calling the stock `FluxPipeline` (T5 inside
  it) vs through HTTP + queue + worker, with the API and worker reaching Redis over loopback TCP (as `t2i serve`
  connects them) and, beside it, through the server's unix socket. Target: p50 added latency per job <= 5 ms.
- throughput: concurrency 16, dynamic batching off (T2I_MAX_BATCH=1) vs on (4, and 8: the default), and the plain
  loop. Target: >= 3x jobs/s with batching on vs off, and a p95 latency no worse than the unbatched p95.
- startup: from spawning a worker to its first heartbeat (ready), and the first job's latency against a warm one.

    python -m bench run overhead throughput startup         # add --tiny for a quick check
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import httpx

from bench.common import percentile, save, target
from service.redis_server import EmbeddedRedis, free_port
from service.settings import Settings

STEPS, SIZE = 4, 64


class Service:
    """An embedded Redis, one API and one worker, as local processes on 127.0.0.1, stopped by their pids. The API
    and the worker reach Redis over loopback TCP (`transport="tcp"`, as `t2i serve` connects them) or through its
    unix socket (`transport="unix"`)."""

    def __init__(self, models_file: Path, worker_env: dict[str, str], workdir: Path, transport: str = "tcp"):
        self.redis = EmbeddedRedis().start()
        url = {"unix": self.redis.local_url, "tcp": self.redis.url}[transport]
        self.env = {**os.environ, "T2I_REDIS_URL": url, "T2I_MODELS_FILE": str(models_file),
                    "T2I_THREADS": "1", "HF_HUB_OFFLINE": "1", "T2I_WORKER_METRICS_PORT": "0",
                    "T2I_MAX_QUEUE": "10000"}
        self.workdir = workdir
        self.procs: list[subprocess.Popen] = []
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self._spawn(["api", "--host", "127.0.0.1", "--port", str(port)], {})
        self._wait(lambda: httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200)
        self.worker_spawned = time.perf_counter()
        self._spawn(["worker"], worker_env)
        self._wait(lambda: httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200)
        self.worker_ready_s = time.perf_counter() - self.worker_spawned

    def _spawn(self, args: list[str], env: dict[str, str]) -> None:
        log = open(self.workdir / f"{args[0]}-{id(self)}-{len(self.procs)}.log", "w")
        self.procs.append(subprocess.Popen([sys.executable, "-m", "service.cli", *args], env={**self.env, **env},
                                           stdout=log, stderr=subprocess.STDOUT))

    def _wait(self, ready, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError("a service process exited; see " + str(self.workdir))
            try:
                if ready():
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.02)
        raise TimeoutError("the service did not become ready")

    def generate(self, client: httpx.Client, prompt: str, seed: int) -> tuple[float, dict]:
        """One job with `?wait=true`: the client's latency, and the job's view with `sent_at` / `received_at` added
        (wall clock, as the API and the worker stamp `created_at`, `started_at` and `finished_at`)."""
        sent_at, start = time.time(), time.perf_counter()
        response = client.post("/v1/generate", params={"encoder": "t5-xxl", "wait": "true"},
                               json={"prompt": prompt, "seed": seed, "steps": STEPS, "width": SIZE, "height": SIZE})
        elapsed = time.perf_counter() - start
        job = {**response.json(), "sent_at": sent_at, "received_at": sent_at + elapsed}
        assert job["status"] == "succeeded", job
        return elapsed, job

    @property
    def pids(self) -> dict[str, int]:
        return {"api": self.procs[0].pid, "worker": self.procs[1].pid}

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.redis.cleanup()


class PlainClient:
    """A keep-alive HTTP/1.1 client from the standard library (`http.client`), with the one call the benchmarks
    make (`post`, shaped as httpx's). It is the thinnest client Python has, so the overhead figure is the service's
    and not a client library's; httpx's own cost is measured beside it in the same run."""

    def __init__(self, url: str, timeout: float):
        parts = urllib.parse.urlsplit(url)
        self.connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)

    def post(self, path: str, params: dict[str, str], json: dict) -> "PlainResponse":
        body = _json.dumps(json).encode()
        self.connection.request("POST", f"{path}?{urllib.parse.urlencode(params)}", body,
                                {"Content-Type": "application/json"})
        reply = self.connection.getresponse()
        return PlainResponse(reply.status, reply.read())

    def __enter__(self) -> "PlainClient":
        return self

    def __exit__(self, *exc) -> None:
        self.connection.close()


class PlainResponse:
    def __init__(self, status_code: int, content: bytes):
        self.status_code, self.content = status_code, content

    def json(self) -> dict:
        return _json.loads(self.content)


_json = json  # `PlainClient.post` takes a `json` argument, as httpx's does


def stock_pipeline(kit: Path):
    """The stock diffusers FluxPipeline of the demo kit with its T5 (the teacher) inside: what users run today."""
    import torch
    from diffusers import FluxPipeline
    from transformers import AutoTokenizer, T5EncoderModel

    torch.set_num_threads(1)
    pipe = FluxPipeline.from_pretrained(kit / "pipelines" / "flux",
                                        text_encoder_2=T5EncoderModel.from_pretrained(kit / "encoders" / "t5-xxl"),
                                        tokenizer_2=AutoTokenizer.from_pretrained(kit / "encoders" / "t5-xxl"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def plain_call(pipe, prompt: str, seed: int) -> float:
    import torch

    start = time.perf_counter()
    pipe(prompt=prompt, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=3.5,
         generator=torch.Generator("cpu").manual_seed(seed), max_sequence_length=32, output_type="pil")
    return time.perf_counter() - start


def plain_batch(pipe, items: list[tuple[int, str]]) -> float:
    """One stock call for several prompts, each with its own seed's generator: what batching can gain in the model
    itself, with no service around it."""
    import torch

    start = time.perf_counter()
    pipe(prompt=[p for _, p in items], height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=3.5,
         generator=[torch.Generator("cpu").manual_seed(i) for i, _ in items], max_sequence_length=32,
         output_type="pil")
    return time.perf_counter() - start


def prompts(n: int) -> list[str]:
    return [f"a red fox number {i} in the snow at dawn" for i in range(n)]


def demo_kit(workdir: Path) -> Path:
    from service.models.demo import make_demo

    return make_demo(workdir / "kit")


GENERATION = ("adapters", "encode", "clip", "control", "denoise", "decode")  # the worker's model stages
STAGES = {  # stage -> what it spans, from the client's and the processes' wall-clock stamps
    "api_in": "client sends -> job enqueued (HTTP, validation, checks, the enqueue script)",
    "handoff": "enqueued -> a worker has started it (the stream read wakes, the start script)",
    "worker_bookkeeping": "started -> finished, less the model stages (job fields, per-step progress and cancel "
                          "checks, PNG encoding, metrics, the finish script)",
    "generation_vs_stock": "the worker's model stages minus the stock pipeline call",
    "api_out": "finished -> client has the answer (the wait wakes, the job is read, the response)",
}


def stages(job: dict, plain_s: float) -> dict[str, float]:
    """One job's added latency split by stage (seconds); the stages sum to its latency minus the stock call."""
    generation = sum(job["timings"].get(k, 0.0) for k in GENERATION)
    return {"api_in": job["created_at"] - job["sent_at"], "handoff": job["started_at"] - job["created_at"],
            "worker_bookkeeping": job["finished_at"] - job["started_at"] - generation,
            "generation_vs_stock": generation - plain_s, "api_out": job["received_at"] - job["finished_at"]}


def profile(pids: dict[str, int], out: Path) -> list[subprocess.Popen]:
    """py-spy sampling each process (no code change), until stopped with SIGINT; raw collapsed stacks in OUT. It
    reads the stacks without pausing the process (`--nonblocking`): a pause per sample would slow what it measures."""
    import shutil

    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if py_spy is None:
        raise SystemExit("BENCH_PROFILE needs py-spy on PATH or beside this Python: pip install -e '.[profile]'")
    out.mkdir(parents=True, exist_ok=True)
    return [subprocess.Popen([py_spy, "record", "--nonblocking", "--pid", str(pid), "--rate", "1000", "--format", "raw",
                              "--output", str(out / f"{name}.txt")], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
            for name, pid in pids.items()]


IDLE = ("select (", "Condition.wait", "wait (threading", "_wait_for_tstate_lock", "Event.wait")


def top_frames(path: Path, n: int = 15) -> dict:
    """What a collapsed-stacks file says, idle samples (a thread blocked in select or a wait) left out: the share of
    busy samples each frame of the project's own code is on (inclusive), and the frames most often on top (self)."""
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    busy = idle = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames, k = stack.split(";"), int(count)
        if any(mark in frames[-1] for mark in IDLE):
            idle += k
            continue
        busy += k
        for frame in set(frames):
            if "(service/" in frame and "(service/cli.py" not in frame:
                inclusive[frame] = inclusive.get(frame, 0) + k
        own[frames[-1]] = own.get(frames[-1], 0) + k
    share = lambda counts: [{"frame": f, "share": counts[f] / busy}  # noqa: E731
                            for f in sorted(counts, key=counts.get, reverse=True)[:n]] if busy else []
    return {"busy_samples": busy, "idle_samples": idle, "inclusive": share(inclusive), "self": share(own)}


def png_levels(reps: int = 5) -> list[dict]:
    """PNG encoding of one result by the service's encoder (libpng, run-length strategy, the Up row filter) at zlib
    level 1 (its default) and 6, beside libpng with its adaptive row filters (the service's encoder before it chose
    one filter) and PIL's encoder (before that) at the same levels, interleaved, the fastest of `reps` each (what the
    machine can do, with other load filtered out): a 1024x1024 image of smooth shapes with a little grain, as a
    diffusion model's output has."""
    import io

    import cv2
    import numpy as np
    from PIL import Image

    from service.worker.main import encode_image

    def pil(image, level: int) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=level)
        return buffer.getvalue()

    def adaptive(pixels, level: int) -> bytes:
        return cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, level, cv2.IMWRITE_PNG_STRATEGY,
                                             cv2.IMWRITE_PNG_STRATEGY_RLE])[1].tobytes()

    y, x = np.mgrid[0:1024, 0:1024] / 1024
    smooth = np.stack([np.sin(6 * x + 3 * y), np.cos(20 * x * y), x + y - 1], -1) * 100 + 128
    grain = np.random.default_rng(0).normal(0, 2, smooth.shape)
    image = Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8))
    bgr = cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2BGR)
    encoders = {("service (libpng, RLE, Up filter)", level): lambda level=level: encode_image(
        image, "png", png_compress_level=level) for level in (1, 6)}
    encoders.update({("libpng, RLE, adaptive filters", level): lambda level=level: adaptive(bgr, level)
                     for level in (1, 6)})
    encoders.update({("PIL", level): lambda level=level: pil(image, level) for level in (1, 6)})
    best: dict[tuple, float] = {}
    size: dict[tuple, int] = {}
    for _ in range(reps):
        for key, encode in encoders.items():
            start = time.perf_counter()
            size[key] = len(encode())
            best[key] = min(best.get(key, float("inf")), time.perf_counter() - start)
    return [{"encoder": name, "png_level": level, "ms": best[(name, level)] * 1000,
             "kib": size[(name, level)] / 1024} for name, level in encoders]


def round_trips(n: int = 400) -> dict:
    """One Redis round trip (PING) from a process that has just been busy against one from a process that has slept
    5 ms (as every process on the job's path has, between its turns), over loopback TCP and through the server's
    unix socket, interleaved, p50 in microseconds: what a hand-off between two processes costs on this machine
    beyond the work itself, by transport."""
    import redis

    with EmbeddedRedis() as server:
        clients = {"tcp": redis.Redis.from_url(server.url), "unix": redis.Redis.from_url(server.local_url)}
        times: dict[str, list[float]] = {f"{name}_{when}": [] for name in clients for when in ("busy", "idle")}
        for i in range(n):
            for name in (("tcp", "unix") if i % 2 == 0 else ("unix", "tcp")):
                client = clients[name]
                client.ping()
                start = time.perf_counter()
                client.ping()
                times[f"{name}_busy"].append(time.perf_counter() - start)
                time.sleep(0.005)
                start = time.perf_counter()
                client.ping()
                times[f"{name}_idle"].append(time.perf_counter() - start)
        for client in clients.values():
            client.close()
    return {f"{key}_us": percentile(values, 50) * 1e6 for key, values in times.items()}


def cpu_ns(pid: int) -> int:
    """Nanoseconds the process's main thread has run on a CPU (Linux's scheduler statistics)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


def wake_penalty(reps: int = 200) -> dict:
    """The same piece of the API's own Python (a job's view built from its stored fields, then its JSON) timed back
    to back and after sleeping 40 ms, as every process on a job's path sleeps while the model runs, interleaved, p50
    in microseconds: how much slower this machine runs code that has just woken (caches and predictors cold)."""
    from service.jobs import job_view

    fields = {"id": "x" * 22, "status": "succeeded", "request": json.dumps({"pipeline": "flux", "encoder": "t5-xxl",
              "prompt": "a red fox", "seed": 1}), "created_at": "1.0", "started_at": "1.1", "finished_at": "1.2",
              "seed": "1", "timings": json.dumps({k: 0.01 for k in GENERATION}), "images": "1"}

    def work() -> None:
        job_view(fields, position=None, base_url="http://127.0.0.1").model_dump_json()

    work()
    warm, woken = [], []
    for _ in range(reps):
        start = time.perf_counter()
        work()
        warm.append(time.perf_counter() - start)
        time.sleep(0.04)
        start = time.perf_counter()
        work()
        woken.append(time.perf_counter() - start)
    return {"warm_us": percentile(warm, 50) * 1e6, "woken_us": percentile(woken, 50) * 1e6}


def run_overhead(tiny: bool = False) -> dict:
    """Set BENCH_PROFILE=DIR to sample the API and the worker (of the service the figure is taken on) with py-spy
    during the served jobs as well.

    Two services run side by side: one whose API and worker reach Redis over loopback TCP (as `t2i serve` connects
    them: the figure and the target) and one through the server's unix socket. Each prompt is served four times, on
    each service through the standard library's client and through httpx (what figures before the fourth round
    used), each call after a stock call, in an order that rotates from prompt to prompt."""
    n = 10 if tiny else 150
    profile_dir = os.environ.get("BENCH_PROFILE")
    profiles: dict[str, list[dict]] = {}
    routes = [(transport, client) for transport in ("tcp", "unix") for client in ("http.client", "httpx")]
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as running:  # clients closed, then services
        kit = demo_kit(Path(tmp))
        pipe = stock_pipeline(kit)
        plain_call(pipe, "warm up", 0)
        services: dict[str, Service] = {}
        for transport in ("tcp", "unix"):
            services[transport] = Service(kit / "models.yaml", {"T2I_EMBEDDING_CACHE": "false"}, Path(tmp),
                                          transport=transport)
            running.callback(services[transport].stop)
        clients: dict[tuple[str, str], object] = {}
        for transport, client in routes:
            url = services[transport].url
            clients[(transport, client)] = running.enter_context(
                PlainClient(url, 120) if client == "http.client" else httpx.Client(base_url=url, timeout=120))
        for route, client in clients.items():
            services[route[0]].generate(client, "warm up", 0)
        figure = services["tcp"]
        samplers = profile(figure.pids, Path(profile_dir)) if profile_dir else []
        plain: list[float] = []
        runs = {route: {"served": [], "worker": [], "split": [], "client_cpu": [], "api_cpu": [],
                        "redis_cpu": []} for route in routes}
        for i, prompt in enumerate(prompts(n)):  # rotating: every route sees the same machine state
            for route in routes[i % len(routes):] + routes[:i % len(routes)]:
                service = services[route[0]]
                pids = {"api": service.pids["api"], "redis": service.redis.process.pid}
                plain.append(plain_call(pipe, prompt, i))
                run, before = runs[route], {k: cpu_ns(p) for k, p in pids.items()}
                own = time.thread_time()
                elapsed, job = service.generate(clients[route], prompt, i)
                run["client_cpu"].append(time.thread_time() - own)
                for k, p in pids.items():
                    run[f"{k}_cpu"].append((cpu_ns(p) - before[k]) / 1e9)
                run["served"].append(elapsed)
                run["worker"].append(job["timings"]["total"])
                run["split"].append(stages(job, plain[-1]))
        for sampler in samplers:
            sampler.send_signal(signal.SIGINT)
            sampler.wait(60)
        if profile_dir:
            profiles = {name: top_frames(Path(profile_dir) / f"{name}.txt") for name in ("api", "worker")}
    p50_plain = percentile(plain, 50)
    by_route = []
    for transport, client in routes:
        run = runs[(transport, client)]
        # What the service adds around the model, job by job: the stock call's own time varies by several ms from
        # call to call, so served-minus-stock is the noisier figure; this one never credits a model call that ran
        # faster.
        by_route.append({
            "redis": transport, "client": client, "p50_s": percentile(run["served"], 50),
            "p95_s": percentile(run["served"], 95),
            "outside_model_p50_ms": percentile([sum(v for k, v in s.items() if k != "generation_vs_stock")
                                                for s in run["split"]], 50) * 1000,
            "stages_p50_ms": {k: percentile([s[k] for s in run["split"]], 50) * 1000 for k in STAGES},
            **{f"{k}_ms_per_job": sum(run[k]) / len(run[k]) * 1000 for k in ("client_cpu", "api_cpu", "redis_cpu")},
        })
    lean, lean_run = by_route[0], runs[routes[0]]
    for row in by_route:
        print(f"  Redis over {row['redis']}, {row['client']}: added latency by stage (p50, ms): "
              + ", ".join(f"{k} {v:.2f}" for k, v in row["stages_p50_ms"].items())
              + f"; outside the model {row['outside_model_p50_ms']:.2f}")
    record = {
        "command": "python -m bench run overhead" + (" --tiny" if tiny else ""), "jobs": n * len(routes),
        "setting": f"demo FLUX kit, {SIZE}x{SIZE}, {STEPS} steps, 1 thread per process, sequential, interleaved, "
                   "worker with batching on as by default (T2I_MAX_BATCH=8) and the embedding cache off (every prompt "
                   "is new); the figures and the target are those of the API and worker reaching Redis over loopback "
                   "TCP (as `t2i serve` connects them) and of the standard library's client (`http.client`)",
        "rows": [
            {"route": "stock FluxPipeline loop", "p50_s": p50_plain, "p95_s": percentile(plain, 95)},
            *({"route": f"HTTP + queue + worker (Redis over {row['redis']}, {row['client']})", "p50_s": row["p50_s"],
               "p95_s": row["p95_s"]} for row in by_route),
            {"route": "  of which inside the worker (tcp, http.client)", "p50_s": percentile(lean_run["worker"], 50),
             "p95_s": percentile(lean_run["worker"], 95)},
        ],
        "added_p50_ms": (lean["p50_s"] - p50_plain) * 1000, "outside_model_p50_ms": lean["outside_model_p50_ms"],
        "http_and_queue_p50_ms": (lean["p50_s"] - percentile(lean_run["worker"], 50)) * 1000,
        "stages_p50_ms": lean["stages_p50_ms"], "stages": STAGES, "clients": by_route, "profile": profiles,
        "png_1024": png_levels(2 if tiny else 5), "redis_round_trip": round_trips(50 if tiny else 400),
        "wake_penalty": wake_penalty(20 if tiny else 200),
        "targets": [target("p50 added latency per job, outside the model", lean["outside_model_p50_ms"], "<=", 5,
                           " ms")],
    }
    save("overhead", record)
    return record


def _load(service: Service, n: int, concurrency: int, client: str = "http.client"
          ) -> tuple[float, list[float], list[int]]:
    """`n` jobs from `concurrency` clients (threads, each with its own keep-alive connection, through `client`:
    "http.client" or "httpx"); returns (jobs/s, latencies, batch sizes)."""
    items = list(enumerate(prompts(n)))
    latencies: list[float] = []
    batches: list[int] = []

    def connect():
        if client == "httpx":
            return httpx.Client(base_url=service.url, timeout=300)
        return PlainClient(service.url, 300)

    def client_loop(chunk):
        with connect() as connection:
            for i, prompt in chunk:
                elapsed, job = service.generate(connection, prompt, i)
                latencies.append(elapsed)
                batches.append(job.get("batch_size") or 1)

    chunks = [items[k::concurrency] for k in range(concurrency)]
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client_loop, chunks))
    return n / (time.perf_counter() - start), latencies, batches


def run_throughput(tiny: bool = False) -> dict:
    """The load comes from 16 threads of this process on the same cores as the service, so a client's own CPU
    time is taken from the service: the figures and targets are those of the standard library's `http.client` (as
    the overhead benchmark's), and httpx's rows (what figures before the fifth round used) run beside them on the
    same services, to show what a heavier client costs."""
    n, concurrency = (32, 16) if tiny else (320, 16)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        kit = demo_kit(Path(tmp))
        pipe = stock_pipeline(kit)
        plain_call(pipe, "warm up", 0)
        start = time.perf_counter()
        plain = [plain_call(pipe, p, i) for i, p in enumerate(prompts(n // 2))]
        rows.append({"route": "stock FluxPipeline loop (sequential)", "client": "-", "jobs_per_s": (n // 2) / (
                     time.perf_counter() - start), "p50_s": percentile(plain, 50), "p95_s": percentile(plain, 95),
                     "mean_batch": 1.0})
        # The model's own gain from batching: the same pipeline called with the default batch's number of prompts at
        # once. The service's on/off ratio cannot exceed it by much, whatever the service does around the model.
        default = Settings().max_batch
        items = list(enumerate(prompts(n // 2)))
        start = time.perf_counter()
        calls = [plain_batch(pipe, items[k:k + default]) for k in range(0, len(items), default)]
        rows.append({"route": f"stock FluxPipeline, {default} prompts per call", "client": "-",
                     "jobs_per_s": len(items) / (time.perf_counter() - start), "p50_s": percentile(calls, 50),
                     "p95_s": percentile(calls, 95), "mean_batch": float(default)})
        del pipe
        for max_batch in (1, 4, 8):
            service = Service(kit / "models.yaml", {"T2I_MAX_BATCH": str(max_batch), "T2I_EMBEDDING_CACHE": "false"},
                              Path(tmp))
            try:
                with PlainClient(service.url, 120) as client:
                    service.generate(client, "warm up", 0)
                for client in ("http.client", "httpx") if max_batch != 4 else ("http.client",):
                    rate, latencies, batches = _load(service, n, concurrency, client)
                    rows.append({"route": f"service, concurrency {concurrency}, T2I_MAX_BATCH={max_batch}",
                                 "client": client, "jobs_per_s": rate, "p50_s": percentile(latencies, 50),
                                 "p95_s": percentile(latencies, 95), "mean_batch": sum(batches) / len(batches)})
            finally:
                service.stop()
    def row(max_batch: int, client: str) -> dict:
        return next(r for r in rows if r["route"].endswith(f"T2I_MAX_BATCH={max_batch}") and r["client"] == client)

    off, on = row(1, "http.client"), row(default, "http.client")
    model_gain = rows[1]["jobs_per_s"] / rows[0]["jobs_per_s"]
    record = {
        "command": "python -m bench run throughput" + (" --tiny" if tiny else ""), "jobs": n,
        "concurrency": concurrency,
        "setting": f"demo FLUX kit, {SIZE}x{SIZE}, {STEPS} steps, one worker with 1 thread, embedding cache off",
        "rows": rows,
        "targets": [
            target(f"jobs/s, batching on (default, {default}) vs off", on["jobs_per_s"] / off["jobs_per_s"], ">=", 3,
                   "x"),
            target(f"p95 latency, batching on (default, {default}) vs off", on["p95_s"] / off["p95_s"], "<=", 1, "x"),
        ],
        "httpx_on_vs_off": row(default, "httpx")["jobs_per_s"] / row(1, "httpx")["jobs_per_s"],
        "model_batching_gain": model_gain,
        "share_of_model_gain": on["jobs_per_s"] / off["jobs_per_s"] / model_gain,
    }
    save("throughput", record)
    return record


def run_startup(tiny: bool = False) -> dict:
    runs = 2 if tiny else 5
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        kit = demo_kit(Path(tmp))
        for _ in range(runs):
            service = Service(kit / "models.yaml", {"T2I_EMBEDDING_CACHE": "false"}, Path(tmp))
            try:
                with httpx.Client(base_url=service.url, timeout=120) as client:
                    first, _ = service.generate(client, "the first prompt", 1)
                    warm, _ = service.generate(client, "the second prompt", 2)
                rows.append({"ready_s": service.worker_ready_s, "first_job_s": first, "warm_job_s": warm})
            finally:
                service.stop()
    ready = sorted(r["ready_s"] for r in rows)
    record = {
        "command": "python -m bench run startup" + (" --tiny" if tiny else ""), "runs": runs, "rows": rows,
        "setting": "demo kit (FLUX + SD3 denoisers loaded at start; encoders on first use), 1 thread",
        "ready_p50_s": percentile(ready, 50),
        "first_job_p50_s": percentile([r["first_job_s"] for r in rows], 50),
        "warm_job_p50_s": percentile([r["warm_job_s"] for r in rows], 50),
        "targets": [],
    }
    save("startup", record)
    return record

