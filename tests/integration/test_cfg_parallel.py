"""CFG-parallel on CPU (gloo, two worker actors): the unconditional branch on one rank, the
conditional one on the other, all-gathered after every step, gives the latents of one worker that
runs both branches as one batch, for SD3 and PixArt-Sigma.

The two layouts differ only in the batch each transformer call sees (one branch instead of both),
which changes its output by ~4e-7. SD3 (flow matching): latents within 1e-5 absolute. PixArt:
DPM-Solver++ turns the predicted noise into predicted clean latents, multiplying any difference by
sigma/alpha, about 158 at the first step of Sigma's 1000-step linear schedule, and guidance 5
multiplies it again: seen up to 3e-4 on latents of magnitude ~4 (7e-5 of their scale), the same
whether the branches are split over two processes or run one after the other in one. The amplified
difference is absolute, the same size on a latent near 0 as on one near 4 (a per-element relative
tolerance failed on a latent of 0.3 that differed by 9e-5), so PixArt's latents are compared
within 4e-4 absolute: 1e-4 of their scale. Groups are driven directly (`WorkerGroup`), as
a Denoiser replica drives them, steps, row drops and all.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.integration.conftest import TEST_ARGS

LATENT_TOL = {"sd3": dict(rtol=0, atol=1e-5), "pixart": dict(rtol=0, atol=4e-4)}


def group_config(family: str, cfg_degree: int):
    from serve_app.config import AppConfig

    denoiser = {**TEST_ARGS["denoiser"], "cfg_degree": cfg_degree, "process_group_timeout_s": 60}
    model = {"name": f"tiny-{family}", "path": f"builtin:tiny-{family}"}
    return AppConfig.model_validate({**TEST_ARGS, "model": model, "denoiser": denoiser})


@pytest.fixture(scope="module", params=["sd3", "pixart"])
def groups(request, ray_cluster):
    from deployments.sp_group import WorkerGroup

    made = {degree: WorkerGroup(group_config(request.param, degree)) for degree in (1, 2)}
    for group in made.values():
        group.start(timeout_s=300)
    yield request.param, made
    for group in made.values():
        group.shutdown()


def inputs(family: str, rows: int, guidance: float, steps: int = 3):
    """Random embeddings of the family's shapes (negative ones too when guided)."""
    import torch

    from deployments.families.base import DenoiseInputs
    from deployments.sampling import SamplingParams

    g = torch.Generator().manual_seed(rows * 100 + int(guidance * 10))
    if family == "sd3":
        shape, pooled, mask = (rows, 77 + 256, 32), (rows, 32), None
    else:
        shape, pooled, mask = (rows, 300, 32), None, (rows, 300)

    def branch():
        return {
            "embeds": torch.randn(*shape, generator=g),
            "pooled": None if pooled is None else torch.randn(*pooled, generator=g),
            "mask": None if mask is None else (torch.rand(*mask, generator=g) > 0.3).long(),
        }

    cond, uncond = branch(), branch() if guidance > 1 else None
    return DenoiseInputs(
        prompt_embeds=cond["embeds"],
        pooled_prompt_embeds=cond["pooled"],
        prompt_attention_mask=cond["mask"],
        negative_prompt_embeds=None if uncond is None else uncond["embeds"],
        negative_pooled_prompt_embeds=None if uncond is None else uncond["pooled"],
        negative_prompt_attention_mask=None if uncond is None else uncond["mask"],
        sampling=SamplingParams(64, 96, steps, guidance, tuple(range(11, 11 + rows))),
    )


@pytest.mark.parametrize("guidance", [5.0, 1.0], ids=["guided", "unguided"])
def test_cfg_parallel_equals_one_worker(groups, guidance):
    """Guided: each rank runs one branch. Unguided (guidance 1): one branch, which both ranks run."""
    import torch

    family, made = groups
    batch = inputs(family, rows=2, guidance=guidance)
    one = asyncio.run(made[1].run(batch))
    two = asyncio.run(made[2].run(batch))
    assert one.shape == two.shape
    torch.testing.assert_close(two, one, **LATENT_TOL[family])


def test_a_row_dropped_mid_run_on_both_ranks(groups):
    """The replica drops a cancelled row from every rank between steps: the other row ends as it
    would alone, under CFG-parallel too."""
    import torch

    family, made = groups
    batch = inputs(family, rows=2, guidance=5.0, steps=4)

    async def run_dropping(group):
        group.begin(batch)
        await group.step(None, ())
        await group.step(None, ())
        await group.step([1], ())
        await group.step(None, ())
        return await group.finish()

    dropped = asyncio.run(run_dropping(made[2]))
    alone = asyncio.run(made[1].run(_row(batch, 1)))
    assert dropped.shape[0] == 1
    torch.testing.assert_close(dropped, alone, **LATENT_TOL[family])


def _row(batch, i: int):
    from dataclasses import replace

    from deployments.denoise_loop import ROW_TENSORS

    fields = {name: None if getattr(batch, name) is None else getattr(batch, name)[i : i + 1] for name in ROW_TENSORS}
    return replace(batch, **fields, sampling=batch.sampling.with_seeds((batch.sampling.seeds[i],)))
