"""SD3 and PixArt-Sigma rows for step-level batching: rows of different requests (step counts,
guidance with and without classifier-free guidance, progress) share transformer calls, a row with
CFG as two transformer rows, and each still ends with the latents it gets alone, which are the
diffusers pipeline's (`output_type="latent"`, same embeddings, seed, steps and guidance)."""

from __future__ import annotations

import pytest
import torch

from deployments.families.base import DenoiseInputs, LoadSpec
from deployments.families.specs import family_spec, load_family
from deployments.sampling import SamplingParams
from tests.helpers import guided_inputs, max_abs_diff as max_diff, run_row_alone as alone

PIPELINES = {"sd3": "StableDiffusion3Pipeline", "pixart": "PixArtSigmaPipeline"}

# A batch of 2-6 transformer rows rounds differently from a batch of one (fp32, one thread), and
# the steps carry that on. Measured over 40 seed sets of the mixed-rows test below: SD3 at most
# 4.4e-6 on latents of magnitude ~4-5 (a few float32 ulps there); PixArt at most 4.9e-4, because
# DPM-Solver++ multiplies the difference by sigma/alpha (~158 at the first step of Sigma's
# schedule) and guidance multiplies it again (see test_cfg_parallel.py), on latents the tiny
# random model drives to magnitude ~600: 8.3e-7 of their scale. The amplified difference is
# absolute (as large on a latent near 0), so PixArt's tolerance is a share of the latents' largest
# magnitude, not per element. A wrong timestep, guidance scale or scheduler history is off by far
# more: the seeds-apart check below shows the scale of a mix-up.
TOLERANCE = {"sd3": 6e-6, "pixart": 1e-6}  # sd3: absolute; pixart: times the latents' scale


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=["sd3", "pixart"])
def family(request, private_cache):
    from deployments.tiny.store import ensure_builtin

    name = request.param
    path = str(ensure_builtin(f"tiny-{name}"))
    module = load_family(name)
    load = LoadSpec(path, "float32", "cpu", family_spec(name).default_max_sequence_length)
    return name, path, module.TextEncoding(load), module.Denoising(load)


def inputs_for(te, prompt, negative, seeds, steps, guidance, width=64, height=64) -> DenoiseInputs:
    """One request's inputs as the TextEncoder stage gives them: negatives only with CFG."""
    n = len(seeds)
    cond = te.encode_prompt(te.tokenize([prompt] * n))
    uncond = te.encode_prompt(te.tokenize([negative] * n)) if guidance > 1 else None
    return guided_inputs(cond, uncond, SamplingParams(height, width, steps, guidance, tuple(seeds)))


