"""Serve autoscales a stage from the config: up under sustained load, back down after it."""

from __future__ import annotations

import threading
import time

import pytest

from tests.helpers import generate
from tests.integration.conftest import TEST_ARGS, own_store

APP = "autoscale"
# Short delays so a test sees both directions in about a minute.
AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 1,
    "upscale_delay_s": 0.5,
    "downscale_delay_s": 3,
    "look_back_period_s": 2,
    "metrics_interval_s": 0.5,
}


def running_replicas(deployment: str) -> int:
    from ray import serve

    status = serve.status().applications[APP].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


def wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return False


@pytest.fixture(scope="module")
def autoscale_url(ray_cluster):
    from ray import serve

    from serve_app.app import build_graph
    from serve_app.config import AppConfig

    app = build_graph(
        AppConfig.model_validate(own_store(TEST_ARGS, APP)),
        {"Denoiser": {"autoscaling_config": AUTOSCALING, "num_replicas": "auto"}},
    )
    serve.run(app, name=APP, route_prefix=f"/{APP}")
    yield f"{ray_cluster}/{APP}"
    serve.delete(APP)


def test_sustained_load_scales_up_then_down(autoscale_url):
    assert running_replicas("Denoiser") == 1
    stop = threading.Event()
    statuses: list[int] = []

    def client():
        while not stop.is_set():
            r = generate(autoscale_url, {"prompt": "load", "size": "256x256", "num_inference_steps": 20}, timeout=120)
            statuses.append(r.status_code)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        scaled_up = wait_for(lambda: running_replicas("Denoiser") >= 2, timeout_s=120)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=180)
    assert scaled_up, "Denoiser did not scale to 2 replicas under load"
    assert statuses and set(statuses) == {200}
    assert wait_for(lambda: running_replicas("Denoiser") == 1, timeout_s=120), "did not scale back"
    ok = generate(autoscale_url, {"prompt": "after", "size": "64x64"})
    assert ok.status_code == 200
