"""The FLUX roles chained reproduce diffusers' FluxPipeline.__call__ in-process."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deployments.families import flux
from deployments.families.base import DenoiseInputs, LoadSpec
from deployments.sampling import SamplingParams
from tests.helpers import max_level_diff


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def roles(tiny_flux_path):
    spec = LoadSpec(path=tiny_flux_path, dtype="float32", device="cpu")
    return flux.TextEncoding(spec), flux.Denoising(spec), flux.Decoding(spec)


def inputs_for(roles, prompts, seeds_per_prompt, width, height, steps=4, guidance=3.5):
    te = roles[0]
    encoded = te.encode_prompt(te.tokenize(prompts))
    reps = [len(s) for s in seeds_per_prompt]
    inputs = DenoiseInputs(
        prompt_embeds=torch.cat([encoded.prompt_embeds[i : i + 1].repeat(r, 1, 1) for i, r in enumerate(reps)]),
        pooled_prompt_embeds=torch.cat(
            [encoded.pooled_prompt_embeds[i : i + 1].repeat(r, 1) for i, r in enumerate(reps)]
        ),
        sampling=SamplingParams(
            height, width, steps, guidance, tuple(s for seeds in seeds_per_prompt for s in seeds)
        ),
    )
    return inputs


def generate(roles, prompts, seeds_per_prompt, width, height, steps=4, guidance=3.5):
    inputs = inputs_for(roles, prompts, seeds_per_prompt, width, height, steps, guidance)
    return pictures(roles, roles[1].denoise(inputs), width, height)


def pictures(roles, latents, width, height):
    return [np.asarray(im).astype(np.int16) for im in roles[2].decode(latents, height, width)]


def test_single_request_equals_pipeline_exactly(roles, reference):
    for prompt, seed, (w, h) in [("a photo of a cat", 3, (256, 256)), ("a red robot", 11, (192, 128))]:
        ours = generate(roles, [prompt], [(seed,)], w, h)[0]
        assert ours.shape == (h, w, 3)
        assert max_level_diff(ours, reference.image(prompt, seed, width=w, height=h)) == 0


def test_n_images_equal_num_images_per_prompt_with_generator_list(roles, reference):
    ours = generate(roles, ["a castle at night"], [(5, 6, 7)], 128, 128)
    ref = reference.images("a castle at night", 5, width=128, height=128, n=3)
    assert [max_level_diff(o, r) for o, r in zip(ours, ref)] == [0, 0, 0]
    # and each image is the one a solo request with that seed gives
    assert max_level_diff(ours[1], reference.image("a castle at night", 6, width=128, height=128)) <= 1


def test_batch_of_different_prompts_is_batch_invariant(roles, reference):
    prompts = ["a cat", "a dog in the rain", "an astronaut riding a horse", "a bowl of fruit"]
    ours = generate(roles, prompts, [(i,) for i in range(4)], 128, 128)
    diffs = [max_level_diff(o, reference.image(p, i, width=128, height=128)) for i, (p, o) in enumerate(zip(prompts, ours))]
    assert max(diffs) <= 1, diffs  # fp32: a batch changes results by at most one 8-bit level
    # images of different requests are really different (a mix-up could not pass the check above)
    assert max_level_diff(ours[0], ours[1]) > 50


def test_every_call_gets_its_own_scheduler(roles):
    _, dn, _ = roles
    a, b = dn.pipeline(), dn.pipeline()
    assert a.scheduler is not b.scheduler
    assert a.transformer is b.transformer
    assert a.vae_scale_factor == 8


def test_tokenize_counts_untruncated_tokens(roles):
    te, _, _ = roles
    long_prompt = "cat " * 600
    tokens = te.tokenize(["a cat", long_prompt])
    assert tokens.token_counts[0] < 10
    assert tokens.token_counts[1] > 512
    assert tokens.input_ids[1].shape == (2, 512)
    assert tokens.input_ids[0].shape == (2, 77)


def test_rows_dropped_between_steps_leave_the_others_as_they_were(roles, reference):
    """The per-step contract: a batch that loses rows mid-loop (a cancelled request) gives every
    kept row the image it gets alone, and runs only the kept rows from then on."""
    _, dn, _ = roles
    prompts = ["a cat", "a dog in the rain", "a bowl of fruit"]
    inputs = inputs_for(roles, prompts, [(20,), (21, 22), (23,)], 128, 128, steps=6)
    run = dn.prepare(inputs)
    dn.step(run)
    dn.step(run)
    dn.step(run, keep=[1, 2, 3])  # the first request is cancelled after step 2
    assert run.rows == 3
    dn.step(run, keep=[0, 2])  # rows now: dog 21, dog 22, fruit 23; the second dog image goes
    while run.step_index < run.num_steps:
        dn.step(run)
    kept = pictures(roles, dn.finish(run), 128, 128)
    assert len(kept) == 2
    # row 0 is "a dog in the rain" seed 21, row 1 is "a bowl of fruit" seed 23
    for image, (prompt, seed) in zip(kept, [("a dog in the rain", 21), ("a bowl of fruit", 23)]):
        assert max_level_diff(image, reference.image(prompt, seed, width=128, height=128, steps=6)) <= 1


def test_previews_are_small_images_of_the_rows_asked(roles):
    _, dn, _ = roles
    run = dn.prepare(inputs_for(roles, ["a cat", "a dog"], [(1,), (2,)], 192, 128, steps=4))
    assert dn.preview(run, [0]) == []  # no step yet: nothing predicted
    dn.step(run)
    previews = dn.preview(run, [1])
    assert len(previews) == 1
    assert previews[0].shape == (128 // 8, 192 // 8, 3) and previews[0].dtype == np.uint8
    assert previews[0].max() == 255 and previews[0].min() == 0
