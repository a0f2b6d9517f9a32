"""The app with an SP=2 denoiser (two worker actors over gloo), over HTTP: same images as diffusers
in-process, heights that cannot be split get a 400, and a dead or hung worker makes Serve replace
the whole replica and its group while every answer stays either a retryable 503 or a right image.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from tests.helpers import (
    b64_image,
    batch_sizes,
    concurrently,
    generate,
    max_level_diff,
    process_alive,
)
from tests.integration.conftest import TEST_ARGS

SP_APP = "dit-sp2"
PREFIX = "/sp2"
RECOVERY_BOUND_S = 120  # a bound for the loop, not a speed assertion (see docs/benchmarks.md)
SP_ARGS = {
    **TEST_ARGS,
    "denoiser": {
        **TEST_ARGS["denoiser"],
        "ulysses_degree": 2,
        "worker_num_cpus": 0.5,
        "health_ping_timeout_s": 3,
        "process_group_timeout_s": 60,
        "warmup_sizes": ["256x256", "192x128"],
        "warmup_batch_sizes": [1, 3],
    },
}


@pytest.fixture(scope="module")
def sp_url(ray_cluster):
    from ray import serve

    from serve_app.app import build_app

    serve.run(build_app(SP_ARGS), name=SP_APP, route_prefix=PREFIX)
    yield ray_cluster + PREFIX
    serve.delete(SP_APP)


def worker_pids() -> list[int]:
    from ray import serve

    handle = serve.get_deployment_handle("Denoiser", app_name=SP_APP)
    info = handle.ready.remote().result(timeout_s=60)
    return [w["pid"] for w in info["workers"]]


def check_image(response, reference, prompt, seed, width, height, steps) -> None:
    assert response.status_code == 200, response.text
    ours = b64_image(response.json()["data"][0]["b64_json"])
    ref = reference.image(prompt, seed, width=width, height=height, steps=steps)
    assert max_level_diff(ours, ref) <= 1


def test_sp2_images_equal_pipeline_alone_and_in_a_batch(sp_url, reference):
    r = generate(sp_url, {"prompt": "a photo of a cat", "seed": 1, "size": "256x256"})
    check_image(r, reference, "a photo of a cat", 1, 256, 256, 4)
    prompts = ["a red fox", "a blue whale in the deep sea", "three green apples"]
    responses = concurrently(
        lambda i: generate(sp_url, {"prompt": prompts[i], "seed": 10 + i, "size": "192x128"}),
        range(3),
        workers=3,
    )
    for i, r in enumerate(responses):
        check_image(r, reference, prompts[i], 10 + i, 192, 128, 4)
    assert max(batch_sizes(r)["denoiser"] for r in responses) > 1


def test_height_the_group_cannot_split_is_a_400_naming_size(sp_url):
    r = generate(sp_url, {"prompt": "a cat", "size": "256x240"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "size" and "multiple of 32" in error["message"]


def wait_for_recovery(url: str, reference, body: dict) -> tuple[float, list[int]]:
    """POST until a 200 (bounded); every answer before it must be a retryable 503."""
    started = time.monotonic()
    statuses = []
    while time.monotonic() - started < RECOVERY_BOUND_S:
        r = generate(url, body, timeout=RECOVERY_BOUND_S)
        statuses.append(r.status_code)
        if r.status_code == 200:
            check_image(r, reference, body["prompt"], body["seed"], 256, 256, 4)
            return time.monotonic() - started, statuses
        assert r.status_code == 503 and r.headers.get("retry-after"), (r.status_code, r.text)
        time.sleep(0.5)
    raise AssertionError(f"no 200 within {RECOVERY_BOUND_S}s: {statuses}")


def test_killed_worker_gives_retryable_errors_then_a_new_group(sp_url, reference):
    body = {"prompt": "a lighthouse", "seed": 3, "size": "512x512", "num_inference_steps": 50}
    solo_started = time.monotonic()
    check_image(generate(sp_url, body), reference, "a lighthouse", 3, 512, 512, 50)
    solo_s = time.monotonic() - solo_started
    old = worker_pids()

    results: dict[int, object] = {}

    def call(i: int) -> None:
        results[i] = generate(sp_url, {**body, "seed": 3 + i})

    threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    time.sleep(min(1.0, solo_s / 3))  # inside the denoiser: encoding takes milliseconds
    killed_at = time.monotonic()
    os.kill(old[1], signal.SIGKILL)
    for t in threads:
        t.join(timeout=RECOVERY_BOUND_S)
    for i, r in results.items():
        if r.status_code == 200:  # finished before the kill: must be the right image
            check_image(r, reference, "a lighthouse", 3 + i, 512, 512, 50)
        else:
            assert r.status_code == 503 and r.headers.get("retry-after"), (r.status_code, r.text)
            assert "Traceback" not in r.text
    assert sum(r.status_code == 503 for r in results.values()) >= 1, [r.status_code for r in results.values()]

    _, statuses = wait_for_recovery(sp_url, reference, {"prompt": "a cat", "seed": 5, "size": "256x256"})
    recovered_s = time.monotonic() - killed_at
    new = worker_pids()
    print(f"killed worker: first 200 {recovered_s:.1f}s after the kill; answers before: {statuses}")
    assert set(new).isdisjoint(old)
    assert not any(process_alive(pid) for pid in old)


def test_hung_worker_is_replaced_and_does_not_linger(sp_url, reference):
    old = worker_pids()
    stopped_at = time.monotonic()
    os.kill(old[0], signal.SIGSTOP)
    try:
        _, statuses = wait_for_recovery(sp_url, reference, {"prompt": "a cat", "seed": 6, "size": "256x256"})
        recovered_s = time.monotonic() - stopped_at
        print(f"hung worker: first 200 {recovered_s:.1f}s after SIGSTOP; answers before: {statuses}")
        new = worker_pids()
        assert set(new).isdisjoint(old)
        deadline = time.monotonic() + 30
        while any(process_alive(pid) for pid in old) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not any(process_alive(pid) for pid in old)
    finally:
        if process_alive(old[0]):
            os.kill(old[0], signal.SIGKILL)
