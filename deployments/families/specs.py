"""What the serving layer needs to know of a model family, without importing torch or diffusers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FamilySpec:
    name: str
    # Width/height must be multiples of this (VAE downsampling x latent patch size).
    size_multiple: int
    # Import path of the module holding the family's three roles (text encoding, denoising,
    # decoding); imported lazily, inside the replica that needs it.
    module: str


_SPECS = (FamilySpec(name="flux", size_multiple=16, module="deployments.families.flux"),)


def family_spec(name: str) -> FamilySpec:
    for spec in _SPECS:
        if spec.name == name:
            return spec
    raise KeyError(f"unknown model family {name!r}; known: {[s.name for s in _SPECS]}")


def load_family(name: str):
    """The family module (`deployments.families.<name>`), imported on first use."""
    import importlib

    return importlib.import_module(family_spec(name).module)
