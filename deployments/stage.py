"""What every stage deployment shares: its Serve options from the config, and its job store link.

Each deployment module defines `deployment_options(config)`: the Serve options that follow from
the app's args (a config file's `deployments:` block may still override them, within the limits
`check_overrides` enforces). The `@serve.deployment` decorators carry only names.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any


def batching_options(stage) -> dict[str, Any]:
    """A stage replica must accept a full batch while the previous one runs, or batches never
    fill (Serve caps a replica at max_ongoing_requests)."""
    return {"max_ongoing_requests": 2 * stage.batching.max_batch_size}


def data_dir() -> Path:
    """Where job records and stored images live unless the config says otherwise:
    `$DIT_SERVE_DATA`, else `~/.local/share/dit-serve`."""
    default = Path.home() / ".local" / "share" / "dit-serve"
    return Path(os.environ.get("DIT_SERVE_DATA") or default)


def store_namespace(model_name: str) -> str:
    """A file- and key-safe name for a model: its own queue by default, so two applications
    serving different models never run each other's jobs."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model_name).strip("._") or "model"


def open_store(config):
    """This process's connection to the configured job store (by default one per application,
    named after its (first) model: a file `jobs-<model>.sqlite3` in the data folder, or Redis keys
    under `dit-serve:<model>`); every stage of every model of the app shares it."""
    from deployments.job_store import open_job_store

    store, name = config.jobs.store, store_namespace(config.store_key)
    path = store.path or str(data_dir() / f"jobs-{name}.sqlite3")
    prefix = store.prefix or f"dit-serve:{name}"
    return open_job_store(store.backend, path=path, url=store.url, prefix=prefix)


def open_progress(config, stage: str):
    from deployments.progress import StageProgress

    return StageProgress(open_store(config), stage, model=config.model.name)
