"""SD3 and PixArt-Sigma, the families with classifier-free guidance: their three roles chained, as
the stages chain them, give the image of diffusers' own pipeline in-process (tiny checkpoints, same
seeds): 0 levels for an image alone, <= 1 level within a batch; with and without a negative prompt,
with and without guidance, at two sizes. Rows dropped mid-run leave the others unchanged (PixArt's
multistep scheduler keeps per-row history), and the tiny checkpoints are deterministic."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from deployments.families.base import DenoiseInputs, LoadSpec
from deployments.families.specs import family_spec, load_family
from deployments.sampling import SamplingParams
from tests.helpers import guided_inputs

PIPELINES = {"sd3": "StableDiffusion3Pipeline", "pixart": "PixArtSigmaPipeline"}


class Chain:
    """The family's roles, called as the TextEncoder, Denoiser and VAEDecoder stages call them."""

    def __init__(self, family: str, path: str):
        module = load_family(family)
        load = LoadSpec(path, "float32", "cpu", family_spec(family).default_max_sequence_length)
        self.encoding = module.TextEncoding(load)
        self.denoising = module.Denoising(load)
        self.decoding = module.Decoding(load)

    def encode(self, texts):
        return self.encoding.encode_prompt(self.encoding.tokenize(texts))

    def inputs(self, prompts, negatives, seeds, width, height, steps, guidance) -> DenoiseInputs:
        # Prompts in one batch, negative prompts in a second one, as the TextEncoder stage does.
        cond = self.encode(prompts)
        uncond = self.encode(negatives) if guidance > 1 else None
        return guided_inputs(cond, uncond, SamplingParams(height, width, steps, guidance, tuple(seeds)))

    def images(self, *args, drop_at=None, keep=None):
        inputs = self.inputs(*args)
        run = self.denoising.prepare(inputs)
        while run.step_index < run.num_steps:
            self.denoising.step(run, keep if run.step_index == drop_at else None)
        latents = self.denoising.finish(run)
        height, width = inputs.sampling.height, inputs.sampling.width
        return [np.asarray(im).astype(np.int16) for im in self.decoding.decode(latents, height, width)]


@pytest.fixture(scope="module", params=["sd3", "pixart"])
def family(request, tmp_path_factory):
    import diffusers

    from deployments.tiny.store import build_tiny

    name = request.param
    path = str(build_tiny(name, tmp_path_factory.mktemp(name) / "model"))
    pipe = getattr(diffusers, PIPELINES[name]).from_pretrained(path, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    extra = {"max_sequence_length": family_spec(name).default_max_sequence_length}
    if name == "pixart":
        extra.update(clean_caption=False, use_resolution_binning=False)

    def reference(prompts, negatives, seeds, width, height, steps, guidance):
        out = pipe(
            prompts,
            negative_prompt=negatives,
            width=width,
            height=height,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
            output_type="np",
            **extra,
        ).images
        return [(im * 255).round().astype(np.int16) for im in out]

    return name, path, Chain(name, path), reference


@pytest.mark.parametrize(
    "case",
    [
        (["a lighthouse"], [""], [3], 64, 64, 4, 5.0),  # CFG, the default empty negative prompt
        (["A Fox At Night "], ["blurry, dark"], [5], 96, 128, 4, 4.5),  # another size, a negative
        (["a lighthouse"], [""], [3], 64, 64, 3, 1.0),  # guidance 1: no unconditional branch
    ],
    ids=["cfg", "negative-96x128", "no-cfg"],
)
def test_an_image_alone_equals_the_pipeline(family, case):
    _, _, chain, reference = family
    assert np.abs(chain.images(*case)[0] - reference(*case)[0]).max() == 0


def test_a_batch_equals_the_pipeline_within_one_level(family):
    _, _, chain, reference = family
    case = (["a cat", "a ship in a storm, oil painting", "an owl"], ["", "calm", "blurry"], [1, 2, 3], 64, 64, 3, 6.0)
    for got, want in zip(chain.images(*case), reference(*case)):
        assert np.abs(got - want).max() <= 1


def test_rows_dropped_mid_run_leave_the_others_as_if_alone(family):
    _, _, chain, _ = family
    both = chain.images(["a cat", "an owl"], ["", "fog"], [8, 9], 64, 64, 4, 5.0, drop_at=2, keep=[1])
    alone = chain.images(["an owl"], ["fog"], [9], 64, 64, 4, 5.0)
    assert len(both) == 1
    assert np.abs(both[0] - alone[0]).max() <= 1


def test_stepping_equals_denoise_and_previews_come_from_the_run(family):
    _, _, chain, _ = family
    inputs = chain.inputs(["a cat"], [""], [4], 64, 64, 3, 5.0)
    run = chain.denoising.prepare(inputs)
    chain.denoising.step(run)
    previews = chain.denoising.preview(run, [0])
    assert len(previews) == 1 and previews[0].shape == (8, 8, 3) and previews[0].dtype == np.uint8
    while run.step_index < run.num_steps:
        chain.denoising.step(run)
    torch.testing.assert_close(chain.denoising.finish(run), chain.denoising.denoise(inputs), rtol=0, atol=0)


def test_warm_up_inputs_run_the_guided_path(family):
    name, _, chain, _ = family
    dummy = chain.denoising.dummy_inputs(2, 64, 64, 2)
    assert dummy.do_classifier_free_guidance
    assert dummy.sampling.guidance_scale == family_spec(name).default_guidance_scale
    assert chain.denoising.denoise(dummy).shape[0] == 2


def test_the_tiny_checkpoint_is_deterministic_and_loads_offline(family, tmp_path):
    name, path, _, _ = family
    from pathlib import Path

    from deployments.families.checkpoint import detect_family
    from deployments.tiny.store import build_tiny

    again = build_tiny(name, tmp_path / "again")

    def digest(root: Path) -> dict[str, str]:
        return {
            str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(root.rglob("*"))
            if f.is_file()
        }

    assert digest(Path(path)) == digest(again)
    assert detect_family(path) == name
    assert sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) < 8 * 1024**2
