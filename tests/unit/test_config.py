"""Typed app args and the shipped config files."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from deployments.denoiser import deployment_options as denoiser_options
from deployments.stage import batching_options
from serve_app.app import stage_deployments, build_app, build_graph, check_overrides
from serve_app.config import AppConfig

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def applications(path):
    return yaml.safe_load(path.read_text())["applications"]


@pytest.mark.parametrize(
    "args, needle",
    [
        ({"modle": {}}, "modle"),
        ({"model": {"dtype": "float64"}}, "dtype"),
        ({"limits": {"min_size": 100}}, "multiple of 16"),
        ({"limits": {"min_size": 512, "max_size": 256}}, "min_size"),
        ({"limits": {"max_n": 9}}, "max_n"),
        ({"defaults": {"size": "2048x2048"}}, "defaults.size"),
        ({"denoiser": {"batching": {"max_batch_size": 0}}}, "max_batch_size"),
        ({"denoiser": {"worker_num_cpus": 0}}, "worker_num_gpus"),
        ({"denoiser": {"ring_degree": 2}}, "ring_degree > 1 needs GPU"),
        ({"denoiser": {"ulysses_degree": 2, "warmup_sizes": ["256x240"]}}, "denoiser.warmup_sizes 256x240"),
        ({"denoiser": {"warmup_sizes": ["big"]}}, "1024x1024"),
        ({"denoiser": {"ulysses_degree": 4}, "defaults": {"size": "256x240"}}, "multiple of 64"),
        ({"denoiser": {"process_group_timeout_s": 0}}, "process_group_timeout_s"),
        ({"denoiser": {"warmup_batch_sizes": [16]}}, "warmup_batch_sizes"),
    ],
)
def test_bad_args_are_rejected_with_a_message(args, needle):
    with pytest.raises(ValidationError) as info:
        AppConfig.model_validate(args)
    assert needle in str(info.value)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate_and_build(path):
    for app in applications(path):
        assert app["import_path"] == "serve_app.app:build_app"
        config = AppConfig.model_validate(app["args"])
        ingress = build_app(app["args"])._bound_deployment
        assert ingress.name == "ImagesAPI"
        chains = ingress.init_args[0]
        assert list(chains) == list(config.views())
        names = {"ImagesAPI"}
        for model, view in config.views().items():
            stages = [a._bound_deployment for a in chains[model]]
            suffix = config.deployment_suffix(model)
            expected = [n + suffix for n in ("TextEncoder", "Denoiser", "VAEDecoder")]
            assert [d.name for d in stages] == expected
            names.update(expected)
            for d, stage in zip(stages, [view.text_encoder, view.denoiser, view.vae_decoder]):
                assert d.max_ongoing_requests == 2 * stage.batching.max_batch_size, d.name
                assert d.init_args == (view,), d.name  # each stage gets its own model's config
            assert stages[1].ray_actor_options["num_cpus"] == view.denoiser.replica_num_cpus
        assert {d["name"] for d in app["deployments"]} == names
        for d in app["deployments"]:
            assert "autoscaling_config" in d, d["name"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_batches_can_fill(path):
    """max_ongoing_requests >= max_batch_size x max_concurrent_batches (1), after the file's
    overrides, or a replica never holds enough requests to fill a batch."""
    for app in applications(path):
        config = AppConfig.model_validate(app["args"])
        overrides = {d["name"]: d for d in app["deployments"]}
        for name, (model, kind) in stage_deployments(config).items():
            stage = getattr(config.views()[model], kind)
            effective = overrides[name].get("max_ongoing_requests", batching_options(stage)["max_ongoing_requests"])
            assert effective >= stage.batching.max_batch_size, name


@pytest.mark.parametrize("ulysses, ring", [(1, 1), (2, 1), (2, 2), (4, 2)])
def test_denoiser_placement_group_has_a_bundle_per_worker(ulysses, ring):
    """One CPU bundle for the replica, one GPU bundle per rank, all on one node: autoscaling adds
    and removes whole SP groups."""
    config = AppConfig.model_validate(
        {
            "denoiser": {
                "worker_num_gpus": 1,
                "worker_num_cpus": 0,
                "replica_num_cpus": 1,
                "ulysses_degree": ulysses,
                "ring_degree": ring,
            }
        }
    )
    opts = denoiser_options(config)
    assert opts["placement_group_bundles"] == [{"CPU": 1}] + [{"GPU": 1}] * (ulysses * ring)
    assert opts["placement_group_strategy"] == "STRICT_PACK"
    assert opts["ray_actor_options"] == {"num_cpus": 1}


def test_sp_config_file_asks_for_two_gpus_per_replica():
    app = applications(ROOT / "configs" / "flux-2gpu-sp2.yaml")[0]
    config = AppConfig.model_validate(app["args"])
    assert config.denoiser.world_size == 2
    gpus = [b.get("GPU", 0) for b in denoiser_options(config)["placement_group_bundles"]]
    assert gpus == [0, config.denoiser.worker_num_gpus, config.denoiser.worker_num_gpus]
    assert sum(gpus) > 1  # the two workers cannot share one GPU


def test_warmup_shapes_default_to_the_default_size_alone():
    assert AppConfig().warmup_shapes == ((1, 256, 256),)
    config = AppConfig.model_validate(
        {"denoiser": {"warmup_sizes": ["128x64", "64x128"], "warmup_batch_sizes": [1, 4]}}
    )
    assert config.warmup_shapes == ((1, 128, 64), (4, 128, 64), (1, 64, 128), (4, 64, 128))
    assert AppConfig.model_validate({"denoiser": {"warmup_sizes": []}}).warmup_shapes == ()


@pytest.mark.parametrize("name", ["local.yaml", "local-sp2.yaml"])
def test_local_configs_fit_two_cpus(name):
    app = applications(ROOT / "configs" / name)[0]
    config = AppConfig.model_validate(app["args"])
    overrides = {d["name"]: d for d in app["deployments"]}
    total = 0.0
    for name, d in overrides.items():
        maxr = d["autoscaling_config"]["max_replicas"]
        if name == "Denoiser":
            per = sum(b.get("CPU", 0) for b in denoiser_options(config)["placement_group_bundles"])
        else:
            per = d["ray_actor_options"]["num_cpus"]
        total += per * maxr
    assert total <= 2.0, total


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"Denoiser": {"placement_group_bundles": [{"CPU": 1}]}}, "placement_group_bundles is derived"),
        ({"Denoiser": {"placement_group_strategy": "SPREAD"}}, "placement_group_strategy"),
        ({"Denoiser": {"ray_actor_options": {"num_gpus": 1}}}, "its workers do"),
        ({"Denoiser": {"ray_actor_options": {"num_cpus": 4}}}, "replica_num_cpus"),
        ({"TextEncoder": {"max_ongoing_requests": 2}}, "could never fill"),
    ],
)
def test_overrides_that_would_break_the_app_are_refused(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        build_graph(AppConfig(), overrides)


def test_harmless_overrides_are_applied():
    overrides = {"TextEncoder": {"ray_actor_options": {"num_cpus": 0.5}, "max_ongoing_requests": 64}}
    ingress = build_graph(AppConfig(), overrides)._bound_deployment
    encoder = ingress.init_args[0]["tiny-flux"][0]._bound_deployment
    assert encoder.ray_actor_options["num_cpus"] == 0.5 and encoder.max_ongoing_requests == 64
    check_overrides(AppConfig(), {"Denoiser": {"autoscaling_config": {"max_replicas": 3}}})


def test_validate_config_reports_a_bad_override(tmp_path, capsys):
    from serve_app.cli import main

    document = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    document["applications"][0]["deployments"][2]["placement_group_bundles"] = [{"CPU": 1}]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(document))
    assert main(["validate-config", str(path)]) == 1
    assert "placement_group_bundles" in capsys.readouterr().err
    assert main(["validate-config", str(ROOT / "configs" / "local.yaml")]) == 0


@pytest.mark.parametrize(
    "model, needle",
    [
        ({"family": "sdxl"}, "unknown family 'sdxl'"),
        ({"path": "builtin:tiny-sdxl"}, "unknown builtin model"),
        ({"path": "builtin:tiny-sd3", "family": "flux"}, "builtin:tiny-sd3 is a sd3 model, not flux"),
        ({"path": "org/some-model"}, "set model.family"),
    ],
)
def test_families_and_builtin_models_come_from_the_registry(model, needle):
    with pytest.raises(ValidationError, match=needle):
        AppConfig.model_validate({"model": model})


@pytest.mark.parametrize(
    "jobs, needle",
    [
        ({"store": {"backend": "redis"}}, "url is required"),
        ({"store": {"path": "relative/jobs.db"}}, "must be absolute"),
        ({"max_attempts": 0}, "max_attempts"),
    ],
)
def test_bad_job_settings_are_rejected(jobs, needle):
    with pytest.raises(ValidationError, match=needle):
        AppConfig.model_validate({"jobs": jobs})
