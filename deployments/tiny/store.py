"""Resolve a configured model path; `builtin:tiny-<family>` is made locally on first use.

The embedded default model is code (random weights of tiny configs, tokenizers trained on a fixed
corpus), so it is built, never downloaded, into a cache folder shared by every process on the host.
Several replicas may start at once: one builds under an exclusive file lock into a temporary folder
and renames it into place; the others wait on the lock and then find it ready.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

from deployments.families.specs import builtin_models, tiny_builder

BUILTIN_PREFIX = "builtin:"


def cache_root() -> Path:
    return Path(os.environ.get("DIT_SERVE_CACHE", Path.home() / ".cache" / "dit-serve"))


def builtin_path(name: str, seed: int = 0) -> Path:
    return cache_root() / "models" / f"{name}-seed{seed}"


def build_tiny(family: str, out: Path, seed: int = 0) -> Path:
    """Write a tiny checkpoint of `family` to `out` (must not exist yet)."""
    return tiny_builder(family)(out, seed=seed)


def ensure_builtin(name: str, seed: int = 0) -> Path:
    """The folder of builtin model `name`, building it once if it is not there yet."""
    known = builtin_models()
    if name not in known:
        raise ValueError(f"unknown builtin model {name!r}; known: {sorted(known)}")
    target = builtin_path(name, seed)
    if (target / "model_index.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "model_index.json").exists():
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
            try:
                build_tiny(known[name].name, staging / "model", seed=seed)
                shutil.rmtree(target, ignore_errors=True)
                os.replace(staging / "model", target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model_path(path: str) -> str:
    """A path from_pretrained can load: builtin models are made on demand, others pass through."""
    if path.startswith(BUILTIN_PREFIX):
        return str(ensure_builtin(path[len(BUILTIN_PREFIX) :]))
    return path
