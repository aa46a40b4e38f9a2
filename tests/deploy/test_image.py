"""The CPU image, built and run with a real Docker engine (tests/deploy/engine.py starts one where it can; the tests
are skipped, with the reason, where none can run).

The build is air-gapped: `--network none`, a base image made from Debian's packages (`PYTHON_IMAGE`), every wheel
from a wheelhouse (`WHEELHOUSE`). Every container runs on the host network and binds 127.0.0.1, which each test
checks from inside the container, along with the user of every process. On a busy 2-core machine the first run takes
about 12.5 minutes (debootstrap, the wheelhouse, the build), later ones about 3, 4 after a code change: the base, the
wheels and the dependency layers are cached, and a code change rebuilds the project's layer only. The figures (image
size, cold start) are printed with `-s` and written to test-artifacts/image.json; docs/benchmarks.md has them.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import platform
import re
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis
from PIL import Image

from service import queue
from service.redis_server import EmbeddedRedis, free_port
from tests.deploy.engine import (CACHE, ROOT, Engine, EngineUnavailable, base_image, link_into_context, start_engine,
                                 wheelhouse)
from tests.stack import FAST_WORKER_ENV, JOB_CAP_S, START_CAP_S, wait_for

pytestmark = pytest.mark.docker

IMAGE = "t2i-slim:cpu-test"
USER = 10001
# Start-up is waited for while the container runs, up to START_CAP_S (only a hang cap: a loaded machine can take many
# times the usual cold start, which is reported, not bounded). Health is the engine's own verdict from the
# Dockerfile's HEALTHCHECK: the test fails if the engine calls the container unhealthy.
ARTIFACTS = Path(os.environ.get("T2I_TEST_ARTIFACTS", ROOT / "test-artifacts"))
LOOPBACK = {"T2I_HOST": "127.0.0.1", "T2I_WORKER_METRICS_HOST": "127.0.0.1"}

# Run inside a container as its user: the processes of the container's command (pid 1 and its descendants; not
# those of `docker exec`, such as the HEALTHCHECK's, which runc starts as root), with the uid and the inet sockets
# (table, state, local, remote) of each.
AUDIT = r"""
import ipaddress, json, os
def addr(hexed):
    host, port = hexed.split(":")
    raw = bytes.fromhex(host)
    raw = raw[::-1] if len(raw) == 4 else b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    return str(ipaddress.ip_address(raw)), int(port, 16)
sockets = {}
for table in ("tcp", "tcp6", "udp", "udp6"):
    for line in open(f"/proc/net/{table}").read().splitlines()[1:]:
        f = line.split()
        sockets[f[9]] = (table, f[3], addr(f[1]), addr(f[2]))
status = {}
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status").read().splitlines() if ":" in line)
    except FileNotFoundError:
        continue
    status[int(pid)] = (int(fields["PPid"]), int(fields["Uid"].split()[0]))
def served(pid):
    while pid > 1 and pid in status:
        pid = status[pid][0]
    return pid == 1
out = []
for pid in sorted(p for p in status if served(p)):
    fds = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    cmd = open(f"/proc/{pid}/cmdline").read().replace("\0", " ").strip()
    inodes = [fd[8:-1] for fd in fds if fd.startswith("socket:[")]
    out.append({"pid": pid, "uid": status[pid][1], "cmd": cmd,
                "sockets": [sockets[i] for i in inodes if i in sockets]})
