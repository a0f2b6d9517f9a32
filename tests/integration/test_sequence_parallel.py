"""Sequence parallelism on CPU: a worker group of two ranks (gloo, xfuser's Ulysses attention)
gives the latents of one rank and of diffusers' FluxPipeline in-process.

Tolerance: 1e-5 absolute on the latents (seen: 4.8e-7; SP changes only the order of the attention's
reductions). Groups are driven directly (`WorkerGroup`), as a Denoiser replica drives them.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.helpers import process_alive
from tests.integration.conftest import TEST_ARGS

LATENT_TOL = 1e-5
# A short collective timeout, so that "idle groups never time out" is tested in seconds.
PG_TIMEOUT_S = 5.0


def group_config(ulysses: int):
    from serve_app.config import AppConfig

    denoiser = {
        **TEST_ARGS["denoiser"],
        "ulysses_degree": ulysses,
        "process_group_timeout_s": PG_TIMEOUT_S,
        "worker_call_timeout_s": 120,
    }
    return AppConfig.model_validate({**TEST_ARGS, "denoiser": denoiser})


@pytest.fixture(scope="module")
def groups(ray_cluster):
    from deployments.sp_group import WorkerGroup

    made = {}
    for degree in (1, 2):
        made[degree] = WorkerGroup(group_config(degree))
        made[degree].start(timeout_s=300)
    yield made
    for group in made.values():
        group.shutdown()


def inputs(batch: int, width: int, height: int, steps: int = 3):
    import torch

    from deployments.families.base import DenoiseInputs
    from deployments.sampling import SamplingParams

    g = torch.Generator().manual_seed(batch * 1000 + width + height)
    return DenoiseInputs(
        prompt_embeds=torch.randn(batch, 512, 32, generator=g),
        pooled_prompt_embeds=torch.randn(batch, 32, generator=g),
        sampling=SamplingParams(height, width, steps, 4.0, tuple(range(7, 7 + batch))),
    )


def in_process(path: str, x):
    """diffusers' FluxPipeline itself, on one thread as the workers are."""
    import torch
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(path, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, vae=None)
    pipe.set_progress_bar_config(disable=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return pipe(
                prompt_embeds=x.prompt_embeds,
                pooled_prompt_embeds=x.pooled_prompt_embeds,
                height=x.sampling.height,
                width=x.sampling.width,
                num_inference_steps=x.sampling.num_inference_steps,
                guidance_scale=x.sampling.guidance_scale,
                generator=[torch.Generator("cpu").manual_seed(s) for s in x.sampling.seeds],
                output_type="latent",
            ).images
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("width, height", [(256, 256), (192, 128)])
def test_sp2_equals_sp1_and_diffusers(groups, tiny_flux_path, batch, width, height):
    x = inputs(batch, width, height)
    sp2 = asyncio.run(groups[2].run(x))
    sp1 = asyncio.run(groups[1].run(x))
    ref = in_process(tiny_flux_path, x)
    tokens = (height // 16) * (width // 16)
    assert sp2.shape == sp1.shape == ref.shape and sp1.shape[:2] == (batch, tokens)
    assert (sp2 - sp1).abs().max().item() <= LATENT_TOL
    assert (sp2 - ref).abs().max().item() <= LATENT_TOL
    assert sp1.abs().max().item() > 0.1  # real latents, not zeros


def test_only_rank_0_ships_its_latents(groups):
    """Every rank computes the full latents, but only rank 0's travel back to the replica."""
    import ray

    x = inputs(2, 128, 64)
    workers, ref = groups[2]._workers, ray.put(x)
    for step in range(x.sampling.num_inference_steps):
        ray.get([w.step.remote(None, [], ref if step == 0 else None) for w in workers], timeout=120)
    latents, other = ray.get([w.finish.remote() for w in workers], timeout=120)
    assert other is None
    assert (latents - asyncio.run(groups[1].run(x))).abs().max().item() <= LATENT_TOL


def items_for(ids, width=128, height=64, steps=8):
    """Denoiser items with random embeddings, one image each, seeds 7, 8, ..."""
    import torch

    from deployments.denoise_loop import DenoiseItem
    from deployments.payloads import GenerationSpec, PromptEmbeddings
    from deployments.sampling import SamplingParams

    g = torch.Generator().manual_seed(len(ids))
    return [
        DenoiseItem(
            GenerationSpec(job_id, SamplingParams(height, width, steps, 4.0, (7 + i,))),
            PromptEmbeddings(job_id, torch.randn(1, 512, 32, generator=g), torch.randn(1, 32, generator=g)),
        )
        for i, job_id in enumerate(ids)
    ]


@pytest.mark.parametrize("degree", [1, 2])
def test_a_request_stopped_between_steps_leaves_the_batch_on_every_rank(groups, tmp_path, degree):
    """The denoiser's per-step contract on a real worker group and job store: a request cancelled
    mid-run stops within two steps of the cancel on every rank (no collective waits on a rank
    that stopped), its batch-mates' latents equal their run alone, and the group goes on."""
    import torch

    from deployments.denoise_loop import run_group, stack_inputs
    from deployments.job_store import open_job_store
    from deployments.job_store.base import RUNNING, JobRecord
    from deployments.payloads import Cancelled
    from deployments.progress import StageProgress

    store = open_job_store("sqlite", path=str(tmp_path / "jobs.db"))
    ids = ["job-a", "job-b", "job-c"]
    for job_id in ids:
        store.create(JobRecord(job_id, "job", "t", {}, status=RUNNING, lease_expires=1e12))
    items = items_for(ids, steps=12)

    async def scenario():
        progress = StageProgress(store, "denoiser")
        run = asyncio.ensure_future(run_group(groups[degree], items, progress))
        cursor, cancelled_after = 0, None
        while cancelled_after is None:
            events, cursor = await asyncio.to_thread(store.tail, cursor, 30.0)
            for e in events:
                if e.job_id == "job-b" and e.type == "step" and e.data["step"] >= 3:
                    await asyncio.to_thread(store.request_cancel, "job-b", retention_s=60)
                    cancelled_after = e.data["step"]
        results = await run
        await progress.flush()
        return results, cancelled_after

    results, cancelled_after = asyncio.run(scenario())
    stopped = results[1]
    assert isinstance(stopped, Cancelled) and stopped.request_id == "job-b"
    assert cancelled_after <= stopped.steps_done <= cancelled_after + 2
    steps_b = [e.data["step"] for e in store.events("job-b") if e.type == "step"]
    assert steps_b == list(range(1, stopped.steps_done + 1))
    alone = asyncio.run(groups[1].run(stack_inputs([items[0], items[2]])))
    for got, want in zip([results[0], results[2]], alone):
        assert got.shape == (1, *want.shape)
        assert (got[0] - want).abs().max().item() <= LATENT_TOL
    assert groups[degree].broken is None
    again = asyncio.run(groups[degree].run(stack_inputs(items[:1])))
    assert (again - results[0]).abs().max().item() <= LATENT_TOL
    assert torch.isfinite(again).all()


def test_idle_group_does_not_time_out(groups):
    """Collectives time out after PG_TIMEOUT_S; a group idle for longer still works."""
    x = inputs(1, 128, 64, steps=2)
    before = asyncio.run(groups[2].run(x))
    time.sleep(PG_TIMEOUT_S + 1.5)
    asyncio.run(groups[2].check(timeout_s=10))
    after = asyncio.run(groups[2].run(x))
    assert groups[2].broken is None
    assert (before - after).abs().max().item() == 0.0


def test_a_collective_that_times_out_breaks_the_group_and_leaves_nothing(ray_cluster):
    """Rank 1 stops (SIGSTOP): rank 0's collective fails after PG_TIMEOUT_S (so the timeout reached
    xfuser's own groups), the group is broken for good, and shutting it down removes both
    processes, the stopped one included."""
    import os
    import signal

    from deployments.sp_group import WorkerGroup, WorkerGroupBroken

    group = WorkerGroup(group_config(2))
    pids = [info["pid"] for info in group.start(timeout_s=300)]
    try:
        x = inputs(1, 128, 64, steps=2)
        asyncio.run(group.run(x))
        os.kill(pids[1], signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(WorkerGroupBroken, match="rank failed"):
            asyncio.run(group.run(x))
        assert time.monotonic() - started < 60  # the call timeout (120 s) did not decide it
        with pytest.raises(WorkerGroupBroken):
            asyncio.run(group.run(x))
    finally:
        group.shutdown()
    deadline = time.monotonic() + 30
    while any(process_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(process_alive(pid) for pid in pids)

