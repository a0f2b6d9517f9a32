"""FLUX rows for step-level batching: rows of different requests (step counts, guidance, progress)
share transformer calls and each still ends with the latents it gets alone, which are
`FluxPipeline.__call__`'s."""

from __future__ import annotations

import pytest
import torch

from deployments.families import flux
from deployments.families.base import LoadSpec
from tests.unit.test_flux_family import inputs_for
from tests.helpers import max_abs_diff as max_diff, run_row_alone as alone


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def roles(tiny_flux_path):
    spec = LoadSpec(path=tiny_flux_path, dtype="float32", device="cpu")
    return flux.TextEncoding(spec), flux.Denoising(spec)


def test_a_row_alone_equals_the_pipeline(roles, reference):
    _, dn = roles
    inputs = inputs_for(roles, ["a red robot"], [(11,)], 64, 64, steps=3, guidance=2.0)
    (row,) = dn.prepare_rows(inputs)
    ours = alone(dn, row)
    assert row.step_index == row.num_steps == 3
    ref = reference.pipe(
        prompt_embeds=inputs.prompt_embeds,
        pooled_prompt_embeds=inputs.pooled_prompt_embeds,
        width=64,
        height=64,
        num_inference_steps=3,
        guidance_scale=2.0,
        generator=torch.Generator("cpu").manual_seed(11),
        output_type="latent",
    ).images
    assert ours.shape == ref.shape == (1, (64 // 16) ** 2, dn.transformer.config.in_channels)
    assert torch.equal(ours, ref)  # the same batch of one, one thread: bit for bit


def test_rows_joining_at_different_steps_end_as_they_do_alone(roles):
    _, dn = roles
    dog = inputs_for(roles, ["a dog in the rain"], [(21,)], 64, 64, steps=6, guidance=5.0)
    fruit = inputs_for(roles, ["a bowl of fruit"], [(22, 23)], 64, 64, steps=3, guidance=2.0)
    solo = [alone(dn, r) for r in dn.prepare_rows(dog) + dn.prepare_rows(fruit)]

    (a,) = dn.prepare_rows(dog)
    dn.forward_rows([a])
    dn.forward_rows([a])
    b, c = dn.prepare_rows(fruit)
    dn.forward_rows([a, b])  # b joins a at a's step 2; c waits a step
    dn.forward_rows([c, a, b])
    dn.forward_rows([a, b, c])  # b's third and last step
    assert b.done and not a.done and not c.done
    dn.forward_rows([a, c])
    assert (a.step_index, b.step_index, c.step_index) == (6, 3, 3) and a.done and c.done
    with pytest.raises(ValueError):
        dn.forward_rows([a])
    batched = [dn.finish_row(r) for r in (a, b, c)]

    diffs = [max_diff(x, y) for x, y in zip(batched, solo)]
    seeds_apart = max_diff(solo[1], solo[2])
    # fp32, one thread: a batch of 2-3 rounds differently from a batch of one; measured at most
    # 4.8e-7 (4 float32 ulps at 1.0) over 8 seed sets. A wrong timestep or guidance is off by ~0.1.
    assert max(diffs) <= 1e-6, diffs
    assert seeds_apart > 1.0  # 5.4: different noise really differs, a mix-up could not pass above


def test_rows_of_different_sizes_cannot_share_a_call(roles):
    _, dn = roles
    (small,) = dn.prepare_rows(inputs_for(roles, ["a cat"], [(1,)], 64, 64, steps=2))
    (tall,) = dn.prepare_rows(inputs_for(roles, ["a cat"], [(1,)], 64, 128, steps=2))
    with pytest.raises(ValueError, match="128x64"):
        dn.forward_rows([small, tall])
    assert small.step_index == tall.step_index == 0
