"""Per-process helpers shared by the stages: device choice, torch threads, a serial executor."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

from deployments.families.base import LoadSpec
from deployments.payloads import StageTrace

T = TypeVar("T")

# Serve's logger: records land in the replica's log file with the request id of the context.
logger = logging.getLogger("ray.serve")


def stage_device(setting: str) -> str:
    """`auto` means cuda exactly when Ray gave this process a GPU."""
    if setting != "auto":
        return setting
    import ray

    return "cuda" if ray.get_gpu_ids() else "cpu"


def configure_torch(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


def load_role(config, stage, role: str):
    """Set this process up for a stage and load the family's `role` class on its device.
    Returns (model, device)."""
    from deployments.families.specs import load_family

    configure_torch(stage.torch_threads)
    device = stage_device(stage.device)
    model = getattr(load_family(config.model.family), role)(load_spec(config, device))
    return model, device


def load_spec(config, device: str, denoiser: bool = False) -> LoadSpec:
    """How this process loads its role of the configured model (builtin models made here); the
    denoiser's role also gets its speed knobs."""
    from deployments.tiny.store import resolve_model_path

    knobs = {}
    if denoiser:
        dn = config.denoiser
        knobs = dict(
            compile_blocks=dn.compile_blocks,
            cuda_graphs=dn.cuda_graphs,
            batch_buckets=config.transformer_buckets,
            attention_backend=dn.attention_backend,
            quantization=dn.quantization,
            step_cache=dn.step_cache.model_dump() if dn.step_cache else None,
        )
    return LoadSpec(
        path=resolve_model_path(config.model.path),
        dtype=config.model.dtype,
        device=device,
        max_sequence_length=config.model.max_sequence_length,
        **knobs,
    )


class SerialExecutor:
    """Runs blocking model work on one dedicated thread, so the replica's event loop stays free
    (health checks, batch assembly) and the model and its tokenizers see one thread only."""

    def __init__(self, name: str):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def run(self, fn: Callable[..., T], *args) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)


class Stopwatch:
    def __init__(self, stage: str):
        self.stage = stage
        self.start = time.perf_counter()

    def trace(self, batch_size: int) -> StageTrace:
        return StageTrace(self.stage, batch_size, time.perf_counter() - self.start)


def raise_if_error(result):
    """A batch delivers an exception returned in a slot as a value: raise it per request."""
    if isinstance(result, BaseException):
        raise result
    return result
