"""Out of device memory on a served app, the fault injected (`DIT_SERVE_FAULT_OOM_PIXELS`) through
the deployments' runtime_env: the Denoiser replica (an SP=2 group: its two worker actors inherit
the variable) runs out past two 64x64 images per forward, the VAEDecoder past one.

A batch over the limit is split and every image equals the same seed's solo image; an image that
cannot fit alone gets its own 400 naming `size` while a concurrent small request succeeds; every
rank failing alike is the request's error, not the group's: the same workers serve on.
"""

from __future__ import annotations

import pytest
import requests

from deployments.oom import FAULT_ENV
from tests.helpers import b64_image, batch_sizes, concurrently, generate, job_events, max_level_diff, submit_job
from tests.integration.conftest import TEST_ARGS, own_store

OOM_APP = "dit-oom"
PREFIX = "/oom"
DENOISER_PIXELS = 2 * 64 * 64  # two 64x64 images per denoise step
DECODER_PIXELS = 64 * 64  # one 64x64 image per VAE decode
OOM_ARGS = {
    **TEST_ARGS,
    "denoiser": {
        **TEST_ARGS["denoiser"],
        "ulysses_degree": 2,
        "worker_num_cpus": 0.5,
        "warmup_sizes": [],
        # The request mode's split in halves (the step mode's restart has its own app below); long
        # windows: concurrent requests share a batch even on a loaded 2-core machine
        "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 1.0, "mode": "request"},
    },
    "vae_decoder": {**TEST_ARGS["vae_decoder"], "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.5}},
}


def fault(pixels: int) -> dict:
    return {"runtime_env": {"env_vars": {FAULT_ENV: str(pixels)}}}


@pytest.fixture(scope="module")
def oom_url(ray_cluster):
    from ray import serve

    from serve_app.app import build_graph
    from serve_app.config import AppConfig

    config = AppConfig.model_validate(own_store(OOM_ARGS, OOM_APP))
    overrides = {  # the whole ray_actor_options: the defaults' num_cpus with the variable
        "Denoiser": {"ray_actor_options": {"num_cpus": config.denoiser.replica_num_cpus, **fault(DENOISER_PIXELS)}},
        "VAEDecoder": {"ray_actor_options": {"num_cpus": 1, **fault(DECODER_PIXELS)}},
    }
    serve.run(build_graph(config, overrides), name=OOM_APP, route_prefix=PREFIX)
    yield ray_cluster + PREFIX
    serve.delete(OOM_APP)


@pytest.fixture(scope="module")
def first_workers(oom_url) -> list[int]:
    return worker_pids()


def worker_pids() -> list[int]:
    from ray import serve

    info = serve.get_deployment_handle("Denoiser", app_name=OOM_APP).ready.remote().result(timeout_s=60)
    return [w["pid"] for w in info["workers"]]


def check_image_ok(response, reference, prompt, seed, width, height, steps, n=1) -> None:
    """A 200 whose n images equal diffusers' in-process images of seeds seed, seed+1, ..."""
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    want = reference.images(prompt, seed, width=width, height=height, steps=steps, n=n)
    assert len(data) == n
    for got, ref in zip(data, want):
        assert max_level_diff(b64_image(got["b64_json"]), ref) <= 1


def replica_log(logs_dir, deployment: str) -> str:
    return "\n".join(p.read_text(errors="replace") for p in logs_dir.rglob(f"replica_{OOM_APP}_{deployment}_*.log"))


def insufficient_memory(response, stage: str, size: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "insufficient_memory" and error["param"] == "size", error
    assert stage in error["message"] and size in error["message"] and "reduce size" in error["message"]


def test_requests_batched_over_the_limit_each_get_their_solo_image(oom_url, first_workers, reference, logs_dir):
    prompts = ["a red fox", "a blue whale", "three green apples", "a lighthouse"]
    responses = concurrently(
        lambda i: generate(oom_url, {"prompt": prompts[i], "seed": 100 + i, "size": "64x64"}),
        range(4),
        workers=4,
    )
    for i, r in enumerate(responses):
        check_image_ok(r, reference, prompts[i], 100 + i, 64, 64, 4)
    sizes = [batch_sizes(r) for r in responses]
    assert max(s["denoiser"] for s in sizes) > 2, sizes  # over the denoiser's two images
    assert max(s["vae_decoder"] for s in sizes) > 1, sizes  # over the decoder's one
    jobs = {r.headers["x-dit-job-id"] for r in responses}
    split = [line for line in replica_log(logs_dir, "Denoiser").splitlines() if "running it again in halves" in line]
    assert any(job in line for line in split for job in jobs), split
    assert "running them in halves" in replica_log(logs_dir, "VAEDecoder")


def test_an_image_that_cannot_fit_alone_fails_alone_with_a_400_naming_size(oom_url, first_workers, reference):
    big, small = concurrently(
        lambda body: generate(oom_url, body),
        [{"prompt": "a cathedral", "seed": 7, "size": "128x128"}, {"prompt": "a cat", "seed": 8, "size": "64x64"}],
        workers=2,
    )
    insufficient_memory(big, "denoiser", "128x128")
    check_image_ok(small, reference, "a cat", 8, 64, 64, 4)
    job = submit_job(oom_url, {"prompt": "a cathedral", "seed": 7, "size": "128x128"}).json()
    events = job_events(oom_url, job["id"], timeout=120)
    assert events[-1]["event"] == "failed", events[-1]
    record = requests.get(f"{oom_url}/v1/images/jobs/{job['id']}", timeout=30).json()
    assert record["error"]["code"] == "insufficient_memory" and record["attempts"] == 1  # not retried


def test_the_decoder_rejects_an_image_it_cannot_decode_alone(oom_url, first_workers):
    # 64x96 passes the denoiser (one image, under two 64x64) but not the decoder (over one)
    insufficient_memory(generate(oom_url, {"prompt": "a tall tower", "seed": 9, "size": "64x96"}), "VAE decoder", "64x96")


def test_the_same_workers_still_serve(oom_url, first_workers, reference):
    r = generate(oom_url, {"prompt": "a boat", "seed": 11, "size": "64x64", "n": 2})
    check_image_ok(r, reference, "a boat", 11, 64, 64, 4, n=2)
    assert worker_pids() == first_workers
    assert requests.get(f"{oom_url}/health", timeout=30).status_code == 200


STEP_APP, STEP_PREFIX = "dit-oom-step", "/oom-step"


@pytest.fixture(scope="module")
def step_url(ray_cluster):
    """Step-level batching on one rank, the denoiser's fault as above (two 64x64 images a call)."""
    from ray import serve

    from serve_app.app import build_graph
    from serve_app.config import AppConfig

    denoiser = {**OOM_ARGS["denoiser"], "ulysses_degree": 1, "batching": {"max_batch_size": 8, "mode": "step"}}
    config = AppConfig.model_validate(own_store({**OOM_ARGS, "denoiser": denoiser}, STEP_APP))
    overrides = {"Denoiser": {"ray_actor_options": {"num_cpus": config.denoiser.replica_num_cpus, **fault(DENOISER_PIXELS)}}}
    serve.run(build_graph(config, overrides), name=STEP_APP, route_prefix=STEP_PREFIX)
    yield ray_cluster + STEP_PREFIX
    serve.delete(STEP_APP)


def test_step_mode_restarts_rows_over_the_limit_and_refuses_an_image_too_big_alone(step_url, reference, logs_dir):
    """Four requests whose rows outgrow a call start again in calls of half the rows and each
    gets its solo image; an image that cannot fit alone fails alone with the 400 naming size."""
    prompts = ["a red fox", "a blue whale", "three green apples", "a lighthouse"]
    # 20 steps: long enough that the four overlap in the denoiser however their arrivals spread
    bodies = [{"prompt": p, "seed": 200 + i, "size": "64x64", "num_inference_steps": 20} for i, p in enumerate(prompts)]
    # Alone in the burst: a request of another size would hold the others back (FIFO by size),
    # and they might then never be more than two in a call.
    responses = concurrently(lambda body: generate(step_url, body), bodies, workers=4)
    for i, r in enumerate(responses):
        check_image_ok(r, reference, prompts[i], 200 + i, 64, 64, 20)
    insufficient_memory(generate(step_url, {"prompt": "a cathedral", "seed": 7, "size": "128x128"}), "denoiser", "128x128")
    log = "\n".join(p.read_text(errors="replace") for p in logs_dir.rglob(f"replica_{STEP_APP}_Denoiser_*.log"))
    assert "ran out of memory alone" in log
    restarts = [line for line in log.splitlines() if "start again in calls of at most" in line]
    jobs = {r.headers["x-dit-job-id"] for r in responses}
    assert any(job in line for line in restarts for job in jobs), restarts
