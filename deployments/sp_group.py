"""The denoiser's worker group: one actor per device, identical calls fanned out in order.

A Denoiser replica owns one group. Each worker actor holds the transformer for one rank and lands in
its own bundle of the replica's placement group (bundle 0 is the replica itself), so Ray gives each
its own device (`CUDA_VISIBLE_DEVICES`). With more than one rank the workers form a torch.distributed
group (NCCL on GPU, gloo on CPU) and run xfuser's sequence parallelism; every call goes to every rank
in the same order and rank 0's result is returned. One rank (SP=1) is the same code path.

A group that loses a worker, hangs, or whose ranks disagree (some fail, some do not, or they fail
differently) is broken for good (its collectives may be out of step): it refuses new calls, its
actors are killed, and its replica exits so Serve replaces both (see `Denoiser`). A call that fails
the same way on every rank (`agreed_error`: the same exception type and message, or an out of
memory on every rank) is the request's failure, not the group's: the ranks are still in step.
"""

from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import ray
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from deployments.oom import forward_freeing, inject_oom
from deployments.runtime import configure_torch, load_spec, stage_device

# Once a rank has failed a call, how long the others get to fail it the same way (or succeed)
# before the group counts as out of step. Ranks fail an identical call at the same point, so they
# end within moments of each other; one still running past this waits in a collective for the rank
# that failed.
AGREEMENT_GRACE_S = 10.0


class WorkerGroupBroken(RuntimeError):
    """The group lost or hung a worker, or its ranks fell out of step; replace the replica."""


class RanksDisagree(Exception):
    """The ranks of one call did not all fail the same way: the group is out of step."""


def _failure_signature(exc: BaseException) -> Optional[tuple]:
    """What identifies a rank's failure for the agreement rule; None for a worker that died or an
    error outside the call (the group is broken whatever the others did)."""
    from ray.exceptions import RayActorError, RayTaskError

    from deployments.oom import is_oom

    if isinstance(exc, RayActorError) or not isinstance(exc, RayTaskError):
        return None
    if is_oom(exc):
        # A real CUDA OOM message carries per-process figures (free bytes, PIDs): every rank out of
        # memory at the same call is the same failure.
        return ("out of memory",)
    cause = exc.cause if isinstance(exc.cause, BaseException) else exc
    return (type(cause).__module__, type(cause).__qualname__, str(cause))


def agreed_error(outcomes: Sequence[Any]) -> Optional[BaseException]:
    """Every rank's outcome of one call (its result, or the exception it raised) -> None when every
    rank succeeded; rank 0's exception when every rank failed the same way (same exception type and
    message, or out of memory on every rank): a failure of the call's requests, the ranks still in
    step. Raises `RanksDisagree` otherwise: some ranks ok and some failed, different errors, a dead
    worker."""
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    if not failed:
        return None
    signatures = [_failure_signature(o) for o in failed]
    first = failed[0]
    if any(s is None for s in signatures):
        dead = next(o for o, s in zip(failed, signatures) if s is None)
        raise RanksDisagree(f"a worker died: {type(dead).__name__}")
    if len(failed) < len(outcomes):
        raise RanksDisagree(
            f"{len(failed)} of {len(outcomes)} ranks failed ({_cause_name(first)}), the others did not"
        )
    if len(set(signatures)) > 1:
        raise RanksDisagree(f"ranks failed differently: {sorted({_cause_name(o) for o in failed})}")
    return first


