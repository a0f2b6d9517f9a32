"""The denoiser's memory budget: the FLUX estimate, the config check (fields named in the message)
and the check a replica makes at start with its real weights and device."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from deployments.families import flux_memory
from deployments.memory_budget import GIB, replica_error
from serve_app.config import AppConfig

FLUX_DEV = "black-forest-labs/FLUX.1-dev"  # a hub id: FLUX.1's architecture is assumed


def args(budget=None, max_size=2048, batch=4, path=FLUX_DEV, **denoiser) -> dict:
    return {
        "model": {"path": path, "family": "flux", "dtype": "bfloat16"},
        "denoiser": {"memory_budget_gb": budget, "batching": {"max_batch_size": batch}, **denoiser},
        "vae_decoder": {"batching": {"max_batch_size": batch}},
        "limits": {"max_size": max_size, "max_n": min(4, batch)},
        "defaults": {"size": "256x256"},
    }


def test_the_parameter_formula_matches_diffusers_flux_dev_transformer():
    import torch
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        real = sum(p.numel() for p in FluxTransformer2DModel(guidance_embeds=True).parameters())
    estimate = flux_memory.transformer_params(flux_memory.FLUX1_TRANSFORMER)
    assert abs(estimate - real) / real < 0.005, (estimate, real)


def test_the_estimate_grows_with_rows_and_pixels_and_shrinks_with_sp():
    arch = flux_memory.FLUX1_TRANSFORMER
    one = flux_memory.denoise_bytes(arch, 1, 1024, 1024, "bfloat16")
    assert flux_memory.denoise_bytes(arch, 2, 1024, 1024, "bfloat16") > one
    assert flux_memory.denoise_bytes(arch, 1, 2048, 2048, "bfloat16") > one
    assert flux_memory.denoise_bytes(arch, 1, 1024, 1024, "bfloat16", sp_degree=2) < one
    assert flux_memory.denoise_bytes(arch, 1, 1024, 1024, "float32") > one


def test_a_config_whose_largest_batch_fits_its_budget_validates():
    config = AppConfig.model_validate(args(budget=40))
    assert config.denoiser.memory_budget_gb == 40


@pytest.mark.parametrize(
    "budget, max_size, batch, needles",
    [
        # FLUX.1-dev's weights alone are ~22.2 GiB in bf16: not even one 2048^2 image fits 24 GiB.
        (24, 2048, 4, ["even one image of limits.max_size (2048x2048)", "denoiser.memory_budget_gb"]),
        # One image fits 28 GiB, a batch of 4 does not.
        (28, 2048, 4, ["denoiser.batching.max_batch_size (4)", "limits.max_size (2048x2048)", "limits.max_n"]),
    ],
)
def test_a_config_whose_largest_batch_does_not_fit_is_refused_naming_the_fields(budget, max_size, batch, needles):
    with pytest.raises(ValidationError) as info:
        AppConfig.model_validate(args(budget, max_size, batch))
    for needle in needles:
        assert needle in str(info.value)
    AppConfig.model_validate(args(budget, 1024, 1))  # the same budget with a smaller limit


def test_sp_shares_the_activations_across_ranks():
    tight = args(budget=33, batch=8, ulysses_degree=1)
    with pytest.raises(ValidationError, match="max_batch_size"):
        AppConfig.model_validate({**tight, "limits": {"max_size": 2048, "max_n": 4}})
    AppConfig.model_validate({**args(budget=33, batch=8, ulysses_degree=2), "limits": {"max_size": 2048, "max_n": 4}})


def test_a_local_folder_is_estimated_from_its_own_configs(tmp_path):
    for sub, config in [
        ("transformer", {**flux_memory.FLUX1_TRANSFORMER, "num_layers": 1, "num_single_layers": 1}),
        ("vae", flux_memory.FLUX1_VAE),
    ]:
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "config.json").write_text(json.dumps(config))
    AppConfig.model_validate(args(budget=22, path=str(tmp_path)))  # 2 blocks, not 57: it fits
    with pytest.raises(ValidationError, match="memory_budget_gb"):
        AppConfig.model_validate(args(budget=1, path=str(tmp_path)))


def test_a_builtin_model_is_left_to_the_replica_and_no_budget_is_unchecked():
    AppConfig.model_validate(args(budget=0.001, path="builtin:tiny-flux", max_size=512, batch=4))
    AppConfig.model_validate(args(budget=None, max_size=8192, batch=64))


def worker(total_gib, weights_gib, rank=0) -> dict:
    return {
        "rank": rank,
        "memory": {
            "device_total_bytes": None if total_gib is None else total_gib * GIB,
            "weights_bytes": weights_gib * GIB,
            "transformer_config": dict(flux_memory.FLUX1_TRANSFORMER),
        },
    }


def test_the_replica_derives_its_budget_from_the_gpu_and_its_share():
    half = AppConfig.model_validate(args(worker_num_gpus=0.5))
    assert replica_error(half, [worker(79.2, 22.2)]) is None  # 39.6 GiB for 4 x 2048^2
    error = replica_error(half, [worker(40, 22.2)])  # 20 GiB: not even the weights
    assert "GPU's memory x denoiser.worker_num_gpus" in error and "replica start on rank 0" in error
    over = AppConfig.model_validate(args(budget=100))
    assert "more than the GPU's 79.2 GiB" in replica_error(over, [worker(79.2, 22.2)])
    assert replica_error(half, [worker(None, 22.2)]) is None  # CPU without a budget: unchecked
    cpu = AppConfig.model_validate(args(budget=23, max_size=512, batch=1, path="builtin:tiny-flux"))
    assert "memory_budget_gb" in replica_error(cpu, [worker(None, 22.2)])


@pytest.mark.parametrize("name", ["flux-1gpu.yaml", "flux-2gpu-sp2.yaml"])
def test_shipped_gpu_configs_pass_the_replica_check_on_an_80gb_gpu(name):
    import yaml

    from tests.unit.test_config import ROOT

    app = yaml.safe_load((ROOT / "configs" / name).read_text())["applications"][0]
    config = AppConfig.model_validate(app["args"])
    weights = flux_memory.transformer_params(flux_memory.FLUX1_TRANSFORMER) * 2 / GIB
    ranks = [worker(79.2, weights, rank) for rank in range(config.denoiser.world_size)]
    assert replica_error(config, ranks) is None
