"""Real service processes for tests: an embedded Redis, API processes (uvicorn) and worker processes.

Everything binds 127.0.0.1 and is stopped by its own pid.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx
import redis

from service import queue
from service.redis_server import free_port

FAST_WORKER_ENV = {"T2I_VISIBILITY_TIMEOUT_S": "3", "T2I_HEARTBEAT_S": "0.5", "T2I_WORKER_METRICS_PORT": "0"}
# A process that is still starting is waited for as long as it lives, up to this cap: a loaded machine can take many
# times the usual start-up, and a process that fails exits (which is reported at once with its log).
START_CAP_S = 600
# A job on a ready worker takes well under a second on the tiny models; this cap only ends a hang, it is not a bound
# the test means to check (speed is measured in bench/, not in tests).
JOB_CAP_S = 300


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")


@dataclass
class Proc:
    process: subprocess.Popen
    log_path: str
    info: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def stop(self, sig=signal.SIGTERM, timeout_s: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


class Stack:
    def __init__(self, redis_url: str, models_file, log_dir):
        self.redis_url = redis_url
        self.models_file = str(models_file)
        self.log_dir = log_dir
        self.procs: list[Proc] = []
        self.redis = redis.Redis.from_url(redis_url)

    def env(self, extra: dict | None = None) -> dict:
        return {**os.environ, "T2I_REDIS_URL": self.redis_url, "T2I_MODELS_FILE": self.models_file,
                "T2I_THREADS": "1", "HF_HUB_OFFLINE": "1", **FAST_WORKER_ENV, **(extra or {})}

    def _spawn(self, args: list[str], extra_env: dict | None, name: str) -> Proc:
        log_path = str(self.log_dir / f"{name}-{len(self.procs)}.log")
        with open(log_path, "w") as log:
            process = subprocess.Popen([sys.executable, "-m", "service.cli", *args], env=self.env(extra_env),
                                       stdout=log, stderr=subprocess.STDOUT)
        proc = Proc(process, log_path)
        self.procs.append(proc)
        return proc

    def start_api(self, extra_env: dict | None = None, port: int | None = None) -> str:
        port = port or free_port()
        started = time.monotonic()
        proc = self._spawn(["api", "--host", "127.0.0.1", "--port", str(port)], extra_env, "api")
        url = f"http://127.0.0.1:{port}"

        def up():
            if proc.process.poll() is not None:
                raise RuntimeError(f"API exited: {proc.log()}")
            try:
                return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, START_CAP_S, "the API to answer")
        proc.info.update(url=url, startup_s=time.monotonic() - started)
        return url

    def spawn_worker(self, extra_env: dict | None = None) -> Proc:
        """A worker process, returned at once (it registers with its first heartbeat once ready)."""
        return self._spawn(["worker"], extra_env, "worker")

    def start_worker(self, extra_env: dict | None = None) -> Proc:
        """A worker process, returned once it is ready (its first heartbeat is in Redis); `info["startup_s"]` is how
        long that took, which tests use to derive their bounds on this machine as it is now."""
        started = time.monotonic()
        proc = self.spawn_worker(extra_env)

        def registered():
            if proc.process.poll() is not None:
                raise RuntimeError(f"worker exited: {proc.log()}")
            for raw in self.redis.mget([queue.worker_key(i.decode()) for i in self.redis.zrange(queue.WORKERS, 0, -1)]
                                       or ["-"]):
                facts = json.loads(raw) if raw else None
                if facts and facts["pid"] == proc.pid:
                    return facts
            return None

        facts = wait_for(registered, START_CAP_S, "the worker's first heartbeat", interval_s=0.2)
        proc.info.update(facts, metrics_url=f"http://127.0.0.1:{facts['metrics_port']}/metrics",
                         startup_s=time.monotonic() - started)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
