"""The denoiser's worker group: one actor per device, identical calls fanned out in order.

A Denoiser replica owns one group. Each worker actor holds the transformer for one rank and lands in
its own bundle of the replica's placement group (bundle 0 is the replica itself), so Ray gives each
its own device (`CUDA_VISIBLE_DEVICES`). Every call goes to every rank in the same order and rank
0's result is returned; with one rank (SP=1) this is the same code path as with N.

A group that loses a worker or times out is broken for good: it refuses new calls and fails its
health check, so Serve replaces the replica (and with it the whole group, whose actors it owns).
"""

from __future__ import annotations

import asyncio
from typing import Any

import ray
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from deployments.runtime import load_role


class WorkerGroupBroken(RuntimeError):
    """The group lost a worker or a call timed out; the replica must be replaced."""


class DenoiseWorker:
    """One rank of the group (a Ray actor; see `WorkerGroup`)."""

    def __init__(self, config, rank: int):
        self.rank = rank
        self._config = config
        self._denoising = None

    def setup(self) -> dict:
        self._denoising, device = load_role(self._config, self._config.denoiser, "Denoising")
        return {"rank": self.rank, "device": device}

    @ray.method(concurrency_group="compute")
    def run(self, inputs):
        return self._denoising.denoise(inputs)

    @ray.method(concurrency_group="health")
    def ping(self) -> int:
        return self.rank


def bundle_resources(denoiser_config) -> dict[str, float]:
    """The resources of one worker's placement-group bundle (and of the worker actor itself)."""
    res: dict[str, float] = {}
    if denoiser_config.worker_num_cpus:
        res["CPU"] = denoiser_config.worker_num_cpus
    if denoiser_config.worker_num_gpus:
        res["GPU"] = denoiser_config.worker_num_gpus
    return res


class WorkerGroup:
    def __init__(self, config):
        dn = config.denoiser
        self.world_size = dn.world_size
        self._timeout_s = dn.worker_call_timeout_s
        self.broken: str | None = None
        res = bundle_resources(dn)
        actor_cls = ray.remote(concurrency_groups={"compute": 1, "health": 1})(DenoiseWorker)
        pg = get_current_placement_group()
        self._workers = []
        for rank in range(self.world_size):
            options: dict[str, Any] = dict(
                num_cpus=res.get("CPU", 0), num_gpus=res.get("GPU", 0), max_restarts=0
            )
            if pg is not None:
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    pg, placement_group_bundle_index=rank + 1
                )
            self._workers.append(actor_cls.options(**options).remote(config, rank))

    def start(self, timeout_s: float) -> list[dict]:
        """Load the model on every rank; blocks (replica constructor)."""
        return ray.get([w.setup.remote() for w in self._workers], timeout=timeout_s)

    def _break(self, reason: str) -> WorkerGroupBroken:
        self.broken = self.broken or reason
        return WorkerGroupBroken(self.broken)

    async def run(self, inputs):
        """Run one call on every rank, in order; rank 0's result."""
        if self.broken:
            raise WorkerGroupBroken(self.broken)
        ref = ray.put(inputs)
        refs = [w.run.remote(ref) for w in self._workers]
        try:
            results = await asyncio.wait_for(asyncio.gather(*refs), self._timeout_s)
        except asyncio.TimeoutError:
            raise self._break(f"a worker call took longer than {self._timeout_s}s") from None
        except ray.exceptions.RayActorError as exc:
            raise self._break(f"a worker died: {type(exc).__name__}") from None
        return results[0]

    async def check(self, timeout_s: float) -> None:
        """Raise unless every worker answers a ping within `timeout_s`."""
        if self.broken:
            raise WorkerGroupBroken(self.broken)
        try:
            await asyncio.wait_for(
                asyncio.gather(*[w.ping.remote() for w in self._workers]), timeout_s
            )
        except asyncio.TimeoutError:
            raise self._break(f"a worker did not answer a ping within {timeout_s}s") from None
        except ray.exceptions.RayActorError as exc:
            raise self._break(f"a worker died: {type(exc).__name__}") from None

    def shutdown(self) -> None:
        for worker in self._workers:
            ray.kill(worker, no_restart=True)
