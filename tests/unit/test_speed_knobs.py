"""The denoiser's speed knobs on CPU (deployments/families/speed.py): padding to warmed batch
buckets changes nothing but the transformer's batch, diffusers' step cache really skips work and
survives rows leaving mid-run, the attention backend is diffusers' dispatch, and the config
refuses knob combinations that cannot work, naming the field."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from deployments.families import flux
from deployments.families.base import LoadSpec
from deployments.families.speed import bucket_for
from tests.unit.test_flux_family import inputs_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["a red fox", "a blue lighthouse", "a green field"]


@pytest.fixture(scope="module")
def spec(tiny_flux_path) -> LoadSpec:
    return LoadSpec(path=tiny_flux_path, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def encoder(spec):
    return flux.TextEncoding(spec)


def denoiser(spec, **knobs) -> flux.Denoising:
    return flux.Denoising(dataclasses.replace(spec, **knobs))


def forward_batches(model: flux.Denoising) -> list[int]:
    """The batch size of every transformer forward from now on."""
    seen: list[int] = []
    model.transformer.register_forward_pre_hook(
        lambda _m, _args, kwargs: seen.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    return seen


def run_steps(model, inputs, keep_at=None):
    run = model.prepare(inputs)
    while run.step_index < run.num_steps:
        keep = keep_at[1] if keep_at and run.step_index == keep_at[0] else None
        model.step(run, keep)
    return model.finish(run)


def test_bucket_is_the_smallest_warmed_batch_that_holds_the_rows():
    assert [bucket_for(r, (1, 2, 4, 8)) for r in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 9]
    assert bucket_for(3, ()) == 3


def test_a_batch_padded_to_its_bucket_gives_the_same_latents_and_only_its_rows(spec, encoder):
    inputs = inputs_for((encoder,), PROMPTS, [[1], [2], [3]], 64, 64)
    plain = denoiser(spec).denoise(inputs)
    padded_model = denoiser(spec, batch_buckets=(1, 2, 4, 8))
    seen = forward_batches(padded_model)
    padded = padded_model.denoise(inputs)
    assert seen == [4] * 4  # 3 rows ran as the warmed batch of 4, every step
    assert padded.shape == plain.shape
    assert torch.allclose(padded, plain, atol=1e-5)


def test_rows_leaving_mid_run_move_the_batch_down_a_bucket(spec, encoder):
    inputs = inputs_for((encoder,), PROMPTS, [[1], [2], [3]], 64, 64)
    model = denoiser(spec, batch_buckets=(1, 2, 4))
    seen = forward_batches(model)
    latents = run_steps(model, inputs, keep_at=(2, [0]))
    assert seen == [4, 4, 1, 1] and latents.shape[0] == 1
    alone = denoiser(spec).denoise(inputs_for((encoder,), PROMPTS[:1], [[1]], 64, 64))
    assert torch.allclose(latents, alone, atol=1e-5)


def test_step_mode_rows_run_only_as_warmed_batches_while_they_join_and_leave(spec, encoder):
    """Step-level batching pads each call's rows to a bucket too: a joins alone (2 rows), b joins
    at a's second step (3 rows: the bucket of 4), a ends after 3 steps (b alone: 1). Every row ends
    with the latents its request gets by itself."""
    a_in = inputs_for((encoder,), PROMPTS[:2], [[1], [2]], 64, 64, steps=3)
    b_in = inputs_for((encoder,), PROMPTS[2:], [[3]], 64, 64, steps=5, guidance=5.0)
    model = denoiser(spec, batch_buckets=(1, 2, 4))
    seen = forward_batches(model)
    a, b = model.prepare_rows(a_in), model.prepare_rows(b_in)
    model.forward_rows(a)
    rows = a + b
    while rows:
        model.forward_rows(rows)
        rows = [r for r in rows if not r.done]
    assert seen == [2, 4, 4, 1, 1, 1]
    plain = denoiser(spec)
    assert torch.allclose(torch.cat([model.finish_row(r) for r in a]), plain.denoise(a_in), atol=1e-5)
    assert torch.allclose(model.finish_row(b[0]), plain.denoise(b_in), atol=1e-5)


def block_calls(model: flux.Denoising) -> list[int]:
    calls = [0]
    # A skipped block still "runs" (the cache hook answers for it); its attention's projections do not.
    model.transformer.single_transformer_blocks[-1].attn.to_q.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_first_block_cache_skips_blocks_and_a_tiny_threshold_changes_nothing(spec, encoder):
    inputs = inputs_for((encoder,), PROMPTS[:2], [[4], [5]], 64, 64, steps=8)
    plain = denoiser(spec).denoise(inputs)
    strict = denoiser(spec, step_cache={"kind": "first_block", "threshold": 1e-9, "interval": 5})
    assert torch.equal(strict.denoise(inputs), plain)  # never close enough to skip
    loose = denoiser(spec, step_cache={"kind": "first_block", "threshold": 1.0, "interval": 5})
    calls = block_calls(loose)
    cached = loose.denoise(inputs)
    assert calls[0] < 8  # the last block ran on fewer than the 8 steps
    assert cached.shape == plain.shape and torch.isfinite(cached).all()
    assert not torch.equal(cached, plain)  # lossy, as documented


def test_the_step_cache_starts_over_when_rows_leave_and_for_each_new_batch(spec, encoder):
    model = denoiser(spec, step_cache={"kind": "first_block", "threshold": 1.0, "interval": 5})
    inputs = inputs_for((encoder,), PROMPTS, [[1], [2], [3]], 64, 64, steps=6)
    left = run_steps(model, inputs, keep_at=(3, [0, 2]))  # the cached residuals had 3 rows
    assert left.shape[0] == 2 and torch.isfinite(left).all()
    again = model.denoise(inputs_for((encoder,), PROMPTS[:1], [[7]], 64, 64, steps=6))
    fresh = denoiser(spec, step_cache={"kind": "first_block", "threshold": 1.0, "interval": 5})
    assert torch.equal(again, fresh.denoise(inputs_for((encoder,), PROMPTS[:1], [[7]], 64, 64, steps=6)))


def test_taylorseer_cache_runs_fewer_full_blocks(spec, encoder):
    inputs = inputs_for((encoder,), PROMPTS[:1], [[4]], 64, 64, steps=10)
    model = denoiser(spec, step_cache={"kind": "taylorseer", "threshold": 0.05, "interval": 3})
    calls = block_calls(model)
    latents = model.denoise(inputs)
    assert calls[0] < 10 and torch.isfinite(latents).all()


def test_the_native_attention_backend_is_diffusers_dispatch_and_changes_nothing(spec, encoder):
    inputs = inputs_for((encoder,), PROMPTS[:1], [[4]], 64, 64)
    plain = denoiser(spec).denoise(inputs)
    native = denoiser(spec, attention_backend="native")
    assert torch.allclose(native.denoise(inputs), plain, atol=1e-6)


def test_fp8_on_a_machine_without_a_capable_gpu_fails_at_load_naming_the_field(spec):
    with pytest.raises(ValueError, match=r"denoiser.quantization fp8: it needs a CUDA GPU"):
        denoiser(spec, quantization="fp8")


@pytest.mark.parametrize(
    "denoiser_args, family, message",
    [
        ({"cuda_graphs": True}, "flux", "denoiser.cuda_graphs needs denoiser.compile_blocks"),
        ({"quantization": "fp8", "device": "cpu"}, "flux", "denoiser.quantization fp8 needs a GPU"),
        ({"attention_backend": "flash", "ulysses_degree": 2}, "flux", "denoiser.attention_backend"),
        ({"step_cache": {"kind": "first_block"}, "ulysses_degree": 2}, "flux", "denoiser.step_cache needs one rank"),
        ({"step_cache": {"kind": "first_block"}}, "sd3", "do not support sd3"),
        ({"step_cache": {"kind": "first_block"}, "compile_blocks": True}, "flux", "step_cache with compile_blocks"),
        ({"attention_backend": "fastest"}, "flux", "attention_backend"),
        ({"step_cache": {"kind": "first_block", "threshold": 0}}, "flux", "threshold"),
    ],
)
def test_the_config_refuses_knobs_that_cannot_work(denoiser_args, family, message):
    from pydantic import ValidationError

    from serve_app.config import AppConfig

    with pytest.raises(ValidationError, match=message):
        AppConfig.model_validate({"model": {"path": f"builtin:tiny-{family}"}, "denoiser": denoiser_args})


def test_compiled_configs_warm_every_bucket_by_default():
    from serve_app.config import AppConfig

    def config(family, **dn):
        return AppConfig.model_validate({"model": {"path": f"builtin:tiny-{family}"}, "denoiser": dn})

    plain = config("flux")
    assert plain.denoiser.warmup_batches == (1,) and plain.transformer_buckets == ()
    compiled = config("flux", compile_blocks=True, batching={"max_batch_size": 6})
    assert compiled.denoiser.warmup_batches == (1, 2, 4, 6)
    assert compiled.transformer_buckets == (1, 2, 4, 6)
    assert [b for b, _, _ in compiled.warmup_shapes] == [1, 2, 4, 6]
    guided = config("sd3", compile_blocks=True, batching={"max_batch_size": 4})
    assert guided.transformer_buckets == (2, 4, 8)  # both guidance branches in one batch
    split = config("sd3", compile_blocks=True, cfg_degree=2, batching={"max_batch_size": 4})
    assert split.transformer_buckets == (1, 2, 4)
