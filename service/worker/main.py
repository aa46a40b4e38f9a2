"""The GPU worker: holds the denoisers and the encoders, takes jobs from the queue and runs them one at a time.

    T2I_REDIS_URL=redis://127.0.0.1:6379 t2i worker                       # every pipeline and encoder
    T2I_WORKER_ENCODERS=t5-base,t5-small T2I_WORKER_PIPELINES=flux t2i worker   # a subset

Run one per GPU (CUDA_VISIBLE_DEVICES), on as many hosts as needed, against one Redis. SIGTERM (or Ctrl-C)
finishes the job in flight, claims no more and exits 0. The worker serves `/metrics` and `/healthz` on
`T2I_WORKER_METRICS_PORT`.
"""

from __future__ import annotations

import gc
import io
import json
import logging
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
import redis
import torch

from service import metrics
from service.errors import CancelledError, ConfigError, T2IError, ValidationError
from service.jobs import JobStatus
from service.models.encoder import TextEncoder
from service.models.encoder_pool import EncoderPool
from service.models.control import decode_image
from service.models.embedding_cache import EmbeddingCache
from service.models.generation import ControlInput, GenerationRequest, GenerationResult, Generator, batch_key
from service.models.registry import Registry
from service.models.sizes import encoder_row
from service.queue import stream_key
from service.settings import Settings
from service.worker.consumer import Claim, Consumer
from service.worker.embedding_store import RedisEmbeddingStore
from service.worker.health import HealthServer
from service.worker.memory import peak_bytes, reset_peak

log = logging.getLogger("t2i.worker")

PIL_FORMATS = {"webp": ("WEBP", {"quality": 90}), "jpeg": ("JPEG", {"quality": 95})}  # PNG: encode_image


