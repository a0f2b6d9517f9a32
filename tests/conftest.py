"""Fixtures shared by every test level: a private model cache and the in-process reference."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Builtin models are built into a cache private to this test session. Set before any Ray
    process starts, so replicas and workers (which inherit the environment) use it too."""
    path = tmp_path_factory.mktemp("dit-serve-cache")
    old = os.environ.get("DIT_SERVE_CACHE")
    os.environ["DIT_SERVE_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("DIT_SERVE_CACHE", None)
    else:
        os.environ["DIT_SERVE_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_flux_path(private_cache) -> str:
    from serve_app.tiny.store import ensure_builtin

    return str(ensure_builtin("tiny-flux"))


@pytest.fixture(scope="session")
def reference(tiny_flux_path):
    """Images from diffusers' own FluxPipeline, in this process: what the service must match."""
    from tests.helpers import ReferencePipeline

    return ReferencePipeline(tiny_flux_path)