def test_a_row_with_cfg_alone_equals_the_pipeline(family):
    import diffusers

    name, path, te, dn = family
    inputs = inputs_for(te, "a lighthouse at dusk", "blurry", [3], steps=4, guidance=4.5)
    (row,) = dn.prepare_rows(inputs)
    assert row.branches == 2
    ours = alone(dn, row)
    assert row.step_index == row.num_steps == 4

    pipe = getattr(diffusers, PIPELINES[name]).from_pretrained(path, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    embeds = {
        "prompt_embeds": inputs.prompt_embeds,
        "negative_prompt_embeds": inputs.negative_prompt_embeds,
    }
    if name == "sd3":
        embeds.update(
            pooled_prompt_embeds=inputs.pooled_prompt_embeds,
            negative_pooled_prompt_embeds=inputs.negative_pooled_prompt_embeds,
        )
    else:
        embeds.update(
            negative_prompt=None,
            prompt_attention_mask=inputs.prompt_attention_mask,
            negative_prompt_attention_mask=inputs.negative_prompt_attention_mask,
            clean_caption=False,
            use_resolution_binning=False,
        )
    ref = pipe(
        **embeds,
        width=64,
        height=64,
        num_inference_steps=4,
        guidance_scale=4.5,
        generator=[torch.Generator("cpu").manual_seed(3)],
        output_type="latent",
    ).images
    assert ours.shape == ref.shape == (1, dn.transformer.config.in_channels, 8, 8)
    assert torch.equal(ours, ref)  # the same batch of two branches, one thread: bit for bit


def test_rows_with_and_without_cfg_joining_at_different_steps_end_as_they_do_alone(family):
    name, _, te, dn = family
    dog = inputs_for(te, "a dog in the rain", "blurry", [21], steps=5, guidance=4.5)
    fruit = inputs_for(te, "a bowl of fruit", "", [22, 23], steps=3, guidance=1.0)  # no CFG
    ship = inputs_for(te, "a ship in a storm", "calm", [24], steps=3, guidance=7.0)
    solo = [alone(dn, r) for r in dn.prepare_rows(dog) + dn.prepare_rows(fruit) + dn.prepare_rows(ship)]

    (a,) = dn.prepare_rows(dog)
    dn.forward_rows([a])
    dn.forward_rows([a])
    b, c = dn.prepare_rows(fruit)
    (d,) = dn.prepare_rows(ship)
    assert (a.branches, b.branches, c.branches, d.branches) == (2, 1, 1, 2)
    dn.forward_rows([a, b, d])  # b and d join a at a's step 2; c waits a step
    dn.forward_rows([c, a, b, d])  # 2 + 1 + 1 + 2 transformer rows, three guidance settings
    dn.forward_rows([a, b, c, d])  # a's, b's and d's last steps
    assert a.done and b.done and d.done and not c.done
    dn.forward_rows([c])
    assert (a.step_index, b.step_index, c.step_index, d.step_index) == (5, 3, 3, 3) and c.done
    with pytest.raises(ValueError, match="not be done"):
        dn.forward_rows([a])
    batched = [dn.finish_row(r) for r in (a, b, c, d)]

    diffs = [max_diff(x, y) for x, y in zip(batched, solo)]
    scale = max(x.abs().max().item() for x in solo)
    seeds_apart = max_diff(solo[1], solo[2])
    tolerance = TOLERANCE[name] * (scale if name == "pixart" else 1.0)
    assert max(diffs) <= tolerance, (diffs, scale, tolerance)
    assert seeds_apart > 1000 * tolerance  # different noise really differs: a mix-up could not pass


def test_a_row_alone_steps_as_its_batch_would(family):
    """Each row's own scheduler (DPM-Solver++ keeps a history of model outputs per run) does to its
    row exactly what one scheduler does to the batch: the same model outputs give the same
    latents, bit for bit."""
    name, _, _, dn = family
    latents = torch.randn(2, dn.transformer.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    schedulers = [dn.pipeline().scheduler for _ in range(3)]  # fresh ones
    for s in schedulers:
        if name == "sd3":
            dn.schedule(s, latents, 4)
        else:
            dn.schedule(s, 4)
    batch, rows = latents, [latents[0:1], latents[1:2]]
    outputs = torch.Generator().manual_seed(1)
    for t in schedulers[0].timesteps:
        model_output = torch.randn(latents.shape, generator=outputs)
        batch = schedulers[0].step(model_output, t, batch, return_dict=False)[0]
        rows = [
            s.step(model_output[i : i + 1], t, r, return_dict=False)[0]
            for i, (s, r) in enumerate(zip(schedulers[1:], rows))
        ]
    assert torch.equal(torch.cat(rows), batch)


def test_rows_of_different_sizes_cannot_share_a_call(family):
    _, _, te, dn = family
    (small,) = dn.prepare_rows(inputs_for(te, "a cat", "", [1], steps=2, guidance=4.5))
    (tall,) = dn.prepare_rows(inputs_for(te, "a cat", "", [1], steps=2, guidance=1.0, width=64, height=128))
    with pytest.raises(ValueError, match="64x64, 128x64"):
        dn.forward_rows([small, tall])
    assert small.step_index == tall.step_index == 0