print(json.dumps(out))
"""


class Container:
    """One container of IMAGE on the host network, known by its id."""

    def __init__(self, engine: Engine, env: dict, command: list[str] = (), *, hostname: str | None = None,
                 volumes: list[str] = ()):
        args = ["run", "-d", "--network", "host"]
        args += ["--hostname", hostname] if hostname else []
        for key, value in env.items():
            args += ["-e", f"{key}={value}"]
        for volume in volumes:
            args += ["-v", volume]
        self.engine = engine
        self.started = time.monotonic()
        self.id = engine.run(*args, IMAGE, *command).stdout.strip()

    def inspect(self, template: str) -> str:
        return self.engine.run("inspect", "-f", template, self.id).stdout.strip()

    def logs(self) -> str:
        result = self.engine.run("logs", self.id, check=False)
        return result.stdout + result.stderr

    def running(self) -> bool:
        if self.inspect("{{.State.Running}}") != "true":
            raise RuntimeError(f"container exited ({self.inspect('{{.State.ExitCode}}')}): {self.logs()[-3000:]}")
        return True

    def health(self) -> str:
        return self.inspect("{{.State.Health.Status}}")

    def healthy(self) -> bool:
        """True once the engine's HEALTHCHECK says healthy; an error once it says unhealthy."""
        self.running()
        status = self.health()
        if status == "unhealthy":
            log = self.inspect("{{json .State.Health.Log}}")
            raise RuntimeError(f"the engine reports the container unhealthy: {log[-2000:]}")
        return status == "healthy"

    def audit(self) -> list[dict]:
        return json.loads(self.engine.run("exec", self.id, "python3", "-c", AUDIT).stdout)

    def stop(self, timeout_s: int = 120) -> int:
        """SIGTERM, SIGKILL after `timeout_s`; the exit code (137 when it had to be killed)."""
        self.engine.run("stop", "-t", str(timeout_s), self.id, timeout=timeout_s + 60)
        return int(self.inspect("{{.State.ExitCode}}"))

    def remove(self) -> None:
        self.engine.run("rm", "-f", self.id, check=False)


def assert_non_root_and_loopback(box: Container, at_least: int) -> None:
    processes = box.audit()
    assert len(processes) >= at_least, processes
    assert {p["uid"] for p in processes} == {USER}, [(p["uid"], p["cmd"]) for p in processes]
    inet = [(p["cmd"], s) for p in processes for s in p["sockets"]]
    assert inet, "no process of the container has a socket: the audit saw nothing"
    for cmd, (table, state, (local, _), (remote, _)) in inet:
        assert local in ("127.0.0.1", "::ffff:127.0.0.1", "::1"), f"{cmd} has a {table} socket on {local}"
        assert remote in ("0.0.0.0", "::", "127.0.0.1", "::ffff:127.0.0.1", "::1"), f"{cmd} talks to {remote}"


def ready(url: str, box: Container, workers: int = 1):
    def check():
        box.running()
        try:
            response = httpx.get(f"{url}/readyz", timeout=2)
        except httpx.HTTPError:
            return False
        return response.status_code == 200 and response.json()["workers"] >= workers

    return check


def submit(api: httpx.Client, **params) -> str:
    response = api.post("/v1/generate", json={"prompt": "a large yellow square on the right", **params})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def finished(api: httpx.Client, ids: list[str], timeout_s: float) -> list[dict]:
    def check():
        jobs = [api.get(f"/v1/jobs/{i}").json() for i in ids]
        return jobs if all(j["status"] in ("succeeded", "failed", "cancelled") for j in jobs) else None

    return wait_for(check, timeout_s, f"{len(ids)} jobs to finish", interval_s=0.3)


def first_image(api: httpx.Client, job: dict) -> Image.Image:
    assert job["status"] == "succeeded", job
    response = api.get(job["images"][0])
    assert response.status_code == 200 and response.content[:4] == b"\x89PNG"
    return Image.open(io.BytesIO(response.content))


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


