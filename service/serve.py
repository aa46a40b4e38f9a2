"""`t2i serve`: the whole service on one machine, in one command.

It starts a Redis-compatible server (embedded, unless `T2I_REDIS_URL` names one), one worker and the API, each its
own process, on the demo model kit unless a models file is configured. Ctrl-C or SIGTERM stops everything it started,
by pid, after the worker has finished the job in flight. A worker that crashes is started again.

This supervisor imports neither torch nor the API.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from service.redis_server import EmbeddedRedis
from service.settings import Settings

MAX_WORKER_RESTARTS = 5


def _child(command: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "service.cli", *command], env=env)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def serve(settings: Settings, models_file: Path) -> int:
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    # 1. The queue's Redis: the configured one, or an embedded server on a free loopback port, out of the terminal's
    #    process group, so that Ctrl-C reaches the worker and the API but Redis outlives the job in flight.
    redis_server = None
    redis_url = settings.redis_url
    if not redis_url:
        redis_server = EmbeddedRedis(own_session=True).start()
        redis_url = redis_server.url
    env = {**os.environ, "T2I_REDIS_URL": redis_url, "T2I_MODELS_FILE": str(models_file),
           "T2I_HOST": settings.host, "T2I_PORT": str(settings.port)}
    if "T2I_WORKER_METRICS_PORT" not in os.environ:
        env["T2I_WORKER_METRICS_PORT"] = "0"  # a free port; the worker prints it and reports it

    # 2. One worker and the API.
    worker = _child(["worker"], env)
    api = _child(["api", "--host", settings.host, "--port", str(settings.port)], env)
    url = f"http://{settings.host}:{settings.port}"
    print(f"t2i-slim serving at {url}  (docs: {url}/docs)  redis: {redis_url}  models: {models_file}", flush=True)

    # 3. Supervise until told to stop.
    restarts, announced, code = 0, False, 0
    while stop["signal"] is None:
        if api.poll() is not None:
            print(f"the API exited with code {api.returncode}; stopping", file=sys.stderr, flush=True)
            code = 1
            break
        if worker.poll() is not None:
            if restarts >= MAX_WORKER_RESTARTS:
                print("the worker keeps exiting; stopping", file=sys.stderr, flush=True)
                code = 1
                break
            restarts += 1
            print(f"the worker exited with code {worker.returncode}; starting it again", file=sys.stderr, flush=True)
            time.sleep(min(2**restarts, 30))
            worker = _child(["worker"], env)
        if not announced and _ready(url):
            print(f"ready: try  curl -X POST '{url}/v1/generate?encoder=t5-base&wait=true' "
                  "-H 'Content-Type: application/json' -d '{\"prompt\": \"a large yellow square on the right\"}'", flush=True)
            announced = True
        time.sleep(0.2)

    # 4. Stop by pid: the worker first finishes its job in flight, then the API, then Redis.
    print("stopping: finishing the job in flight", flush=True)
    for process in (worker, api):
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process, grace in ((worker, 600), (api, 30)):
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if redis_server is not None:
        redis_server.cleanup()
    return code