class Worker:
    def __init__(self, settings: Settings, registry: Registry):
        self.settings = settings
        self.registry = registry
        if settings.log_prompts:  # the operator asked for prompts in the logs (they may be private)
            log.setLevel(logging.INFO)
        # Host and pid name it for people; the random part keeps it unique where they repeat (containers on the host
        # network all run as pid 1 on the same host name).
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.pipelines = settings.worker_pipelines or list(registry.pipelines)
        self.encoder_names = settings.worker_encoders or list(registry.encoders)
        for name in self.pipelines:
            registry.pipeline(name)
        for name in self.encoder_names:
            registry.encoder(name)
        self.generator = Generator(registry, encoders=EncoderPool(
            settings.encoder_memory_budget_bytes, on_evict=self._evicted, on_load=self._loaded))
        self.stopping = threading.Event()
        self.current: list[Claim] = []
        self.jobs_done = 0
        self.last_batch = 1  # jobs in the last denoising call: whether jobs arrive together (then wait for mates)
        self.started_at = time.time()
        self.health: HealthServer | None = None
        self.encoder_facts: dict[str, dict] = {}
        self._unanswered: tuple[list[Job], Callable, float] | None = None  # start scripts sent, answers not read

    # -- the main loop -----------------------------------------------------------------------------------------
    def run(self) -> int:
        # 1. Load every served denoiser once, and check every served encoder's width against them now (from its
        #    config), so a misfit stops the worker at start, not a job later.
        for name in self.pipelines:
            denoiser = self.generator.denoiser(name)
            metrics.DENOISER_RESIDENT_BYTES.labels(name, str(denoiser.device)).set(denoiser.num_bytes)
        for name in self.encoder_names:
            row = encoder_row(self.registry.encoder(name))
            self.encoder_facts[name] = {"params": row.params, "bytes": row.bytes, "width": row.width,
                                        "device": row.device, "dtype": row.dtype, "quantization": row.quantization}
            for pipeline in self.pipelines:
                if row.width is not None:
                    self.generator.denoiser(pipeline).check_encoder_width(name, row.width)

        # 2. Connect, and make sure the consumer groups exist.
        #    TCP keep-alive finds a dead peer across a network; a unix socket (a Redis on this host) has no such option.
        tcp = not self.settings.redis_url.startswith("unix:")
        client = redis.Redis.from_url(self.settings.redis_url, health_check_interval=10,
                                      **({"socket_keepalive": True} if tcp else {}))
        streams = [stream_key(p, e) for p in self.pipelines for e in self.encoder_names]
        self.consumer = Consumer(client, self.worker_id, streams,
                                 visibility_timeout_s=self.settings.visibility_timeout_s,
                                 result_ttl_s=self.settings.result_ttl_s)
        self._with_retry(self.consumer.ensure_groups)
        self._with_retry(self.consumer.listen_for_cancels)
        if self.settings.embedding_cache:  # in memory, and shared in Redis when it has a byte budget
            store = RedisEmbeddingStore(
                client, max_bytes=self.settings.embedding_cache_bytes, ttl_s=self.settings.embedding_cache_ttl_s,
                max_entry_bytes=self.settings.embedding_cache_max_entry_bytes,
            ) if self.settings.embedding_cache_bytes > 0 else None
            self.generator.embedding_cache = EmbeddingCache(
                self.settings.embedding_cache_local_bytes, store,
                on_lookup=lambda encoder, result: metrics.EMBEDDING_CACHE.labels(encoder, result).inc())

        # 3. Health and metrics endpoint, heartbeat thread, signals.
        self.health = HealthServer(self.settings.worker_metrics_host, self.settings.worker_metrics_port,
                                   ready=lambda: not self.stopping.is_set())
        self.health.start()
        threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True).start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        log.info("worker %s ready: pipelines %s, encoders %s, metrics on :%d", self.worker_id, self.pipelines,
                 self.encoder_names, self.health.port)
        print(f"worker {self.worker_id} ready (metrics http://{self.settings.worker_metrics_host}:"
              f"{self.health.port}/metrics)", flush=True)

        # 4. Claim and run jobs until told to stop; a failing job never ends the loop.
        while not self.stopping.is_set():
            try:
                claims = self.consumer.claim(block_ms=1000, count=self.settings.max_batch)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("redis unreachable (%s); retrying", exc)
                self.stopping.wait(1.0)
                continue
            by_stream: dict[str, list[Claim]] = {}
            for claim in claims:
                by_stream.setdefault(claim.stream, []).append(claim)
            for stream_claims in by_stream.values():
                self.process(stream_claims)

        # 5. Leave cleanly: no heartbeat left behind.
        self._with_retry(self.consumer.leave, attempts=3)
        self.health.stop()
        print(f"worker {self.worker_id} stopped after {self.jobs_done} jobs", flush=True)
        return 0

    # -- jobs ----------------------------------------------------------------------------------------------------
    def process(self, claims: list[Claim]) -> None:
        """Run jobs claimed together from one stream (those queued at the claim, up to T2I_MAX_BATCH), sharing a
        denoising call where they can. Only when the last call was a batch (jobs are arriving together) does it
        wait up to T2I_BATCH_WAIT_MS for more: a lone job never waits, and costs no further read."""
        if (self.settings.max_batch > len(claims) and self.last_batch > 1
                and not any(c.redelivered for c in claims)):
            claims += self._with_retry(lambda: self.consumer.claim_more(
                claims[0].stream, self.settings.max_batch - len(claims), self.settings.batch_wait_ms)) or []
        jobs = self._start_unanswered(claims) if all(c.entry and not c.redelivered for c in claims) else []
        if not jobs:
            started = self._with_retry(lambda: self.consumer.start(claims))
            for c, (status, fields) in zip(claims, started):
                if status != "running":
                    self._with_retry(lambda c=c: self.consumer.release(c))
                    continue
                jobs.append(Job(c, fields, json.loads(fields["request"])))
        groups: dict[tuple, list[Job]] = {}
        for job in jobs:
            try:
                job.request = _request(job.params, self._control(job.params.get("control")))
                key = batch_key(job.request)
            except T2IError as exc:  # a bad control image: this job fails alone
                job.request, key = None, ("failed", job.claim.job_id, exc)
            groups.setdefault(key, []).append(job)
        for key, group in groups.items():
            self.run_batch(group, error=key[2] if key[0] == "failed" else None)

    def _start_unanswered(self, claims: list[Claim]) -> list["Job"]:
        """Jobs whose entries carry their requests start without a round trip: their start scripts are sent, and the
        answers read at the first denoising step (`_confirm`). [] when even the sending failed (then `start`)."""
        now = time.time()
        try:
            answers = self.consumer.start_unanswered(claims, now)
        except redis.RedisError as exc:
            log.warning("start scripts not sent (%s); starting with a round trip", exc)
            return []
        jobs = [Job(c, {**c.entry, "started_at": repr(now)}, json.loads(c.entry["request"]), running=None)
                for c in claims]
        self._unanswered = (jobs, answers, now)
        return jobs

    def _confirm(self) -> None:
        """Read the answers to start scripts sent unanswered, once: a job that is not running after all (cancelled
        while queued, finished by another run, expired) is marked so (`running` False) and its result dropped. If the
        answers cannot be read, the jobs are started again with a round trip."""
        if self._unanswered is None:
            return
        jobs, answers, now = self._unanswered
        self._unanswered = None
        try:
            started = answers()
        except redis.RedisError as exc:
            log.warning("start answers lost (%s); starting again with a round trip", exc)
            started = self._with_retry(lambda: self.consumer.start([job.claim for job in jobs], now))
        for job, (status, _fields) in zip(jobs, started):
            job.running = status == "running"

    def run_batch(self, jobs: list["Job"], error: T2IError | None = None) -> None:
        """Denoise these jobs in one call and store each one's own result; a failure fails them all readably and
        the worker keeps serving."""
        pipeline, encoder_name = jobs[0].params["pipeline"], jobs[0].params["encoder"]
        for job in jobs:
            if job.claim.redelivered:
                metrics.JOBS_REDELIVERED.labels(pipeline, encoder_name).inc()
            job.queue_wait = max(float(job.fields["started_at"]) - float(job.fields["created_at"]), 0.0)
            metrics.QUEUE_WAIT_SECONDS.observe(job.queue_wait)
        self.current = [job.claim for job in jobs]
        self.last_batch = len(jobs)
        start = time.perf_counter()
        device = torch.device("cpu")
        results: list[GenerationResult] = []
        try:
            if error is not None:
                raise error
            denoiser = self.generator.denoiser(pipeline)
            device = denoiser.device
            reset_peak(device)
            oom_at = self.settings.fault_oom_at_job  # fault injection: a CPU cannot run out of device memory at will
            if oom_at and self.jobs_done < oom_at <= self.jobs_done + len(jobs):
                raise torch.OutOfMemoryError(f"CUDA out of memory (simulated by T2I_FAULT_OOM_AT_JOB={oom_at})")
            if self.settings.log_prompts:
                for job in jobs:
                    log.info("job %s prompt: %s", job.claim.job_id, job.request.prompt)
            cancelled, last_report, progress = [False], [time.monotonic()], {}

            def on_step(step: int, steps: int) -> None:
                # progress at most every T2I_PROGRESS_INTERVAL_S, the last step's with the result (the finish
                # script stores it); a cancel message at any step, the cancel flag with each progress report
                self._confirm()
                ids = [job.claim.job_id for job in jobs if job.running]
                if not ids:  # every job of the call ended before it started here (cancelled while queued)
                    cancelled[0] = True
                    return
                now = time.monotonic()
                progress.update(step=step, steps=steps)
                report = step < steps and now - last_report[0] >= self.settings.progress_interval_s
                if report:
                    last_report[0] = now
                flags = self._with_retry(lambda: self.consumer.step(ids, step, steps, report=report))
                cancelled[0] = bool(flags) and all(flags)

            results = self.generator.generate_batch([job.request for job in jobs], on_step=on_step,
                                                    should_stop=lambda: cancelled[0])
            metrics.BATCH_SIZE.labels(pipeline).observe(len(jobs))
            outcome, failure = JobStatus.succeeded, None
        except CancelledError as exc:
            outcome, failure = JobStatus.cancelled, {"error": exc.message, "error_type": exc.error_type}
        except T2IError as exc:
            outcome, failure = JobStatus.failed, {"error": exc.message, "error_type": exc.error_type}
        except torch.OutOfMemoryError as exc:
            outcome, failure = JobStatus.failed, {
                "error": f"out of device memory on {device}: {str(exc).splitlines()[0]}", "error_type": "generation"}
        except Exception as exc:  # the error boundary: the jobs fail readably, the worker keeps serving
            log.exception("jobs %s failed", [job.claim.job_id for job in jobs])
            outcome, failure = JobStatus.failed, {"error": f"{type(exc).__name__}: {exc}", "error_type": "internal"}
        finally:
            self.current = []
            self.consumer.forget_cancels([job.claim.job_id for job in jobs])
        if outcome != JobStatus.succeeded:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        elapsed = time.perf_counter() - start
        peak = peak_bytes(device)
        self._confirm()
        for job in jobs:
            if not job.running:
                self._with_retry(lambda job=job: self.consumer.release(job.claim))
        outcomes, kept = [], [job for job in jobs if job.running]
        if not kept:
            return
        for i, job in enumerate(jobs):
            if not job.running:
                continue
            job_outcome, stored, images = outcome, dict(failure or {}), []
            if outcome == JobStatus.succeeded:
                job_outcome, stored, images = self._stored(job, results[i], device, peak, elapsed)
                stored.update(progress)
            outcomes.append((job.claim, job_outcome, stored, images))
        stored_as = self._with_retry(lambda: self.consumer.finish(outcomes))
        if outcome == JobStatus.succeeded:  # the stage metrics after the results, off the jobs' latency
            for i, job in enumerate(jobs):
                if job.running:
                    self._observe(pipeline, encoder_name, results[i], with_loras=bool(job.params.get("loras")),
                                  with_control=job.params.get("control") is not None)
        for job, (_, job_outcome, _, _), as_stored in zip(kept, outcomes, stored_as):
            if as_stored is None:
                log.warning("job %s was already finished by another run; this result is dropped", job.claim.job_id)
            else:
                job_outcome = as_stored  # a success whose job was cancelled meanwhile is stored as cancelled
            metrics.JOBS.labels(pipeline, encoder_name, job_outcome.value).inc()
            metrics.JOB_SECONDS.labels(pipeline, encoder_name).observe(elapsed)
            metrics.JOB_PEAK_MEMORY_BYTES.labels(pipeline, encoder_name, str(device)).set(peak)
            self.jobs_done += 1

    def _stored(self, job: "Job", result: GenerationResult, device: torch.device, peak: int,
                elapsed: float) -> tuple[JobStatus, dict, list[bytes]]:
        """What a succeeded job stores: images, seed, timings, peak memory (and its prompt embedding for compare
        runs). A job cancelled while its batch ran is stored as cancelled by the finish script."""
        params = job.params
        fmt = params.get("output_format", "png")
        images = [encode_image(im, fmt, png_compress_level=self.settings.png_compress_level) for im in result.images]
        timings = {"queue_wait": job.queue_wait, **result.timings, "total": elapsed}
        stored = {"seed": result.seed, "timings": json.dumps(timings), "warnings": json.dumps(result.warnings),
                  "content_type": fmt, "device": str(device), "peak_memory_bytes": peak,
                  "batch_size": result.batch_size}
        if job.fields.get("keep_embedding") == "1" and result.embedding is not None:
            embedding = result.embedding.to(torch.float16)
            ttl = int(job.fields.get("ttl") or self.settings.result_ttl_s)
            self._with_retry(lambda: self.consumer.store_embedding(job.claim.job_id, embedding.numpy().tobytes(),
                                                                   ttl))
            stored["embedding_shape"] = ",".join(map(str, embedding.shape))
        return JobStatus.succeeded, stored, images

    def _control(self, control: dict | None) -> ControlInput | None:
        """The job's control image, fetched by upload id and decoded (checked again: the worker trusts no bytes)."""
        if control is None:
            return None
        data = self._with_retry(lambda: self.consumer.upload(control["image_id"]))
        if data is None:
            raise ValidationError(f"control image upload {control['image_id']!r} expired before the job ran "
                                  f"(T2I_UPLOAD_TTL_S={self.settings.upload_ttl_s})", field="control.image_id")
        image = decode_image(data, field="control.image", max_bytes=self.settings.max_image_bytes)
        return ControlInput(name=control["name"], image=image, mode=control.get("mode"),
                            preprocess=control.get("preprocess", "auto"), canny_low=control.get("canny_low", 100),
                            canny_high=control.get("canny_high", 200), scale=control.get("scale"),
                            start=control.get("start", 0.0), end=control.get("end", 1.0))

    def _observe(self, pipeline: str, encoder: str, result: GenerationResult, with_loras: bool,
                 with_control: bool) -> None:
        metrics.ADAPTER_JOBS.labels(pipeline, "with" if with_loras else "without").inc()
        metrics.CONTROL_JOBS.labels(pipeline, "with" if with_control else "without").inc()
        if result.timings["adapters"] > 0:
            metrics.ADAPTER_SWITCH_SECONDS.labels(pipeline).observe(result.timings["adapters"])
        metrics.ENCODE_SECONDS.labels(encoder).observe(result.timings["encode"])
        metrics.DENOISE_SECONDS.labels(pipeline).observe(result.timings["denoise"])
        metrics.DECODE_SECONDS.labels(pipeline).observe(result.timings["decode"])
        for resident in self.generator.encoders:
            metrics.ENCODER_RESIDENT_BYTES.labels(resident.name, str(resident.device)).set(resident.num_bytes)

    def _loaded(self, encoder: TextEncoder, seconds: float) -> None:
        metrics.ENCODER_LOAD_SECONDS.labels(encoder.name).observe(seconds)
        metrics.ENCODER_RESIDENT_BYTES.labels(encoder.name, str(encoder.device)).set(encoder.num_bytes)

    def _evicted(self, encoder: TextEncoder) -> None:
        metrics.ENCODER_RESIDENT_BYTES.labels(encoder.name, str(encoder.device)).set(0)
        metrics.ENCODER_EVICTIONS.labels(encoder.name).inc()

    # -- liveness ----------------------------------------------------------------------------------------------
    def facts(self) -> dict:
        resident = {e.name: str(e.device) for e in self.generator.encoders}
        return {
            "id": self.worker_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "metrics_port": self.health.port if self.health else None,
            "started_at": self.started_at,
            "jobs_done": self.jobs_done,
            "current_jobs": [c.job_id for c in self.current],
            "pipelines": {
                name: {"family": d.family, "size_multiple": d.size_multiple, "width": d.joint_attention_dim,
                       "params": d.num_params, "bytes": d.num_bytes, "device": str(d.device),
                       "dtype": str(d.dtype).removeprefix("torch.")}
                for name, d in self.generator.denoisers.items()
            },
            "encoders": {
                name: {**facts, "resident": name in resident, **({"device": resident[name]} if name in resident else {})}
                for name, facts in self.encoder_facts.items()
            },
        }

    def _heartbeat_loop(self) -> None:
        period = self.settings.heartbeat_s
        while not self.stopping.is_set():
            try:
                self.consumer.heartbeat(self.facts(), ttl_s=3 * period)
                for claim in list(self.current):
                    self.consumer.refresh(claim)
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)
            self.stopping.wait(period)

    def _with_retry(self, call, attempts: int = 0):
        """Run a Redis call, retrying with backoff while Redis is unreachable (forever unless `attempts`)."""
        delay, tried = 0.2, 0
        while True:
            try:
                return call()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                tried += 1
                if attempts and tried >= attempts:
                    log.warning("giving up on redis after %d tries: %s", tried, exc)
                    return None
                log.warning("redis unreachable (%s); retrying in %.1fs", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)