@pytest.fixture(scope="module")
def figures():
    found: dict = {"cpu": cpu_model(), "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    yield found
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "image.json").write_text(json.dumps(found, indent=2) + "\n")
    print(f"\nimage figures: {json.dumps(found)}")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """The engine, held by one test run of this machine at a time: two runs at once would share the engine that one
    of them started (and stops), the image tag and the wheelhouse. A second run waits on a file lock, which the OS
    releases if the first dies."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "image-test.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            engine = start_engine(tmp_path_factory.mktemp("dockerd"))
        except EngineUnavailable as exc:
            pytest.skip(f"no Docker engine can run here: {exc}")
        yield engine
        engine.stop()


@pytest.fixture(scope="module")
def image(engine, figures, tmp_path_factory) -> str:
    """IMAGE, built from this checkout with no network: the base made from Debian's packages, the cached wheelhouse
    linked into the build context. The engine keeps the image and its layers for the next run; the image this build
    replaces is removed."""
    started = time.monotonic()
    base = base_image(engine)
    wheels = link_into_context(wheelhouse(), ".image-test")
    figures["prepare_s"] = round(time.monotonic() - started, 1)
    previous = engine.run("image", "inspect", "-f", "{{.Id}}", IMAGE, check=False).stdout.strip()
    log = tmp_path_factory.mktemp("build") / "build.log"
    started = time.monotonic()
    try:
        result = engine.run("build", "--network", "none", "--progress", "plain", "--build-arg", "VARIANT=cpu",
                            "--build-arg", f"PYTHON_IMAGE={base}", "--build-arg",
                            f"WHEELHOUSE={wheels.relative_to(ROOT)}", "-t", IMAGE, str(ROOT), check=False,
                            timeout=3600)
    finally:
        shutil.rmtree(wheels)
        if not any(wheels.parent.iterdir()):
            wheels.parent.rmdir()
    log.write_text(result.stdout + result.stderr)
    assert result.returncode == 0, f"docker build failed (log {log}): {(result.stdout + result.stderr)[-4000:]}"
    figures["build_s"] = round(time.monotonic() - started, 1)
    figures["image_bytes"] = int(engine.run("image", "inspect", "-f", "{{.Size}}", IMAGE).stdout)
    current = engine.run("image", "inspect", "-f", "{{.Id}}", IMAGE).stdout.strip()
    if previous and previous != current:
        engine.run("rmi", previous, check=False)  # its dependency layers are shared with the new one
    return IMAGE


def test_the_image_serves_the_miniature_kit_as_non_root_and_stops_cleanly(engine, image, figures):
    api_port = free_port()
    box = Container(engine, {**LOOPBACK, "T2I_PORT": api_port, "T2I_WORKER_METRICS_PORT": free_port()})
    try:
        # 1. The default command (`t2i serve`): ready, then healthy by the HEALTHCHECK, never unhealthy.
        url = f"http://127.0.0.1:{api_port}"
        wait_for(ready(url, box), START_CAP_S, "the container to be ready", interval_s=0.2)
        figures["cold_start_to_ready_s"] = round(time.monotonic() - box.started, 1)
        wait_for(box.healthy, START_CAP_S, "the HEALTHCHECK to report healthy", interval_s=0.5)
        figures["cold_start_to_healthy_s"] = round(time.monotonic() - box.started, 1)

        # 2. No models file: the miniature kit shipped in the package serves, and a job succeeds.
        api = httpx.Client(base_url=url, timeout=30)
        sources = {e["name"]: e["source"] for e in api.get("/v1/encoders").json() if e["kind"] != "route"}
        assert sources and all("/site-packages/service/models/miniature/" in s for s in sources.values()), sources
        job = finished(api, [submit(api, encoder="t5-base", steps=2, width=96, height=64, seed=1)], JOB_CAP_S)[0]
        assert first_image(api, job).size == (96, 64)

        # 3. Every process (supervisor, Redis, API, worker) runs as the image's user and binds loopback only.
        assert_non_root_and_loopback(box, at_least=4)

        # 4. SIGTERM with a job in flight: the job ends first (on the container's own Redis, watched from here),
        #    then the container exits with 0.
        redis_url = re.search(r"redis: (redis://\S+)", box.logs()).group(1)
        job_id = submit(api, encoder="t5-base", steps=30, width=128, height=128, seed=2)
        wait_for(lambda: api.get(f"/v1/jobs/{job_id}").json()["status"] == "running", JOB_CAP_S, "the job to run")
        ended: dict = {}

        def watch():
            client = redis.Redis.from_url(redis_url, socket_timeout=None)
            ended["status"] = client.blpop([queue.done_key(job_id)], timeout=300)[1].decode()
            ended["at"] = time.monotonic()

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        time.sleep(0.2)  # the watcher is blocked on the job's done list
        signalled = time.monotonic()
        assert box.stop(timeout_s=120) == 0, box.logs()[-3000:]
        watcher.join(10)
        assert ended.get("status") == "succeeded", (ended, box.logs()[-3000:])
        assert ended["at"] > signalled, "the job ended before SIGTERM: it was not in flight"
        assert "stopping: finishing the job in flight" in box.logs()
    finally:
        box.remove()


def test_scaled_out_containers_survive_a_killed_worker(engine, image, tmp_path):
    redis_server = EmbeddedRedis().start()  # Valkey on 127.0.0.1, on the host: the containers share its network
    shared = {**LOOPBACK, **FAST_WORKER_ENV, "T2I_REDIS_URL": redis_server.url}
    boxes: list[Container] = []
    try:
        # 1. One API container and two worker containers of the same image. On the host network every container
        #    would have the host's name, and each worker is pid 1: a hostname each keeps the worker ids apart.
        api_port = free_port()
        api_box = Container(engine, {**shared, "T2I_PORT": api_port},
                            ["api", "--host", "127.0.0.1", "--port", str(api_port)])
        boxes.append(api_box)
        workers = [Container(engine, {**shared, "T2I_WORKER_METRICS_PORT": free_port()}, ["worker"],
                             hostname=f"t2i-worker-{n}") for n in (1, 2)]
        boxes += workers
        url = f"http://127.0.0.1:{api_port}"
        wait_for(ready(url, api_box, workers=2), START_CAP_S, "the API to see two workers", interval_s=0.3)
        for box in workers:
            box.running()
        ids = {w.decode() for w in redis.Redis.from_url(redis_server.url).zrange(queue.WORKERS, 0, -1)}
        victim = next(i for i in ids if i.startswith("t2i-worker-1-"))
        survivor = next(i for i in ids if i.startswith("t2i-worker-2-"))

        # 2. Twenty jobs of a few seconds each; worker 1 is killed (SIGKILL) just after it has started one.
        api = httpx.Client(base_url=url, timeout=30)
        job_ids = [submit(api, encoder="t5-base", steps=24, width=64, height=64, seed=k) for k in range(20)]

        def victim_just_started():
            jobs = [api.get(f"/v1/jobs/{i}").json() for i in job_ids]
            return any(j["status"] == "running" and j["worker"] == victim and time.time() - j["started_at"] < 1.0
                       for j in jobs)

        wait_for(victim_just_started, START_CAP_S, "worker 1 to start a job", interval_s=0.05)
        engine.run("kill", workers[0].id)
        in_flight = [j["id"] for j in (api.get(f"/v1/jobs/{i}").json() for i in job_ids)
                     if j["status"] == "running" and j["worker"] == victim]
        assert in_flight, "worker 1 had no job in flight when it was killed"

        # 3. Every job succeeds; those worker 1 held were delivered again and finished by worker 2.
        jobs = {j["id"]: j for j in finished(api, job_ids, START_CAP_S)}
        assert all(j["status"] == "succeeded" for j in jobs.values()), [j.get("error") for j in jobs.values()]
        for job_id in in_flight:
            assert jobs[job_id]["worker"] == survivor and jobs[job_id]["attempts"] >= 2, jobs[job_id]
        assert workers[0].inspect("{{.State.ExitCode}}") == "137"  # killed, not stopped
        for box in (api_box, workers[1]):
            wait_for(box.healthy, START_CAP_S, "the HEALTHCHECK of the API and worker 2", interval_s=0.5)
            assert_non_root_and_loopback(box, at_least=1)
    finally:
        for box in boxes:
            box.remove()
        redis_server.cleanup()


def test_a_models_directory_mounted_read_only_serves_sd3(engine, image, demo_dir, figures):
    api_port = free_port()
    box = Container(engine, {**LOOPBACK, "T2I_PORT": api_port, "T2I_WORKER_METRICS_PORT": free_port(),
                             "T2I_MODELS_FILE": "/models/models.yaml"}, volumes=[f"{demo_dir}:/models:ro"])
    try:
        url = f"http://127.0.0.1:{api_port}"
        wait_for(ready(url, box), START_CAP_S, "the container to be ready", interval_s=0.2)
        figures["cold_start_to_ready_demo_kit_s"] = round(time.monotonic() - box.started, 1)
        assert box.inspect("{{range .Mounts}}{{.Destination}} {{.RW}}{{end}}") == "/models false"
        api = httpx.Client(base_url=url, timeout=30)
        sources = [e["source"] for e in api.get("/v1/encoders").json() if e["kind"] != "route"]
        assert sources and all(s.startswith("local /models/") for s in sources), sources
        job = finished(api, [submit(api, pipeline="sd3", encoder="t5-base", steps=2, seed=3)], JOB_CAP_S)[0]
        assert job["pipeline"] == "sd3" and first_image(api, job).size == (64, 64)
    finally:
        box.remove()