def _cause_name(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    return type(cause if isinstance(cause, BaseException) else exc).__name__


@dataclass(frozen=True)
class StepReport:
    seconds: float  # rank 0's time for the step
    previews: tuple[tuple[bytes, int, int], ...]  # (PNG, width, height) per row asked (rank 0)


@dataclass(frozen=True)
class RowsReport:
    """Rank 0's answer to `rows_step` (step-level batching, `deployments.step_scheduler`)."""

    seconds: float  # the call's time (joins prepared and the forward)
    rows: int  # rows in the forward (0: nothing was forwarded)
    steps: dict[str, int]  # request id -> the step index its rows reached, for every request forwarded
    finished: dict[str, Any]  # request id -> latents (its rows concatenated, CPU), rows all done
    previews: dict[str, tuple[bytes, int, int]] = field(default_factory=dict)  # id -> image 0's


class DenoiseWorker:
    """One rank of the group (a Ray actor; see `WorkerGroup`)."""

    def __init__(self, config, rank: int):
        self.rank = rank
        self._config = config
        self._denoising = None
        self._run = None  # the batch being denoised
        self._size = (0, 0)  # its (height, width)
        self._rows: dict[str, list] = {}  # step-level batching: request id -> its rows, in join order
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
        spec = load_spec(self._config, device, denoiser=True)
        parallel = None
        if dn.world_size > 1:
            from deployments.sp_runtime import init_rank

            parallel = init_rank(
                rank=self.rank,
                world_size=dn.world_size,
                init_method=init_method,
                ulysses_degree=dn.ulysses_degree,
                ring_degree=dn.ring_degree,
                cfg_degree=dn.cfg_degree,
                device=device,
                timeout_s=dn.process_group_timeout_s,
                model_path=spec.path,
            )
        self._denoising = load_family(self._config.model.family).Denoising(spec, parallel)
        return {"rank": self.rank, "device": device, "pid": os.getpid(), "memory": self._memory(device)}

    def _memory(self, device: str) -> dict:
        """What the replica's memory budget check needs: the device's total memory (None on CPU),
        the transformer's weights in bytes, and its architecture (config)."""
        import torch

        transformer = self._denoising.transformer
        total = torch.cuda.get_device_properties(0).total_memory if device == "cuda" else None
        return {
            "device_total_bytes": total,
            "weights_bytes": sum(p.numel() * p.element_size() for p in transformer.parameters()),
            "transformer_config": dict(transformer.config),
        }

    # The per-step contract (see `deployments.denoise_loop`): every rank gets the same calls with
    # the same arguments in the same order, so their collectives stay in step.
    @ray.method(concurrency_group="compute")
    def step(self, keep, preview_rows, inputs=None) -> StepReport:
        """One denoising step; the batch's first step brings its inputs (so that every call a rank
        can hang in holds a collective its peers time out on). Out of memory (or the injected
        fault, `deployments.oom`), the batch is dropped and the memory freed before it raises: the
        steps sent after it fail at once, and the replica runs the rows again in smaller batches."""
        if inputs is not None:
            self._run = None  # the last batch's tensors go before this one's come
            self._size = (inputs.sampling.height, inputs.sampling.width)
        elif self._run is None:
            raise RuntimeError("no batch in progress on this rank (an earlier step of it failed)")
        return forward_freeing(self._step, keep, preview_rows, inputs, on_oom=self._drop_run)

    def _drop_run(self) -> None:
        self._run = None

    def _step(self, keep, preview_rows, inputs) -> StepReport:
        import time

        started = time.perf_counter()
        rows = len(keep) if keep is not None else inputs.sampling.n if inputs is not None else self._run.rows
        inject_oom("denoiser step", rows, *self._size)
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

    # Step-level batching (`deployments.step_scheduler`): requests join and leave between calls;
    # each call forwards every row kept, each row at its own step.
    @ray.method(concurrency_group="compute")
    def rows_step(self, joins, drops, paused=(), previews=()) -> RowsReport:
        """Forget `drops` (request ids), prepare `joins` ((request id, DenoiseInputs) pairs), then
        one forward over every kept row except those of the `paused` requests, which keep their
        state for a later call (none: nothing forwarded). Requests whose rows are all done are
        returned (rank 0) and forgotten. Out of memory, every row is dropped and the memory freed
        before it raises (as `step` does). Rank 0 also previews image 0 of each request in
        `previews` after the forward."""
        for request_id in drops:
            self._rows.pop(request_id, None)
        return forward_freeing(self._rows_step, joins, set(paused), previews, on_oom=self._forget_rows)

    def _forget_rows(self) -> None:
        self._rows = {}

    def _rows_step(self, joins, paused: set, previews) -> RowsReport:
        import time

        started = time.perf_counter()
        for request_id, inputs in joins:
            self._rows.pop(request_id, None)  # a rejoin replaces (keeps insertion order honest)
            self._rows[request_id] = self._denoising.prepare_rows(inputs)
        forwarded = [rid for rid in self._rows if rid not in paused]
        rows = [row for rid in forwarded for row in self._rows[rid]]
        if rows:
            inject_oom("denoiser step", len(rows), rows[0].height, rows[0].width)
            self._denoising.forward_rows(rows)
        steps = {rid: self._rows[rid][0].step_index for rid in forwarded}
        shown = {}
        if self.rank == 0:
            from deployments.image_codec import encode_array

            for rid in previews:
                for image in self._denoising.preview(self._rows[rid][0], [0]):
                    shown[rid] = (encode_array(image, "png"), image.shape[1], image.shape[0])
        finished = {}
        for rid in [rid for rid in forwarded if all(r.done for r in self._rows[rid])]:
            kept = self._rows.pop(rid)
            if self.rank == 0:
                import torch

                finished[rid] = torch.cat([self._denoising.finish_row(r) for r in kept])
            else:
                finished[rid] = None
        return RowsReport(time.perf_counter() - started, len(rows), steps, finished, shown)

    @ray.method(concurrency_group="compute")
    def rows_reset(self) -> None:
        self._forget_rows()

    @ray.method(concurrency_group="compute")
    def rows_held(self) -> list:
        """Ids of the requests whose rows this rank keeps between calls (step mode)."""
        return list(self._rows)

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
        """Every rank's result. A call that failed the same way on every rank raises rank 0's
        error (the ranks are in step: the caller's requests failed); a dead or hung worker, or
        ranks that disagree, break the group (see `agreed_error`)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        tasks = [asyncio.ensure_future(_result(ref)) for ref in refs]
        try:
            done, pending = await asyncio.wait(tasks, timeout=timeout_s, return_when=asyncio.FIRST_EXCEPTION)
            errors = [t.exception() for t in done if t.exception() is not None]
            failed = bool(errors)
            dead = next((e for e in errors if _failure_signature(e) is None), None)
            if dead is not None:  # no agreement can save a group that lost a worker
                raise self._break(f"a worker died: {type(dead).__name__}")
            if pending and failed:  # the others get a moment to fail the same way
                grace = min(AGREEMENT_GRACE_S, max(0.0, deadline - loop.time()))
                _, pending = await asyncio.wait(pending, timeout=grace)
            if pending:
                if not failed:
                    raise self._break(f"a worker {what} took longer than {timeout_s}s")
                raise self._break(f"a rank failed {what} while another still ran: out of step")
            outcomes = [t.exception() or t.result() for t in tasks]
            try:
                error = agreed_error(outcomes)
            except RanksDisagree as exc:
                raise self._break(f"{what}: {exc}") from None
            if error is not None:
                raise error
            return outcomes
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()
                elif not t.cancelled():
                    t.exception()  # retrieved: no "never retrieved" warning for a settled rank

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

    def rows_step(
        self,
        joins: Sequence[tuple[str, Any]],
        drops: Sequence[str],
        paused: Sequence[str] = (),
        previews: Sequence[str] = (),
    ):
        """Step-level batching: send one `rows_step` to every rank now; await it for rank 0's
        `RowsReport`. The joins' inputs go once, through the object store."""
        if self.broken:
            raise WorkerGroupBroken(self.broken)
        joined = ray.put(list(joins)) if joins else []
        refs = [w.rows_step.remote(joined, list(drops), list(paused), list(previews)) for w in self._workers]
        return self._first(self._all(refs, self._timeout_s, "rows_step"))

    async def rows_reset(self) -> None:
        """Forget every row on every rank (after a failed `rows_step`)."""
        await self._each("rows_reset")

    async def rows_held(self) -> list[list[str]]:
        """Each rank's `rows_held`: what a scheduler with nothing running must find empty."""
        return await self._each("rows_held")

    @staticmethod
    async def _first(results):
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


async def _result(ref):
    return await ref
