"""Fixtures shared by every test level: a private model cache and the in-process reference."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Builtin models are built into a cache, and job records and images kept in a data folder,
    private to this test session. Set before any Ray process starts, so replicas and workers
    (which inherit the environment) use them too."""
    path = tmp_path_factory.mktemp("dit-serve-cache")
    data = tmp_path_factory.mktemp("dit-serve-data")
    old = {k: os.environ.get(k) for k in ("DIT_SERVE_CACHE", "DIT_SERVE_DATA")}
    os.environ["DIT_SERVE_CACHE"] = str(path)
    os.environ["DIT_SERVE_DATA"] = str(data)
    yield path
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def tiny_flux_path(private_cache) -> str:
    from deployments.tiny.store import ensure_builtin

    return str(ensure_builtin("tiny-flux"))


@pytest.fixture(scope="session")
def reference(tiny_flux_path):
    """Images from diffusers' own FluxPipeline, in this process: what the service must match."""
    from tests.helpers import ReferencePipeline

    return ReferencePipeline(tiny_flux_path)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A real redis-server on 127.0.0.1 for this session (Debian's package; see redis_server.py)."""
    from tests.redis_server import INSTALL_HINT, RedisServer, find_redis_server

    binary = find_redis_server()
    if binary is None:
        pytest.fail(f"redis-server not found: {INSTALL_HINT}", pytrace=False)
    server = RedisServer(binary, str(tmp_path_factory.mktemp("redis"))).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_endpoint():
    """The URL of a real S3-compatible server (moto's) on 127.0.0.1 for this session. Tests set
    `tests.s3_server.TEST_CREDENTIALS` in the environment before making clients."""
    from tests.s3_server import S3Server

    server = S3Server().start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests (`pytestmark = pytest.mark.usefixtures(...)`), as the
    reference pipelines run: CPU reductions round differently on other thread counts."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
