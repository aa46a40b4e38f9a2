"""A real Docker engine for the image test, and what an air-gapped build of the CPU image needs: a Python base image
made from Debian's packages and a wheelhouse of `requirements.lock`, both cached under ~/.cache/t2i-slim/image/.

No public image can be pulled on these machines. The engine is the one already running, or Debian's `dockerd` started
here as root (and stopped after) with no bridge and no iptables rules: containers use the host network and bind
127.0.0.1. Debian's client (/usr/bin/docker, package docker.io) is preferred: its BuildKit is built in, where a newer
client needs the buildx plugin, and the Dockerfile needs BuildKit.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "t2i-slim" / "image"
BASE_IMAGE = "t2i-slim-base:bookworm"
BASE_PACKAGES = "python3,python3-venv,ca-certificates"
DEBIAN_CLIENT = "/usr/bin/docker"


class EngineUnavailable(Exception):
    """No Docker engine can run here; the message says why (the image test is skipped with it)."""


class Engine:
    def __init__(self, client: str, process: subprocess.Popen | None = None, log_path: Path | None = None):
        self.client = client
        self.process = process  # the dockerd started here, if any
        self.log_path = log_path

    def run(self, *args: str, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        env = {**os.environ, "DOCKER_BUILDKIT": "1"}
        result = subprocess.run([self.client, *args], capture_output=True, text=True, timeout=timeout, env=env, **kw)
        if check and result.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args[:3])} ... exited {result.returncode}: {result.stderr[-3000:]}")
        return result

    def answers(self) -> bool:
        return self.run("info", "--format", "{{.ServerVersion}}", check=False, timeout=30).returncode == 0

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()  # our own dockerd, by its pid; it stops its containerd too
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_engine(log_dir: Path) -> Engine:
    """The running engine, or Debian's dockerd started now (root only); EngineUnavailable says why there is none."""
    client = DEBIAN_CLIENT if Path(DEBIAN_CLIENT).exists() else shutil.which("docker")
    if client is None:
        raise EngineUnavailable("no Docker client: install Debian's docker.io as root (scripts/test.sh does)")
    engine = Engine(client)
    if engine.answers():
        return engine
    dockerd = shutil.which("dockerd") or ("/usr/sbin/dockerd" if Path("/usr/sbin/dockerd").exists() else None)
    if dockerd is None:
        raise EngineUnavailable("no Docker engine: install Debian's docker.io as root (scripts/test.sh does)")
    if os.geteuid() != 0:
        raise EngineUnavailable("no Docker engine running, and dockerd needs root to start")
    engine.log_path = log_dir / "dockerd.log"
    with open(engine.log_path, "w") as log:
        engine.process = subprocess.Popen([dockerd, "--bridge=none", "--iptables=false"], stdout=log,
                                          stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if engine.process.poll() is not None:
            raise EngineUnavailable(f"dockerd exited with code {engine.process.returncode}: "
                                    f"{engine.log_path.read_text()[-1500:]}")
        if engine.answers():
            return engine
        time.sleep(0.5)
    engine.stop()
    raise EngineUnavailable(f"dockerd did not answer within 90 s: {engine.log_path.read_text()[-1500:]}")


def debian_mirror() -> str:
    """The Debian mirror of this machine's apt sources (debootstrap fetches from it), else deb.debian.org."""
    sources = [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]
    for path in sources:
        if path.is_file():
            for url in re.findall(r"(https?://\S+/debian)/?(?=\s|$)", path.read_text(), re.M):
                return url
    return "http://deb.debian.org/debian"


def base_image(engine: Engine) -> str:
    """BASE_IMAGE: Debian 12 (minbase) with python3 3.11 and its venv module. Made with debootstrap once (about a
    minute quiet, three on a busy machine), kept as a tarball in CACHE and as an image in the engine."""
    if engine.run("image", "inspect", BASE_IMAGE, check=False).returncode == 0:
        return BASE_IMAGE
    tarball = CACHE / "bookworm-python3.tar"
    if not tarball.exists():
        if shutil.which("debootstrap") is None:
            raise RuntimeError("debootstrap not found: install Debian's debootstrap (scripts/test.sh does)")
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="rootfs-", dir=CACHE) as rootfs:
            made = subprocess.run(["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm",
                                   rootfs, debian_mirror()], capture_output=True, text=True, timeout=1200)
            if made.returncode != 0:
                raise RuntimeError(f"debootstrap failed: {(made.stdout + made.stderr)[-2000:]}")
            for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):  # the .debs and package lists
                for path in (Path(rootfs) / leftover).glob("*"):
                    if path.is_file():
                        path.unlink()
            partial = tarball.with_suffix(".partial")
            subprocess.run(["tar", "-C", rootfs, "-cf", str(partial), "."], check=True, timeout=600)
            partial.rename(tarball)
    with open(tarball, "rb") as stream:
        engine.run("import", "--change", "ENV LANG=C.UTF-8", "-", BASE_IMAGE, stdin=stream, timeout=600)
    return BASE_IMAGE


def wheelhouse() -> Path:
    """CACHE/wheelhouse-cpu: every wheel of requirements.lock (and setuptools, which builds the project), downloaded
    once per lock file by pip on this machine, whose pip configuration brings the CPU build of torch."""
    lock = (ROOT / "requirements.lock").read_bytes()
    target = CACHE / "wheelhouse-cpu"
    stamp = target / "requirements.lock.sha256"
    digest = hashlib.sha256(lock).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        return target
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "-d", str(target), "--python-version",
                          "3.11", "--only-binary=:all:", "-r", str(ROOT / "requirements.lock"), "setuptools"],
                         capture_output=True, text=True, timeout=1800)
    if got.returncode != 0:
        raise RuntimeError(f"pip download of requirements.lock failed: {got.stderr[-2000:]}")
    torch = [p.name for p in target.glob("torch-*.whl")]
    if not all("+cpu" in name for name in torch) or any(target.glob("nvidia_*.whl")):
        raise RuntimeError(f"the wheelhouse got a CUDA build of torch ({torch}): point pip at a CPU build, e.g. "
                           "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu")
    stamp.write_text(digest)
    return target


def link_into_context(wheels: Path, name: str) -> Path:
    """The wheels, hard-linked (copied across file systems) into ROOT/wheelhouse/NAME, inside the build context."""
    dest = ROOT / "wheelhouse" / name
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for wheel in wheels.glob("*.whl"):
        try:
            os.link(wheel, dest / wheel.name)
        except OSError:
            shutil.copy2(wheel, dest / wheel.name)
    return dest
