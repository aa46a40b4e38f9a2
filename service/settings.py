"""The one settings class of the service. Every field is read from a `T2I_<FIELD>` environment variable.

`.env.example` at the repository root documents each variable with its default. Read settings through
`get_settings()` (cached); tests override by setting the environment and calling `get_settings.cache_clear()`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="T2I_", extra="ignore", env_ignore_empty=True)

    # -- models ------------------------------------------------------------------------------------------------
    models_file: Path | None = Field(
        None, description="Models file (YAML or TOML). Unset: the miniature-world kit shipped with the package."
    )
    home: Path = Field(Path.home() / ".cache" / "t2i-slim", description="Where `t2i models make-demo` and the tests' demo kit go.")
    threads: int = Field(1, ge=1, le=512, description="CPU threads torch may use in one process.")

    # -- service -----------------------------------------------------------------------------------------------
    redis_url: str | None = Field(
        None, description="redis://, rediss:// or unix:// URL (unix:///path/redis.sock?db=0). Unset: `t2i serve` "
        "starts an embedded server."
    )
    host: str = Field("127.0.0.1", description="Address the API binds.")
    port: int = Field(8000, ge=0, le=65535, description="Port the API binds.")
    worker_metrics_host: str = Field("127.0.0.1", description="Address a worker's /metrics and /healthz bind.")
    worker_metrics_port: int = Field(
        9400, ge=0, le=65535, description="Port of a worker's /metrics and /healthz (0: pick a free one)."
    )
    worker_encoders: Annotated[list[str] | None, NoDecode] = Field(
        None, description="Encoders this worker serves (comma-separated). Unset: every encoder in the registry."
    )
    worker_pipelines: Annotated[list[str] | None, NoDecode] = Field(
        None, description="Pipelines this worker serves (comma-separated). Unset: every pipeline in the registry."
    )
    encoder_memory_budget_bytes: int = Field(
        0, ge=0, description="Bytes of encoder weights a worker keeps resident; 0 means no limit."
    )
    embedding_cache: bool = Field(True, description="Cache prompt embeddings (in each worker and shared in Redis).")
    embedding_cache_local_bytes: int = Field(
        256 * 2**20, ge=0, description="Bytes of prompt embeddings each worker keeps in memory."
    )
    embedding_cache_bytes: int = Field(
        2 * 2**30, ge=0, description="Bytes of prompt embeddings kept in Redis for all workers (LRU beyond)."
    )
    embedding_cache_ttl_s: int = Field(86400, ge=1, description="Seconds a cached prompt embedding is kept.")
    embedding_cache_max_entry_bytes: int = Field(
        8 * 2**20, ge=1, description="Larger embeddings (one prompt) are not cached in Redis."
    )
    max_batch: int = Field(
        8, ge=1, le=64, description="Most jobs a worker denoises in one call (same pipeline, encoder, size, steps)."
    )
    batch_wait_ms: int = Field(
        10, ge=0, le=10_000, description="How long a worker waits for more jobs to fill a batch, in milliseconds, when "
                                         "its last batch had more than one job (a lone job never waits)."
    )
    png_compress_level: int = Field(
        1, ge=0, le=9, description="zlib level of PNG results, encoded by libpng with zlib's run-length strategy and "
                                   "the Up row filter: on a 1024x1024 image about 3x as fast as PIL's encoder at "
                                   "level 1, for a file a sixth smaller; higher levels change little; 0 stores rows "
                                   "unfiltered and uncompressed (docs/benchmarks.md, service overhead)."
    )
    progress_interval_s: float = Field(
        0.2, ge=0.0, description="Least seconds between a job's progress events (the last step is always sent)."
    )
    max_queue: int = Field(256, ge=1, description="Queued jobs above which the API answers 429.")
    result_ttl_s: int = Field(3600, ge=10, description="Seconds a finished job and its images are kept.")
    visibility_timeout_s: float = Field(
        120.0, gt=0, description="Seconds after which a job claimed by a silent worker is delivered to another."
    )
    heartbeat_s: float = Field(2.0, gt=0, description="Seconds between worker heartbeats.")
    wait_timeout_s: float = Field(120.0, gt=0, description="Upper bound of `?wait=true` on POST /v1/generate.")
    body_timeout_s: float = Field(30.0, gt=0, description="Seconds a client has to send its whole request body.")
    max_body_bytes: int = Field(
        12_000_000, ge=1024, description="Largest request body the API accepts (fits a base64 control image)."
    )
    max_image_bytes: int = Field(
        8_000_000, ge=1024, description="Largest control image (uploaded or inline, decoded bytes) the API accepts."
    )
    upload_ttl_s: int = Field(3600, ge=10, description="Seconds an uploaded control image is kept.")
    max_compare_jobs: int = Field(
        128, ge=2, description="Most jobs (prompts x seeds x encoders) one compare run may queue."
    )
    compare_ttl_s: int = Field(
        7 * 24 * 3600, ge=60, description="Seconds a compare run, its images and its votes are kept."
    )
    max_prompt_chars: int = Field(2000, ge=1, description="Longest prompt, in characters, the API accepts.")
    max_pixel_steps: int = Field(
        1024 * 1024 * 4 * 50, ge=1, description="Largest width x height x images x steps one request may ask for."
    )

    # -- security ----------------------------------------------------------------------------------------------
    api_keys: Annotated[list[str] | None, NoDecode] = Field(
        None, description="SHA-256 hashes of the API keys (comma-separated, each optionally `name:hash`); "
                          "`t2i keys new` makes one. Unset: no keys, open on loopback only."
    )
    api_keys_file: Path | None = Field(None, description="A file of key hashes, one per line (`name:hash`).")
    allow_open: bool = Field(False, description="Serve without API keys on a non-loopback address anyway.")
    metrics_public: bool = Field(False, description="With API keys, serve the API's /metrics without a key.")
    cors_origins: Annotated[list[str] | None, NoDecode] = Field(
        None, description="Origins allowed by CORS (comma-separated). Unset: no cross-origin access."
    )
    rate_jobs_per_minute: int = Field(0, ge=0, description="Jobs one key may queue per minute (0: no limit).")
    max_concurrent_jobs: int = Field(0, ge=0, description="Jobs one key may have queued or running (0: no limit).")
    daily_pixel_steps: int = Field(
        0, ge=0, description="Width x height x images x steps one key may use per UTC day (0: no limit)."
    )
    log_prompts: bool = Field(False, description="Log each job's prompt (off: prompts may be private).")

    # -- fault injection (tests of the error paths; never set in production) -----------------------------------
    fault_oom_at_job: int = Field(
        0, ge=0, description="Test only: the worker raises torch.OutOfMemoryError at this job number (0: never)."
    )

    @field_validator("worker_encoders", "worker_pipelines", "api_keys", "cors_origins", mode="before")
    @classmethod
    def _split_csv(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()] or None
        return value

    @property
    def demo_dir(self) -> Path:
        return self.home / "demo"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def env_example() -> str:
    """The text of `.env.example`: every setting with its description and default (`python -m service.settings`)."""
    lines = ["# Every setting of t2i-slim as an environment variable, with its default. Copy to .env and edit;",
             "# an empty value means the default.", ""]
    for name, field in Settings.model_fields.items():
        default = field.default
        description = field.description
        if name == "home":  # machine-specific: shown, left empty (empty = the default)
            default, description = None, f"{description} Default: ~/.cache/t2i-slim."
        value = "" if default is None else ",".join(default) if isinstance(default, list) else default
        lines += [f"# {description}", f"T2I_{name.upper()}={value}"]
    lines += ["", "# -- docker compose only (docker-compose.yml reads these; the service does not) --"]
    for name, (default, description) in STACK_VARIABLES.items():
        lines += [f"# {description}", f"{name}={default}"]
    return "\n".join(lines) + "\n"


STACK_VARIABLES = {
    "COMPOSE_PROFILES": ("gpu", "Which workers `docker compose up` starts: gpu (one GPU each) or cpu."),
    "STACK_IMAGE": ("t2i-slim:latest", "Image of the API and the GPU workers."),
    "STACK_IMAGE_CPU": ("t2i-slim:cpu", "Image of the CPU worker (profile cpu)."),
    "STACK_VARIANT": ("cuda", "Build variant of STACK_IMAGE: cuda or cpu."),
    "STACK_MODELS_DIR": ("./deploy/docker/no-models", "Host directory mounted read-only at /models."),
    "STACK_BIND": ("127.0.0.1", "Host address of the published ports (API, Prometheus, Grafana); 0.0.0.0 serves "
                                "other hosts: set API keys and the Grafana password first."),
    "STACK_API_PORT": ("8000", "Host port of the API."),
    "STACK_PROMETHEUS_PORT": ("9090", "Host port of Prometheus."),
    "STACK_GRAFANA_PORT": ("3000", "Host port of Grafana."),
    "STACK_GRAFANA_PASSWORD": ("admin", "Grafana's admin password: change it."),
}


if __name__ == "__main__":
    print(env_example(), end="")
