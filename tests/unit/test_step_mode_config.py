"""`denoiser.batching.mode: step` (step-level batching) is accepted only where it can run: a family
with per-row denoising (all three today), no CFG-parallel ranks, no step cache; other stages refuse
it. Unset, the denoiser runs in step mode unless the config asks for what only the request mode
does."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from serve_app.config import AppConfig


def config(family: str, denoiser: dict, **stages):
    return AppConfig.model_validate(
        {"model": {"path": f"builtin:tiny-{family}"}, "denoiser": denoiser, **stages}
    )


@pytest.mark.parametrize("family", ["flux", "sd3", "pixart"])
def test_step_mode_is_accepted_for_every_family_and_is_the_default(family):
    assert AppConfig().denoiser.batching_mode == "step"
    assert config(family, {}).denoiser.batching_mode == "step"
    assert config(family, {"batching": {"mode": "step"}}).denoiser.batching_mode == "step"
    assert config(family, {"batching": {"mode": "request"}}).denoiser.batching_mode == "request"


@pytest.mark.parametrize(
    "family, denoiser",
    [("sd3", {"cfg_degree": 2}), ("pixart", {"cfg_degree": 2}), ("flux", {"step_cache": {"kind": "first_block"}})],
)
def test_unset_mode_is_request_where_step_cannot_run(family, denoiser):
    """A config that asks for CFG-parallel ranks or a step cache keeps working with the mode unset."""
    assert config(family, denoiser).denoiser.batching_mode == "request"


def test_step_mode_takes_sequence_parallelism():
    sp = config("flux", {"ulysses_degree": 2, "batching": {"mode": "step"}})
    assert sp.denoiser.world_size == 2 and sp.denoiser.batching.mode == "step"


@pytest.mark.parametrize(
    "family, denoiser, message",
    [
        ("sd3", {"cfg_degree": 2}, "denoiser.batching.mode step with cfg_degree 2"),
        ("pixart", {"cfg_degree": 2}, "denoiser.batching.mode step with cfg_degree 2"),
        ("flux", {"step_cache": {"kind": "first_block"}}, "denoiser.batching.mode step with denoiser.step_cache"),
    ],
)
def test_step_mode_is_refused_where_it_cannot_run(family, denoiser, message):
    with pytest.raises(ValidationError, match=message):
        config(family, {**denoiser, "batching": {"mode": "step"}})


@pytest.mark.parametrize("stage", ["text_encoder", "vae_decoder"])
def test_other_stages_refuse_step_mode(stage):
    with pytest.raises(ValidationError, match=f"{stage}.batching.mode step"):
        config("flux", {}, **{stage: {"batching": {"mode": "step"}}})


def test_the_registry_says_which_families_have_rows():
    """`FamilySpec.step_rows` (read by the torch-free config) matches the family modules."""
    from deployments.families.specs import family_names, family_spec, load_family

    for name in family_names():
        assert family_spec(name).step_rows == hasattr(load_family(name).Denoising, "prepare_rows"), name

