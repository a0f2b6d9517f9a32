"""Several models in one app, families from checkpoints, negative prompts and parallel layouts:
what the config and the planner decide before anything runs."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from deployments.errors import InvalidParameter, ModelNotFound
from serve_app.app import build_app, stage_deployments
from serve_app.config import AppConfig
from serve_app.planning import Planner
from serve_app.protocol import ImageGenerationRequest
from serve_app.routes_status import stage_depths, stage_keys

THREE = {
    "models": [
        {"model": {"name": "tiny-flux", "path": "builtin:tiny-flux"}},
        {"model": {"name": "org/tiny sd3", "path": "builtin:tiny-sd3"}, "defaults": {"num_inference_steps": 6}},
        {"model": {"name": "tiny-pixart", "path": "builtin:tiny-pixart"}, "limits": {"max_n": 2}},
    ],
    "defaults": {"size": "128x128", "num_inference_steps": 3},
}


def plan(config: AppConfig, **fields):
    req = ImageGenerationRequest(prompt="a fox", seed=7, **fields)
    return Planner(config).plan(req, "req-1")


def test_each_model_gets_its_own_view_and_deployments():
    config = AppConfig.model_validate(THREE)
    views = config.views()
    assert list(views) == ["tiny-flux", "org/tiny sd3", "tiny-pixart"]
    assert [v.model.family for v in views.values()] == ["flux", "sd3", "pixart"]
    # The family's own defaults where the config gives none; the app's blocks where the entry has none.
    assert [v.default_guidance_scale for v in views.values()] == [3.5, 7.0, 4.5]
    assert [v.model.max_sequence_length for v in views.values()] == [512, 256, 300]
    assert [v.defaults.num_inference_steps for v in views.values()] == [3, 6, 3]
    assert [v.limits.max_n for v in views.values()] == [4, 4, 2]
    # One job store for the whole app.
    assert {v.store_key for v in views.values()} == {"tiny-flux"}
    names = stage_deployments(config)
    assert names["Denoiser-org-tiny-sd3"] == ("org/tiny sd3", "denoiser")
    assert len(names) == 9
    chains = build_app(THREE)._bound_deployment.init_args[0]
    assert [d._bound_deployment.name for d in chains["tiny-pixart"]] == [
        "TextEncoder-tiny-pixart",
        "Denoiser-tiny-pixart",
        "VAEDecoder-tiny-pixart",
    ]


def test_requests_pick_their_model_and_its_limits():
    config = AppConfig.model_validate(THREE)
    _, spec = plan(config)
    assert spec.model == "tiny-flux" and spec.sampling.num_inference_steps == 3
    _, spec = plan(config, model="org/tiny sd3")
    assert spec.model == "org/tiny sd3" and spec.sampling.num_inference_steps == 6
    assert spec.sampling.guidance_scale == 7.0
    with pytest.raises(InvalidParameter) as info:
        plan(config, model="tiny-pixart", n=3)
    assert info.value.param == "n"
    with pytest.raises(ModelNotFound) as info:
        plan(config, model="tiny-sdxl")
    assert info.value.status == 404 and info.value.param == "model"
    assert "'tiny-flux', 'org/tiny sd3', 'tiny-pixart'" in info.value.message


@pytest.mark.parametrize(
    "model, fields, negative",
    [
        ("org/tiny sd3", {}, ""),  # CFG by default: the empty negative prompt, as diffusers
        ("org/tiny sd3", {"negative_prompt": "blurry"}, "blurry"),
        ("org/tiny sd3", {"negative_prompt": "blurry", "guidance_scale": 1.0}, None),  # no CFG
        ("tiny-pixart", {"guidance_scale": 1.5}, ""),
        ("tiny-flux", {}, None),
        ("tiny-flux", {"negative_prompt": ""}, None),
    ],
)
def test_negative_prompt_goes_to_the_encoder_only_with_guidance(model, fields, negative):
    encode, _ = plan(AppConfig.model_validate(THREE), model=model, **fields)
    assert encode.negative_prompt == negative


def test_flux_refuses_a_negative_prompt_naming_it():
    with pytest.raises(InvalidParameter) as info:
        plan(AppConfig.model_validate(THREE), negative_prompt="blurry")
    assert info.value.param == "negative_prompt" and "guidance-distilled" in info.value.message


def test_a_long_negative_prompt_is_refused_naming_it():
    config = AppConfig.model_validate({**THREE, "limits": {"max_prompt_chars": 10}})
    with pytest.raises(InvalidParameter) as info:
        plan(config, model="org/tiny sd3", negative_prompt="x" * 11)
    assert info.value.param == "negative_prompt"


@pytest.mark.parametrize(
    "args, needle",
    [
        ({**THREE, "model": {"name": "x"}}, "either `model` or `models`"),
        ({"models": [{"model": {"name": "a"}}, {"model": {"name": "a"}}]}, "names must be unique"),
        ({"models": [{"model": {"name": "a b"}}, {"model": {"name": "a/b"}}]}, "same deployment names"),
        (
            {"models": [{"model": {"name": "a"}, "defaults": {"size": "100x100"}}]},
            "multiples of 16",
        ),
        ({"denoiser": {"cfg_degree": 2}}, "cfg_degree 2 needs a model with classifier-free guidance"),
        (
            {"model": {"path": "builtin:tiny-pixart"}, "denoiser": {"ulysses_degree": 2}},
            "not available for pixart yet",
        ),
    ],
)
def test_bad_model_layouts_are_refused(args, needle):
    with pytest.raises(ValidationError, match=needle):
        AppConfig.model_validate(args)


def test_cfg_degree_doubles_the_workers_not_the_bands():
    config = AppConfig.model_validate(
        {"model": {"path": "builtin:tiny-sd3"}, "denoiser": {"cfg_degree": 2}}
    )
    assert config.denoiser.world_size == 2 and config.denoiser.sp_degree == 1
    assert config.height_multiple == 16
    flux = AppConfig.model_validate({"denoiser": {"ulysses_degree": 2}})
    assert flux.denoiser.world_size == 2 and flux.height_multiple == 32


def write_checkpoint(root, pipeline: str, heads: int):
    (root / "transformer").mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    (root / "transformer" / "config.json").write_text(json.dumps({"num_attention_heads": heads}))
    return str(root)


def test_the_family_comes_from_the_checkpoint(tmp_path):
    path = write_checkpoint(tmp_path / "m", "StableDiffusion3Pipeline", 24)
    config = AppConfig.model_validate({"model": {"path": path}})
    assert config.model.family == "sd3" and config.model.max_sequence_length == 256
    other = write_checkpoint(tmp_path / "k", "KandinskyPipeline", 8)
    with pytest.raises(ValidationError, match="KandinskyPipeline is not a served family"):
        AppConfig.model_validate({"model": {"path": other}})


def test_ulysses_must_divide_the_heads_the_rule_is_named(tmp_path):
    """SD3.5-large has 38 heads: Ulysses 4 cannot split them (checked before whether the family
    has sequence parallelism at all, so the message says which degrees could)."""
    path = write_checkpoint(tmp_path / "large", "StableDiffusion3Pipeline", 38)
    args = {"model": {"path": path}, "denoiser": {"ulysses_degree": 4, "worker_num_gpus": 1}}
    with pytest.raises(ValidationError) as info:
        AppConfig.model_validate(args)
    message = str(info.value)
    assert "ulysses_degree 4 must divide the transformer's 38 attention heads" in message
    assert "[1, 2, 19, 38]" in message
    flux = write_checkpoint(tmp_path / "flux", "FluxPipeline", 38)
    args = {"model": {"path": flux}, "denoiser": {"ulysses_degree": 2, "worker_num_gpus": 1}}
    assert AppConfig.model_validate(args).denoiser.sp_degree == 2


def test_status_counts_each_models_stages():
    config = AppConfig.model_validate(THREE)
    models = list(config.views())
    progress = [
        None,  # accepted, no stage reported yet: the first model's text encoder
        {"stage": "denoiser", "state": "running", "model": "tiny-pixart"},
        {"stage": "text_encoder", "state": "finished", "model": "org/tiny sd3"},
    ]
    depths = stage_depths(progress, models)
    assert depths["tiny-flux/text_encoder"] == 1
    assert depths["tiny-pixart/denoiser"] == 1
    assert depths["org/tiny sd3/denoiser"] == 1
    assert sum(depths.values()) == 3
    assert stage_keys(config)["org/tiny sd3/vae_decoder"] == "VAEDecoder-org-tiny-sd3"
    single = AppConfig()
    assert stage_keys(single) == {"text_encoder": "TextEncoder", "denoiser": "Denoiser", "vae_decoder": "VAEDecoder"}
