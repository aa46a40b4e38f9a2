"""Every Prometheus metric of t2i-slim, declared once. Each process serves its own `/metrics`.

Names: `t2i_` prefix, unit suffixes (`_seconds`, `_bytes`, `_total`); label values are registry names (`encoder`,
`pipeline`) or the API's error types (`status`). The worker fills the per-encoder and per-pipeline series, the API
the service-wide ones.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)

# -- worker: per encoder ---------------------------------------------------------------------------------------
ENCODE_SECONDS = Histogram(
    "t2i_encode_duration_seconds", "Time to encode a prompt with the T5 encoder.", ["encoder"],
    buckets=LATENCY_BUCKETS,
)
JOB_SECONDS = Histogram(
    "t2i_job_duration_seconds", "Time a worker spent on a job, from claim to result.", ["pipeline", "encoder"],
    buckets=LATENCY_BUCKETS,
)
JOBS = Counter("t2i_jobs_total", "Jobs finished by a worker, by final status.", ["pipeline", "encoder", "status"])
ENCODER_RESIDENT_BYTES = Gauge(
    "t2i_encoder_resident_bytes", "Bytes of an encoder's weights resident on its device (0 once evicted).",
    ["encoder", "device"],
)
JOB_PEAK_MEMORY_BYTES = Gauge(
    "t2i_job_peak_memory_bytes",
    "Peak memory during the last job (CUDA: max_memory_allocated reset per job; CPU: peak RSS reset per job).",
    ["pipeline", "encoder", "device"],
)
ENCODER_LOAD_SECONDS = Histogram(
    "t2i_encoder_load_duration_seconds", "Time to load an encoder (a switch to a non-resident one).", ["encoder"],
    buckets=LATENCY_BUCKETS,
)
EMBEDDING_CACHE = Counter(
    "t2i_embedding_cache_requests_total",
    "Prompt-embedding lookups per encoder: hit_local (this worker), hit_shared (Redis), miss (the encoder ran).",
    ["encoder", "result"],
)
BATCH_SIZE = Histogram(
    "t2i_batch_size", "Jobs denoised together in one call.", ["pipeline"], buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64),
)
ENCODER_EVICTIONS = Counter("t2i_encoder_evictions_total", "Encoders evicted to stay in the memory budget.", ["encoder"])

# -- worker: per pipeline --------------------------------------------------------------------------------------
DENOISE_SECONDS = Histogram(
    "t2i_denoise_duration_seconds", "Time of the denoising loop.", ["pipeline"], buckets=LATENCY_BUCKETS
)
DECODE_SECONDS = Histogram("t2i_decode_duration_seconds", "Time of VAE decoding.", ["pipeline"], buckets=LATENCY_BUCKETS)
ADAPTER_JOBS = Counter(
    "t2i_adapter_jobs_total", "Jobs run with or without LoRA adapters (not labelled by adapter set).",
    ["pipeline", "adapters"],
)
ADAPTER_SWITCH_SECONDS = Histogram(
    "t2i_adapter_switch_duration_seconds", "Time to change the active LoRA adapters (load, set, disable).",
    ["pipeline"], buckets=LATENCY_BUCKETS,
)
CONTROL_JOBS = Counter(
    "t2i_control_jobs_total", "Jobs run with or without a ControlNet (not labelled by ControlNet).",
    ["pipeline", "control"],
)
DENOISER_RESIDENT_BYTES = Gauge(
    "t2i_denoiser_resident_bytes", "Bytes of a pipeline's denoiser (transformer, VAE, CLIP).", ["pipeline", "device"]
)

# -- service-wide ----------------------------------------------------------------------------------------------
QUEUE_WAIT_SECONDS = Histogram(
    "t2i_queue_wait_duration_seconds", "Time a job waited in the queue before a worker started it.",
    buckets=LATENCY_BUCKETS,
)
QUEUE_DEPTH = Gauge("t2i_queue_depth", "Jobs queued and not yet started.")
WORKERS_LIVE = Gauge("t2i_workers_live", "Workers whose heartbeat is fresh.")
REQUESTS = Counter(
    "t2i_api_requests_total", "API requests that submit work, by outcome.", ["endpoint", "status"]
)
ROUTE_DECISIONS = Counter(
    "t2i_route_decisions_total", "Jobs a route sent to an encoder, by reason: the rule's name, `default`, "
    "`fallback-no-worker` or `fallback-queue-depth`.", ["route", "encoder", "reason"],
)
JOBS_REDELIVERED = Counter(
    "t2i_jobs_redelivered_total", "Jobs taken over from a worker that stopped answering.", ["pipeline", "encoder"]
)

# -- API: compare runs and blind votes --------------------------------------------------------------------------
COMPARE_RUNS = Counter("t2i_compare_runs_total", "Compare runs started.")
AB_VOTES = Counter(
    "t2i_ab_votes_total", "Blind A/B votes counted, per encoder pair (a < b by name) and outcome (a, b, tie).",
    ["encoder_a", "encoder_b", "outcome"],
)
