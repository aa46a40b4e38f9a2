"""What docker compose starts, as local processes on 127.0.0.1: the Redis-compatible server with AOF, one API, two
workers, and a real Prometheus (Debian's) with the project's scrape config rewritten to local ports. Jobs for two
encoders; Prometheus then holds per-encoder latency and memory series from both workers, and every Grafana panel's
query runs on it. Then Redis is stopped and started again from its AOF, and the jobs queued before complete."""

import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from service import queue
from service.redis_server import EmbeddedRedis, free_port
from tests.stack import START_CAP_S, Stack, wait_for

ROOT = Path(__file__).resolve().parents[2]
ENCODERS = ("t5-base", "t5-small")


def local_scrape_config(api: str, workers: list[str]) -> dict:
    """deploy/prometheus/prometheus.yml with Docker's DNS discovery replaced by these loopback targets."""
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = "1s"
    targets = {"t2i-api": [api], "t2i-worker": workers}
    for job in config["scrape_configs"]:
        job.pop("dns_sd_configs")
        job["static_configs"] = [{"targets": targets[job["job_name"]]}]
    return config


@pytest.fixture(scope="module")
def prometheus_binary():
    binary = shutil.which("prometheus")
    assert binary, "prometheus not found: install Debian's `prometheus` package (scripts/test.sh does)"
    return binary


class Prometheus:
    def __init__(self, binary: str, config: dict, workdir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        path = workdir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        check = subprocess.run(["promtool", "check", "config", str(path)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        self.log = open(workdir / "prometheus.log", "w")
        self.process = subprocess.Popen(
            [binary, f"--config.file={path}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(self._ready, START_CAP_S, "Prometheus to be ready", interval_s=0.2)

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"prometheus exited: {Path(self.log.name).read_text()[-2000:]}")
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def query(self, expr: str) -> list[dict]:
        body = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10).json()
        assert body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def stop(self) -> None:
        self.process.terminate()  # our own pid
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def submit(api: httpx.Client, encoder: str, seed: int) -> str:
    response = api.post("/v1/generate", params={"encoder": encoder}, json={"prompt": "a red fox in snow",
                                                                        "seed": seed, "steps": 2})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def all_done(api: httpx.Client, ids: list[str], timeout_s: float) -> list[dict]:
    def finished():
        jobs = [api.get(f"/v1/jobs/{i}").json() for i in ids]
        return jobs if all(j.get("status") in ("succeeded", "failed", "cancelled") for j in jobs) else None

    jobs = wait_for(finished, timeout_s, f"{len(ids)} jobs to finish", interval_s=0.3)
    assert all(j["status"] == "succeeded" for j in jobs), [j.get("error") for j in jobs]
    return jobs


def test_the_compose_stack_as_local_processes(models_file, prometheus_binary, tmp_path):
    redis_server = EmbeddedRedis(data_dir=tmp_path / "redis", appendonly=True).start()
    stack = Stack(redis_server.url, models_file, tmp_path)
    prometheus = None
    try:
        # 1. API, two workers, Prometheus scraping all three with the project's scrape config.
        api_url = stack.start_api()
        workers = [stack.start_worker(), stack.start_worker()]
        worker_targets = [f"127.0.0.1:{w.info['metrics_port']}" for w in workers]
        prometheus = Prometheus(prometheus_binary, local_scrape_config(api_url.removeprefix("http://"),
                                                                       worker_targets), tmp_path)
        api = httpx.Client(base_url=api_url, timeout=30)

        # 2. Jobs for two encoders, in rounds, until each worker has run each encoder (bounded).
        seen: set[tuple[str, str]] = set()
        for round_ in range(10):
            ids = [submit(api, e, seed=round_ * 10 + k) for e in ENCODERS for k in range(2)]
            seen |= {(j["encoder"], j["worker"]) for j in all_done(api, ids, 120)}
            if len(seen) == 4:
                break
        assert len(seen) == 4, seen

        # 3. Prometheus has per-encoder latency and memory series from both workers, and the API's gauges.
        instances = set(worker_targets)

        def series(expr: str) -> set[tuple[str, str]]:
            return {(r["metric"].get("encoder"), r["metric"]["instance"]) for r in prometheus.query(expr)}

        want = {(e, i) for e in ENCODERS for i in instances}
        for expr in ('t2i_encode_duration_seconds_count{job="t2i-worker"}',
                     't2i_job_duration_seconds_count{job="t2i-worker"}',
                     't2i_job_peak_memory_bytes{job="t2i-worker"}'):
            wait_for(lambda: want <= series(expr), 30, f"{expr} for both encoders and both workers")
        up = lambda: {(r["metric"]["job"], r["value"][1]) for r in prometheus.query("up")}  # noqa: E731
        wait_for(lambda: up() == {("t2i-api", "1"), ("t2i-worker", "1")}, 30, "every target to be up")
        wait_for(lambda: [r["value"][1] for r in prometheus.query('t2i_workers_live{job="t2i-api"}')] == ["2"], 30,
                 "the API's gauge of live workers to read 2")
        rates = 'sum by (encoder) (rate(t2i_jobs_total{status="succeeded"}[1m]))'
        wait_for(lambda: {r["metric"]["encoder"] for r in prometheus.query(rates)} == set(ENCODERS), 30,
                 "a throughput series per encoder")

        # 4. Every Grafana panel's query is valid PromQL on this Prometheus.
        for path in (ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"):
            for panel in json.loads(path.read_text())["panels"]:
                for target in panel.get("targets", []):
                    expr = target["expr"].replace("$__rate_interval", "1m").replace("$encoder", ".*")
                    prometheus.query(expr)

        # 5. Redis stops with jobs queued, is started again from its AOF; the jobs complete, none lost.
        ids = [submit(api, e, seed=100 + k) for e in ENCODERS for k in range(3)]
        assert stack.redis.zcard(queue.QUEUED) >= 1  # two workers, six jobs: some are still queued
        redis_server.stop()  # SIGTERM: the server writes its AOF and exits
        assert (tmp_path / "redis" / "appendonlydir").is_dir()
        response = api.get("/readyz")
        assert response.status_code == 503 and "unreachable" in response.json()["redis"]
        time.sleep(2)  # workers and API see it gone, and retry with backoff
        redis_server.start()
        jobs = all_done(api, ids, 180)
        assert {j["encoder"] for j in jobs} == set(ENCODERS)
        wait_for(lambda: api.get("/readyz").status_code == 200, 30, "the API to be ready again")
    finally:
        if prometheus is not None:
            prometheus.stop()
        stack.stop_all()
        redis_server.cleanup()
