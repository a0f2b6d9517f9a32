"""A real local Ray cluster for this package, with the app deployed once and reached over HTTP.

`@serve.batch` does not work in Serve's local testing mode, so these tests run real replicas. The
cluster is package-scoped: it is gone before the e2e tests start their own.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

APP = "dit"

# The tiny model on CPU, with batch windows long enough that concurrent requests really share a
# batch on a slow 2-core machine (latency does not matter here).
TEST_ARGS = {
    "model": {"name": "tiny-flux", "path": "builtin:tiny-flux"},
    "text_encoder": {"torch_threads": 1, "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.1}},
    "denoiser": {
        "torch_threads": 1,
        "worker_num_cpus": 1,
        "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.3},
    },
    "vae_decoder": {"torch_threads": 1, "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.1}},
    # Room for test_load's 300 concurrent requests: admission is tested on an app of its own.
    "admission": {"max_pending": 512, "max_pending_cost": 10_000},
}


def own_store(args: dict, name: str) -> dict:
    """`args` with a job store of its own: apps sharing a store share one queue."""
    import os

    path = os.path.join(os.environ["DIT_SERVE_DATA"], f"{name}.sqlite3")
    return {**args, "jobs": {**args.get("jobs", {}), "store": {"path": path}}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="package")
def ray_cluster(private_cache, tiny_flux_path):
    import ray
    from ray import serve

    from serve_app.replica_env import REPLICA_ENV

    ray.init(
        address="local",
        # Replicas run as the shipped configs run them (serve_app/replica_env.py).
        runtime_env={"env_vars": dict(REPLICA_ENV)},
        num_cpus=16,
        include_dashboard=False,
        object_store_memory=512 * 1024**2,
        # Metrics reach the exporter every second instead of every 10 (test_observability).
        _system_config={"metrics_report_interval_ms": 1000},
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="package")
def base_url(ray_cluster):
    from ray import serve

    from serve_app.app import build_app

    serve.run(build_app(own_store(TEST_ARGS, APP)), name=APP, route_prefix="/")
    return ray_cluster


@pytest.fixture(scope="package")
def logs_dir(ray_cluster) -> Path:
    import ray

    return Path(ray._private.worker._global_node.get_logs_dir_path())
