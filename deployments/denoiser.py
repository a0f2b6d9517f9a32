"""Denoiser deployment: prompt embeddings -> latents, batched by key, run step by step on a group
of worker actors (one per GPU; a sequence-parallel group when there are several).

By default (`denoiser.batching.mode: step`, unless cfg_degree 2 or a step cache asks for the request
mode) requests join and leave a running batch at step boundaries (`deployments.step_scheduler`).
In the request mode a batch is split by batch key (size, steps, guidance); each group runs through
`run_group`, which stops cancelled requests between steps (see `deployments.denoise_loop`). Every
image gets its own `torch.Generator` from its seed and every batch (or row) its own scheduler, so
an image depends only on its own request. Failures are per request: a broken worker group gives a retryable 503, a batch out of
device memory runs again in halves and only an image that does not fit alone fails its request with
a 400 naming `size` (`deployments.denoise_split`; never a breakage), anything else a 500 that
carries the request id. At start the replica checks that the largest batch the config admits fits
its memory budget (`deployments.memory_budget`).

A broken group (a worker died, hung past a ping or call timeout, or ranks that disagree: some
failed and some did not, or they failed differently) is never reused: the replica kills its
workers and then itself, so Serve's next health check (every `health_check_period_s`) sees a dead
actor and starts a new replica with a new group at once, instead of waiting for three failed
checks. Worker deaths are noticed the moment they happen, even when idle, through each worker's
`watch` call.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import ray
from ray import serve

from deployments import events
from deployments.batcher import StageBatcher
from deployments.batching import denoise_key, group_by, images_in
from deployments.denoise_loop import STAGE, DenoiseItem
from deployments.denoise_split import run_splitting
from deployments.errors import StageFailure, Unavailable
from deployments.memory_budget import replica_error
from deployments.payloads import Cancelled, GenerationSpec, Latents, PromptEmbeddings, Rejected, passes_through
from deployments.runtime import Stopwatch, logger, raise_if_error
from deployments.sp_group import WorkerGroup, WorkerGroupBroken, bundle_resources
from deployments.stage import batching_options, open_progress
from deployments.step_scheduler import StepScheduler

STARTUP_TIMEOUT_S = 1800.0
WARMUP_STEPS = 2
# Time for the 503s of the requests in flight to leave before the replica kills itself.
RETIRE_DELAY_S = 0.5


def placement_bundles(config) -> list[dict[str, float]]:
    """Bundle 0 for the replica actor itself, then one per worker of its SP group."""
    dn = config.denoiser
    return [{"CPU": dn.replica_num_cpus}] + [bundle_resources(dn)] * dn.world_size


def deployment_options(config) -> dict[str, Any]:
    dn = config.denoiser
    return {
        **batching_options(dn),
        "ray_actor_options": {"num_cpus": dn.replica_num_cpus},
        "placement_group_bundles": placement_bundles(config),
        "placement_group_strategy": "STRICT_PACK",
        "health_check_period_s": 2,
        "health_check_timeout_s": 30,
    }


def check_placement(config) -> None:
    """Refuse to start in a placement group that cannot hold this replica's workers (a config's
    `deployments:` block overrode the bundles): fail with a message, not a hang or a wrong GPU."""
    from ray.util.placement_group import get_current_placement_group

    pg = get_current_placement_group()
    if pg is None:
        raise ValueError(
            "the Denoiser needs a placement group (one bundle for the replica, one per worker);"
            " do not override placement_group_bundles in the config's deployments block"
        )
    want = placement_bundles(config)
    got = [{k: v for k, v in b.items() if k in ("CPU", "GPU") and v} for b in pg.bundle_specs]
    if len(got) != len(want) or any(
        g.get(k, 0) < v for g, w in zip(got[1:], want[1:]) for k, v in w.items()
    ):
        raise ValueError(
            f"the Denoiser's placement group has bundles {got}; it needs {want} (the replica,"
            f" then one per worker: denoiser.worker_num_cpus/worker_num_gpus x"
            f" {config.denoiser.world_size} ranks). Set them through the app's args, not"
            " placement_group_bundles."
        )


@serve.deployment(name="Denoiser")
class Denoiser:
    def __init__(self, config):
        dn = config.denoiser
        check_placement(config)
        self._ping_timeout_s = dn.health_ping_timeout_s
        self._progress = open_progress(config, STAGE)
        self._group = WorkerGroup(config)
        self._workers = self._group.start(STARTUP_TIMEOUT_S)
        memory_error = replica_error(config, self._workers)
        if memory_error:
            self._group.shutdown()
            raise ValueError(memory_error)
        shapes, started = config.warmup_shapes, time.perf_counter()
        self._group.warm_up(shapes, WARMUP_STEPS, dn.worker_call_timeout_s)
        self._warmup_s = time.perf_counter() - started
        logger.info(
            "denoiser warm-up: %d shapes (batch, width, height) %s in %.1fs%s",
            len(shapes),
            list(shapes),
            self._warmup_s,
            " (compiled)" if dn.compile_blocks else "",
        )
        self._watcher = None
        self._retiring = False
        self._batcher = self._scheduler = None
        if dn.batching_mode == "step":  # requests join and leave at step boundaries
            self._scheduler = StepScheduler(self._group, self._progress, dn.batching.max_batch_size, self._retire)
        else:
            self._batcher = StageBatcher.from_config(self._denoise_batch, dn.batching, images_in)

    async def denoise(self, embeddings: PromptEmbeddings | Any, spec: GenerationSpec):
        """Latents, or the `Rejected`/`Cancelled` value that reached this stage instead."""
        if passes_through(embeddings):
            return embeddings
        try:
            with self._progress.metrics.in_stage():  # the queue depth gauge
                item = DenoiseItem(spec, embeddings)
                if self._scheduler is not None:
                    return raise_if_error(await self._scheduler.denoise(item))
                return raise_if_error(await self._batcher.submit(item))
        except asyncio.CancelledError:
            # Serve cancelled this call (its caller went away): stop the row at the next step.
            self._progress.stop_locally(spec.request_id)
            raise

    async def ready(self) -> dict:
        await self.check_health()
        return {"stage": STAGE, "workers": self._workers, "warmup_s": round(self._warmup_s, 2)}

    async def check_health(self) -> None:
        if self._watcher is None:  # the first check runs on the replica's event loop
            self._watcher = asyncio.ensure_future(self._watch())
        try:
            await self._group.check(self._ping_timeout_s)
        except WorkerGroupBroken as exc:
            self._retire(str(exc))
            raise

    async def _watch(self) -> None:
        self._retire(await self._group.watch())

    def _retire(self, reason: str) -> None:
        """Kill the broken group, then this replica, so Serve replaces both."""
        if self._retiring:
            return
        self._retiring = True
        logger.error("denoiser worker group broken (%s): replacing this replica", reason)
        self._group.shutdown()
        asyncio.get_running_loop().call_later(RETIRE_DELAY_S, _exit_replica)

    async def _denoise_batch(self, items: list[DenoiseItem]) -> list:
        results: list = [None] * len(items)
        for members in group_by(items, lambda it: denoise_key(it.spec)):
            group = [items[i] for i in members]
            for i, outcome in zip(members, await self._run(group)):
                results[i] = outcome
        await self._progress.flush()
        return results

    async def _run(self, group: list[DenoiseItem]) -> list:
        ids = [it.spec.request_id for it in group]
        rows = sum(it.spec.n for it in group)
        self._progress.emit([events.stage_started(i, STAGE, rows) for i in ids])
        watch = Stopwatch(STAGE)
        try:
            outcomes = await run_splitting(self._group, group, self._progress)
        except WorkerGroupBroken as exc:
            logger.error("denoiser worker group broken (%s); requests %s", exc, ids)
            self._retire(str(exc))
            return [Unavailable("the denoiser is restarting; retry the request")] * len(group)
        except Exception:
            logger.exception("denoiser batch failed; requests %s", ids)
            return [StageFailure(STAGE, i) for i in ids]
        finally:
            self._progress.forget(ids)
        trace = watch.trace(rows)
        results = []
        for it, outcome in zip(group, outcomes):
            if isinstance(outcome, (Cancelled, Rejected)):  # passed on; the dispatcher logs them
                results.append(outcome)
                continue
            self._progress.emit([events.stage_finished(it.spec.request_id, STAGE, rows, trace.seconds)])
            results.append(Latents(spec=it.spec, latents=outcome, trace=it.embeddings.trace + (trace,)))
        logger.info(
            "denoiser batch=%d images requests=%s key=%s cancelled=%d rejected=%d %.3fs",
            rows,
            ids,
            denoise_key(group[0].spec),
            sum(isinstance(o, Cancelled) for o in outcomes),
            sum(isinstance(o, Rejected) for o in outcomes),
            trace.seconds,
        )
        return results

    def __del__(self):
        """Serve's graceful shutdown: the workers go with the replica (not a breakage)."""
        self._retiring = True
        group = getattr(self, "_group", None)
        if group is not None:
            group.shutdown()


def _exit_replica() -> None:
    ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
