"""`t2i serve`, the README's run command: Redis, API and worker from one command, a PNG, a clean stop on Ctrl-C."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from service.redis_server import free_port
from tests.stack import START_CAP_S, wait_for


def children(pid: int) -> list[int]:
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if int(fields.get("PPid", "0").strip()) == pid:
            found.append(int(status.parent.name))
    return found


def test_serve_runs_the_whole_service_and_stops_everything(models_file, tmp_path):
    port = free_port()
    env = {**os.environ, "T2I_MODELS_FILE": str(models_file), "T2I_HOME": str(tmp_path), "T2I_THREADS": "1"}
    env.pop("T2I_REDIS_URL", None)
    log = open(tmp_path / "serve.log", "w+")
    # Its own process group, as a shell gives a foreground command: Ctrl-C is SIGINT to that whole group.
    serve = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port)], env=env,
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def ready():
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, START_CAP_S, "t2i serve to be ready", interval_s=0.3)
        spawned = children(serve.pid)
        assert len(spawned) == 3  # Redis, worker, API
        job = httpx.post(f"{url}/v1/generate?encoder=t5-base&wait=true", json={"prompt": "a red fox in snow"},
                         timeout=60).json()
        image = httpx.get(job["images"][0])
        assert image.status_code == 200 and image.content[:8] == b"\x89PNG\r\n\x1a\n"
        output = (tmp_path / "serve.log").read_text()
        assert f"serving at {url}" in output and f"{url}/docs" in output
        # Ctrl-C with a job in flight: the worker finishes it, with Redis still up, then everything stops.
        second = httpx.post(f"{url}/v1/generate?encoder=t5-base", json={"prompt": "a fox", "steps": 100},
                            timeout=10).json()
        wait_for(lambda: httpx.get(f"{url}/v1/jobs/{second['id']}").json()["status"] != "queued", 30,
                 "the second job to start", interval_s=0.02)
        os.killpg(serve.pid, signal.SIGINT)
        assert serve.wait(120) == 0
    finally:
        if serve.poll() is None:
            serve.send_signal(signal.SIGTERM)
            serve.wait(60)
    output = (tmp_path / "serve.log").read_text()
    assert "stopped after 2 jobs" in output, output
    assert "unreachable" not in output and "heartbeat failed" not in output, output
    assert "start answers lost" not in output, output  # the job scripts were loaded before the first job
    for pid in spawned:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text(), pid


def test_the_api_process_never_imports_torch(models_file):
    code = (
        "import sys; from service.api.app import create_app; from service.settings import Settings;"
        f"create_app(Settings(models_file={str(models_file)!r}, redis_url='redis://127.0.0.1:1'));"
        "import service.cli, service.serve;"
        "assert 'torch' not in sys.modules, 'torch imported'; print('clean')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "clean", out.stderr
