"""Denoiser deployment: prompt embeddings -> latents, batched by shape, run on a worker group.

A batch is split by shape key (height, width, steps, guidance); each group is one transformer call
with one row per image. Every image gets its own `torch.Generator` from its seed and every call its
own scheduler, so an image depends only on its own request. A failure is reported per request:
a broken worker group gives a retryable 503; any other failure gives a 500 that carries the
request id.

A broken group (a worker died, hung past a ping or call timeout, or failed on some ranks only) is
never reused: the replica kills its workers and then itself, so Serve's next health check (every
`health_check_period_s`) sees a dead actor and starts a new replica with a new group at once,
instead of waiting for three failed checks. Worker deaths are noticed the moment they happen, even
when idle, through each worker's `watch` call.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import ray
from ray import serve

from deployments.batching import denoise_key, group_by, images_in, row_slices
from deployments.families.base import DenoiseInputs
from deployments.payloads import GenerationSpec, Latents, PromptEmbeddings, Rejected
from deployments.runtime import Stopwatch, configure_batching, logger, raise_if_error
from deployments.sp_group import WorkerGroup, WorkerGroupBroken
from serve_app.errors import StageFailure, Unavailable

STARTUP_TIMEOUT_S = 1800.0
WARMUP_STEPS = 2
# Time for the 503s of the requests in flight to leave before the replica kills itself.
RETIRE_DELAY_S = 0.5


@dataclass(frozen=True)
class DenoiseItem:
    spec: GenerationSpec
    embeddings: PromptEmbeddings


def stack_inputs(items: list[DenoiseItem]) -> DenoiseInputs:
    """One transformer batch from same-shape requests: each prompt's rows repeated n times."""
    import torch

    spec = items[0].spec
    pooled = [it.embeddings.pooled_prompt_embeds for it in items]
    return DenoiseInputs(
        prompt_embeds=torch.cat([it.embeddings.prompt_embeds.repeat(it.spec.n, 1, 1) for it in items]),
        pooled_prompt_embeds=None
        if pooled[0] is None
        else torch.cat([p.repeat(it.spec.n, 1) for p, it in zip(pooled, items)]),
        seeds=tuple(seed for it in items for seed in it.spec.seeds),
        height=spec.height,
        width=spec.width,
        num_inference_steps=spec.num_inference_steps,
        guidance_scale=spec.guidance_scale,
    )


@serve.deployment(
    name="Denoiser",
    max_ongoing_requests=16,
    health_check_period_s=2,
    health_check_timeout_s=30,
)
class Denoiser:
    def __init__(self, config):
        dn = config.denoiser
        self._ping_timeout_s = dn.health_ping_timeout_s
        self._group = WorkerGroup(config)
        self._workers = self._group.start(STARTUP_TIMEOUT_S)
        self._group.warm_up(config.warmup_shapes, WARMUP_STEPS, dn.worker_call_timeout_s)
        self._watcher = None
        self._retiring = False
        configure_batching(self._denoise_batch, dn.batching)

    async def denoise(
        self, embeddings: PromptEmbeddings | Rejected, spec: GenerationSpec
    ) -> Latents | Rejected:
        if isinstance(embeddings, Rejected):
            return embeddings
        return raise_if_error(await self._denoise_batch(DenoiseItem(spec, embeddings)))

    async def ready(self) -> dict:
        await self.check_health()
        return {"stage": "denoiser", "workers": self._workers}

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

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01, batch_size_fn=images_in)
    async def _denoise_batch(self, items: list[DenoiseItem]) -> list:
        results: list = [None] * len(items)
        for members in group_by(items, lambda it: denoise_key(it.spec)):
            group = [items[i] for i in members]
            ids = [it.spec.request_id for it in group]
            watch = Stopwatch("denoiser")
            try:
                latents = await self._group.run(stack_inputs(group))
            except WorkerGroupBroken as exc:
                logger.error("denoiser worker group broken (%s); requests %s", exc, ids)
                self._retire(str(exc))
                for i in members:
                    results[i] = Unavailable("the denoiser is restarting; retry the request")
                continue
            except Exception:
                logger.exception("denoiser batch failed; requests %s", ids)
                for i, it in zip(members, group):
                    results[i] = StageFailure("denoiser", it.spec.request_id)
                continue
            trace = watch.trace(len(latents))
            for i, it, rows in zip(members, group, row_slices([it.spec.n for it in group])):
                results[i] = Latents(
                    spec=it.spec,
                    latents=latents[rows].clone(),
                    trace=it.embeddings.trace + (trace,),
                )
            logger.info(
                "denoiser batch=%d images requests=%s key=%s %.3fs",
                len(latents),
                ids,
                denoise_key(group[0].spec),
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
