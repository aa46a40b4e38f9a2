"""Slow clients hold nothing for long: an upload trickled slower than T2I_BODY_TIMEOUT_S is cut off with 408, and an
SSE client that never reads holds no worker: other jobs run and finish meanwhile."""

import socket
import time

import httpx
import pytest

from tests.stack import Stack


@pytest.fixture(scope="module")
def slow_stack(redis_server, models_file, tmp_path_factory):
    url = redis_server.url.rsplit("/", 1)[0] + "/4"
    stack = Stack(url, models_file, tmp_path_factory.mktemp("slow"))
    stack.redis.flushdb()
    stack.api_url = stack.start_api({"T2I_BODY_TIMEOUT_S": "1.5"})
    stack.start_worker()
    yield stack
    stack.stop_all()
    stack.redis.flushdb()


def test_a_trickled_upload_is_cut_off(slow_stack):
    host, port = slow_stack.api_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/uploads HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 5000\r\n\r\n")
        start = time.monotonic()
        sock.sendall(b"xyz")  # then nothing more: 4997 bytes never come
        sock.settimeout(10)
        answer = sock.recv(4096)
        elapsed = time.monotonic() - start
        sock.settimeout(2)
        try:  # the body may come in a segment of its own
            while b"}" not in answer and (chunk := sock.recv(4096)):
                answer += chunk
        except OSError:
            pass
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"T2I_BODY_TIMEOUT_S=1.5" in answer
    assert 1.0 < elapsed < 6.0, elapsed


def test_an_sse_client_that_never_reads_holds_no_worker(slow_stack):
    with httpx.Client(base_url=slow_stack.api_url, timeout=30) as api:
        blocker = api.post("/v1/generate?encoder=t5-small", json={"prompt": "slow sse", "steps": 2}).json()
        host, port = slow_stack.api_url.removeprefix("http://").split(":")
        stalled = []
        for _ in range(5):  # subscribe, then never read a byte
            sock = socket.create_connection((host, int(port)), timeout=10)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            sock.sendall(f"GET /v1/jobs/{blocker['id']}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            stalled.append(sock)
        try:
            for k in range(3):  # the worker keeps serving
                job = api.post("/v1/generate?wait=true&encoder=t5-small", json={"prompt": f"next {k}"}).json()
                assert job["status"] == "succeeded"
            assert api.get(f"/v1/jobs/{blocker['id']}").json()["status"] == "succeeded"
            assert api.get("/readyz").status_code == 200
        finally:
            for sock in stalled:
                sock.close()