@dataclass
class Job:
    """A claimed, started job: its claim, its stored fields, its request as sent and as the generator takes it."""

    claim: Claim
    fields: dict[str, str]
    params: dict
    request: GenerationRequest | None = None
    queue_wait: float = 0.0
    running: bool | None = True  # None: its start script's answer is not read yet (Worker._confirm)


def _request(params: dict, control: ControlInput | None = None) -> GenerationRequest:
    return GenerationRequest(
        prompt=params["prompt"], pipeline=params["pipeline"], encoder=params["encoder"], width=params.get("width"),
        height=params.get("height"), steps=params.get("steps"), guidance=params.get("guidance"),
        seed=params.get("seed"), negative_prompt=params.get("negative_prompt"),
        num_images=params.get("num_images", 1),
        loras=tuple((ref["name"], ref.get("scale")) for ref in params.get("loras", [])),
        control=control,
    )


def encode_image(image, output_format: str, *, png_compress_level: int = 1) -> bytes:
    """The bytes a job stores for one image: PNG at zlib level `png_compress_level`, WebP and JPEG at fixed
    qualities. PNG goes through libpng (OpenCV) with zlib's run-length strategy and one row filter (Up) instead of
    libpng's adaptive choice among all five, which tries each on every row: on a 1024x1024 result that is 1.6-1.9x
    as fast for a file 5-11% larger, and about 3x as fast as PIL's encoder (docs/benchmarks.md, service overhead).
    Level 0 stores rows unfiltered: a filter only helps compression."""
    if output_format == "png":
        if image.mode not in ("RGB", "RGBA", "L"):
            image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        pixels = np.asarray(image)
        if pixels.ndim == 3:  # OpenCV orders channels blue first
            pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR if image.mode == "RGB" else cv2.COLOR_RGBA2BGRA)
        row_filter = cv2.IMWRITE_PNG_FILTER_UP if png_compress_level else cv2.IMWRITE_PNG_FILTER_NONE
        ok, data = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, png_compress_level,
                                                 cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE,
                                                 cv2.IMWRITE_PNG_FILTER, row_filter])
        if not ok:
            raise RuntimeError(f"PNG encoding failed for a {image.mode} image of {image.size}")
        return data.tobytes()
    fmt, options = PIL_FORMATS[output_format]
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def run(settings: Settings, registry: Registry) -> int:
    if not settings.redis_url:
        raise ConfigError("`T2I_REDIS_URL` is not set: a worker needs the queue's Redis", field="redis_url")
    return Worker(settings, registry).run()
