"""The denoiser's worker group: one actor per device, identical calls fanned out in order.

A Denoiser replica owns one group. Each worker actor holds the transformer for one rank and lands in
its own bundle of the replica's placement group (bundle 0 is the replica itself), so Ray gives each
its own device (`CUDA_VISIBLE_DEVICES`). With more than one rank the workers form a torch.distributed
group (NCCL on GPU, gloo on CPU) and run xfuser's sequence parallelism; every call goes to every rank
in the same order and rank 0's result is returned. One rank (SP=1) is the same code path.

A group that loses a worker, hangs, or fails on some ranks is broken for good (its collectives may
be out of step): it refuses new calls, its actors are killed, and its replica exits so Serve
replaces both (see `Denoiser`).
"""

from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import ray
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from deployments.runtime import configure_torch, load_spec, stage_device


class WorkerGroupBroken(RuntimeError):
    """The group lost or hung a worker, or its ranks fell out of step; replace the replica."""


@dataclass(frozen=True)
class StepReport:
    seconds: float  # rank 0's time for the step
    previews: tuple[tuple[bytes, int, int], ...]  # (PNG, width, height) per row asked (rank 0)


class DenoiseWorker:
    """One rank of the group (a Ray actor; see `WorkerGroup`)."""

    def __init__(self, config, rank: int):
        self.rank = rank
        self._config = config
        self._denoising = None
        self._run = None  # the batch being denoised
        self._forever = threading.Event()

    def rendezvous(self) -> str:
        """Rank 0: the address the group's ranks meet at."""
        from deployments.sp_runtime import rendezvous_address

        return rendezvous_address(ray.util.get_node_ip_address())

    def setup(self, init_method: Optional[str]) -> dict:
        from deployments.families.specs import load_family

        dn = self._config.denoiser
        configure_torch(dn.torch_threads)
        device = stage_device(dn.device)
        spec = load_spec(self._config, device, compile_blocks=dn.compile_blocks)
        parallel = None
        if dn.world_size > 1:
            from deployments.sp_runtime import init_rank

            parallel = init_rank(
                rank=self.rank,
                world_size=dn.world_size,
                init_method=init_method,
                ulysses_degree=dn.ulysses_degree,
                ring_degree=dn.ring_degree,
                device=device,
                timeout_s=dn.process_group_timeout_s,
                model_path=spec.path,
            )
        self._denoising = load_family(self._config.model.family).Denoising(spec, parallel)
        return {"rank": self.rank, "device": device, "pid": os.getpid()}

    # The per-step contract (see `deployments.denoise_loop`): every rank gets the same calls with
    # the same arguments in the same order, so their collectives stay in step.
    @ray.method(concurrency_group="compute")
    def step(self, keep, preview_rows, inputs=None) -> StepReport:
        """One denoising step; the batch's first step brings its inputs (so that every call a rank
        can hang in holds a collective its peers time out on)."""
        import time

        started = time.perf_counter()
        if inputs is not None:
            self._run = self._denoising.prepare(inputs)
        self._denoising.step(self._run, keep)
        previews = ()
        if self.rank == 0 and preview_rows:
            from deployments.image_codec import encode_array

            previews = tuple(
                (encode_array(p, "png"), p.shape[1], p.shape[0])
                for p in self._denoising.preview(self._run, preview_rows)
            )
        return StepReport(time.perf_counter() - started, previews)

    @ray.method(concurrency_group="compute")
    def finish(self):
        """Rank 0's latents (the only ones fetched); None from the others."""
        run, self._run = self._run, None
        return self._denoising.finish(run) if self.rank == 0 else None

    @ray.method(concurrency_group="compute")
    def abort(self) -> None:
        self._run = None

    @ray.method(concurrency_group="compute")
    def warmup(self, batch: int, width: int, height: int, steps: int) -> None:
        self._denoising.denoise(self._denoising.dummy_inputs(batch, height, width, steps))

    @ray.method(concurrency_group="health")
    def ping(self) -> int:
        return self.rank

    @ray.method(concurrency_group="watch")
    def watch(self) -> None:
        """Never returns: the caller's ref fails the moment this actor dies."""
        self._forever.wait()


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
        self.broken: Optional[str] = None
        self._inputs = None  # the next batch's inputs, sent with its first step
        res = bundle_resources(dn)
        actor_cls = ray.remote(concurrency_groups={"compute": 1, "health": 1, "watch": 1})(
            DenoiseWorker
        )
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
        """Load the model on every rank and join the ranks' group; blocks (replica constructor)."""
        init_method = None
        if self.world_size > 1:
            init_method = ray.get(self._workers[0].rendezvous.remote(), timeout=timeout_s)
        return ray.get([w.setup.remote(init_method) for w in self._workers], timeout=timeout_s)

    def warm_up(self, shapes, steps: int, timeout_s: float) -> None:
        """Run each (batch, width, height) once on every rank; blocks (replica constructor)."""
        for shape in shapes:
            ray.get([w.warmup.remote(*shape, steps) for w in self._workers], timeout=timeout_s)

    def _break(self, reason: str) -> WorkerGroupBroken:
        self.broken = self.broken or reason
        return WorkerGroupBroken(self.broken)

    async def _all(self, refs, timeout_s: float, what: str) -> list:
        """Every rank's result, or the group is broken (a dead, hung or failed rank)."""
        try:
            return await asyncio.wait_for(asyncio.gather(*refs), timeout_s)
        except asyncio.TimeoutError:
            raise self._break(f"a worker {what} took longer than {timeout_s}s") from None
        except ray.exceptions.RayActorError as exc:
            raise self._break(f"a worker died: {type(exc).__name__}") from None
        except ray.exceptions.RayTaskError as exc:
            if self.world_size > 1:  # the other ranks may wait in a collective: out of step
                raise self._break(f"rank failed: {type(exc.cause).__name__}") from exc
            raise

    async def _each(self, what: str, *args) -> list:
        """Call `what` on every rank with the same arguments, in order; every rank's result."""
        if self.broken:
            raise WorkerGroupBroken(self.broken)
        refs = [getattr(w, what).remote(*args) for w in self._workers]
        return await self._all(refs, self._timeout_s, what)

    def begin(self, inputs) -> None:
        """A new batch: its inputs go to every rank with its first step."""
        self._inputs = ray.put(inputs)

    def step(self, keep: Optional[Sequence[int]], preview_rows: Sequence[int]):
        """Send one step to every rank now (each rank runs its calls in the order sent, so steps
        may be sent before the previous one ends); await the result for rank 0's report."""
        if self.broken:
            raise WorkerGroupBroken(self.broken)
        inputs, self._inputs = self._inputs, None
        keep = None if keep is None else list(keep)
        refs = [w.step.remote(keep, list(preview_rows), inputs) for w in self._workers]
        return self._first(self._all(refs, self._timeout_s, "step"))

    @staticmethod
    async def _first(results) -> StepReport:
        return (await results)[0]

    async def finish(self):
        return (await self._each("finish"))[0]

    async def abort(self) -> None:
        await self._each("abort")

    async def run(self, inputs):
        """A whole batch, every step, nothing stopped (tests and benchmarks); rank 0's latents."""
        self.begin(inputs)
        for _ in range(inputs.sampling.num_inference_steps):
            await self.step(None, ())
        return await self.finish()

    async def check(self, timeout_s: float) -> None:
        """Raise unless every worker answers a ping within `timeout_s`."""
        if self.broken:
            raise WorkerGroupBroken(self.broken)
        await self._all([w.ping.remote() for w in self._workers], timeout_s, "ping")

    async def watch(self) -> str:
        """Wait until a worker dies; the reason (the group is then broken)."""
        try:
            await asyncio.gather(*[w.watch.remote() for w in self._workers])
        except ray.exceptions.RayActorError as exc:
            self._break(f"a worker died: {type(exc).__name__}")
        return self.broken or "the watch ended"

    def shutdown(self) -> None:
        for worker in self._workers:
            ray.kill(worker, no_restart=True)
