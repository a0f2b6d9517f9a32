"""The one registry of model families: what the config, the CLI, the tiny-model maker and the
stages know of a family, without importing torch or diffusers."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class FamilySpec:
    name: str
    # Width/height must be multiples of this (VAE downsampling x latent patch size).
    size_multiple: int
    # Import path of the module holding the family's three roles (text encoding, denoising,
    # decoding); imported lazily, inside the replica that needs it.
    module: str
    # `module:function` writing a tiny random-weight checkpoint of the family (`builtin:tiny-<name>`).
    tiny_builder: Optional[str] = None
    # Import path of the family's torch-free device memory model (`read_configs`, `denoise_bytes`,
    # `decode_bytes`; see `deployments.families.flux_memory`), used by the memory budget checks.
    memory_model: Optional[str] = None
    # diffusers pipeline classes (`_class_name` in a checkpoint's model_index.json) of the family:
    # how a checkpoint's family is found when the config does not name it.
    pipelines: tuple[str, ...] = ()
    # Whether guidance_scale > 1 means classifier-free guidance: a negative prompt branch (empty
    # by default, as diffusers does) run beside the prompt. FLUX.1 is guidance-distilled: its
    # guidance is an input of the transformer, and it takes no negative prompt.
    cfg: bool = False
    # diffusers' defaults for the family's pipeline __call__, used where the config gives none.
    default_guidance_scale: float = 3.5
    default_max_sequence_length: int = 512
    # Whether the family's Denoising runs sequence parallelism (ulysses/ring) through xDiT.
    sequence_parallel: bool = False
    # Whether diffusers' cache hooks (`enable_cache`) support the family's transformer.
    step_cache: bool = False
    # Whether the family's Denoising has per-row denoising (`prepare_rows`, `forward_rows`,
    # `finish_row`): what step-level batching (`denoiser.batching.mode: step`) needs.
    step_rows: bool = False

    @property
    def builtin_model(self) -> Optional[str]:
        return f"tiny-{self.name}" if self.tiny_builder else None


_SPECS = (
    FamilySpec(
        name="flux",
        size_multiple=16,
        module="deployments.families.flux",
        tiny_builder="deployments.tiny.flux:build_tiny_flux",
        memory_model="deployments.families.flux_memory",
        pipelines=("FluxPipeline",),
        default_guidance_scale=3.5,
        default_max_sequence_length=512,
        sequence_parallel=True,
        step_cache=True,
        step_rows=True,
    ),
    FamilySpec(
        name="sd3",
        size_multiple=16,
        module="deployments.families.sd3",
        tiny_builder="deployments.tiny.sd3:build_tiny_sd3",
        pipelines=("StableDiffusion3Pipeline",),
        cfg=True,
        default_guidance_scale=7.0,
        default_max_sequence_length=256,
        step_rows=True,
    ),
    FamilySpec(
        name="pixart",
        size_multiple=16,
        module="deployments.families.pixart",
        tiny_builder="deployments.tiny.pixart:build_tiny_pixart",
        pipelines=("PixArtSigmaPipeline",),
        cfg=True,
        default_guidance_scale=4.5,
        default_max_sequence_length=300,
        step_rows=True,
    ),
)


def family_names() -> tuple[str, ...]:
    return tuple(spec.name for spec in _SPECS)


def family_spec(name: str) -> FamilySpec:
    for spec in _SPECS:
        if spec.name == name:
            return spec
    raise KeyError(f"unknown model family {name!r}; known: {list(family_names())}")


def family_of_pipeline(class_name: str) -> Optional[str]:
    """The family whose pipeline class is `class_name` (model_index.json's `_class_name`)."""
    for spec in _SPECS:
        if class_name in spec.pipelines:
            return spec.name
    return None


def load_family(name: str):
    """The family module (`deployments.families.<name>`), imported on first use."""
    return importlib.import_module(family_spec(name).module)


def memory_model(name: str):
    """The family's memory model module, or None when it has none (budgets are then unchecked)."""
    spec = family_spec(name)
    return importlib.import_module(spec.memory_model) if spec.memory_model else None


def builtin_models() -> dict[str, FamilySpec]:
    """`builtin:<name>` models (made locally, never downloaded) -> their family."""
    return {spec.builtin_model: spec for spec in _SPECS if spec.builtin_model}


def tiny_builder(family: str):
    """The function writing a tiny checkpoint of `family`: (out: Path, seed: int) -> Path."""
    spec = family_spec(family)
    if spec.tiny_builder is None:
        raise ValueError(f"no tiny model for family {family!r}")
    module, function = spec.tiny_builder.split(":")
    return getattr(importlib.import_module(module), function)
