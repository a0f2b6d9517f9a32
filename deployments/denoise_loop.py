"""The denoiser's per-step contract: one same-key group of requests, run step by step.

Between two steps the loop asks which of its requests must stop (cancelled by a DELETE on any
ingress, abandoned by a client that went away, or already ended) and sends the next step with the
rows to keep to every rank of the worker group: the ranks never decide anything themselves, so
they cannot disagree and no collective waits on a rank that stopped. Stopped requests leave the
batch at once (their callers get `Cancelled`, their rows stop costing compute); the others go on
as if the stopped ones had never been there. Each step is reported per request (`step` events),
with previews of image 0 where a request asked for them.

A step that fails on every rank alike (out of memory, a bad input) leaves the group in step: the
loop lets the steps already sent end, clears the batch on every rank and raises; an out of memory
is then run again in smaller batches by `deployments.denoise_split`.

A later step-level scheduler replaces this loop behind the same contract: requests in, a stop
check by request id at every step boundary, step events out, latents or `Cancelled` per request.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import Sequence

from deployments import events
from deployments.families.base import DenoiseInputs
from deployments.payloads import Cancelled, GenerationSpec, PromptEmbeddings
from deployments.progress import StageProgress
from deployments.sampling import SamplingParams
from deployments.sp_group import WorkerGroupBroken

STAGE = "denoiser"


@dataclass(frozen=True)
class DenoiseItem:
    spec: GenerationSpec
    embeddings: PromptEmbeddings
    # False for the later parts of a request split across batches (out of memory, see
    # `deployments.denoise_split`): only its first part reports the request's steps.
    reports: bool = True


# The per-row tensors of `PromptEmbeddings` a batch stacks into `DenoiseInputs` (same names).
ROW_TENSORS = (
    "prompt_embeds",
    "pooled_prompt_embeds",
    "prompt_attention_mask",
    "negative_prompt_embeds",
    "negative_pooled_prompt_embeds",
    "negative_prompt_attention_mask",
)


def stack_inputs(items: Sequence[DenoiseItem]) -> DenoiseInputs:
    """One transformer batch from same-key requests: each prompt's rows repeated n times. A tensor
    the requests do not have (no pooled embeddings, no guidance) stays None; same-key requests of one
    model either all have it or none do."""
    import torch

    def stacked(name: str):
        parts = [(getattr(it.embeddings, name), it.spec.n) for it in items]
        if parts[0][0] is None:
            return None
        return torch.cat([t.repeat(n, *([1] * (t.dim() - 1))) for t, n in parts])

    return DenoiseInputs(
        **{name: stacked(name) for name in ROW_TENSORS},
        sampling=SamplingParams.merged([it.spec.sampling for it in items]),
    )


def preview_steps(steps: int, partial_images: int) -> dict[int, int]:
    """{step after which to preview: preview index}: `partial_images` evenly spaced steps before
    the last (the last step's image is the result itself)."""
    if partial_images <= 0 or steps <= 1:
        return {}
    count = min(partial_images, steps - 1)
    at = sorted({max(1, round(steps * (j + 1) / (count + 1))) for j in range(count)})
    return {step: index for index, step in enumerate(s for s in at if s < steps)}


def row_offsets(items: Sequence[DenoiseItem]) -> list[int]:
    offsets, row = [], 0
    for item in items:
        offsets.append(row)
        row += item.spec.n
    return offsets


@dataclass
class _Step:
    """A step sent to the ranks and not yet reported: who was in it."""

    number: int
    members: list[int]  # items whose rows it computes, in row order
    previews: list[tuple[int, int]]  # (item, preview index) asked of rank 0, in order
    call: "asyncio.Future"


async def run_group(group, items: Sequence[DenoiseItem], progress: StageProgress) -> list:
    """Latents (the rows, CPU) or `Cancelled` per item. Raises what the worker group raises.

    Two steps are in flight at a time: while the ranks compute step k+1, the replica reports step
    k, reads the stop flags and sends step k+2 with the rows to keep. The ranks never wait on a
    round trip between steps, and a request stopped at any moment has at most two more steps
    computed (the one running and the one queued)."""
    started, began = time.time(), time.perf_counter()
    ids = [it.spec.request_id for it in items]
    stopped = await progress.stopped(ids)
    results: list = [Cancelled(i, STAGE, 0) if i in stopped else None for i in ids]
    active = [k for k, i in enumerate(ids) if i not in stopped]  # items on the ranks, row order
    if not active:
        return results
    for k in active:
        if items[k].reports:  # a request's queue wait, once
            progress.metrics.waited(items[k].embeddings.ready_at, started)
    rows_at_start = sum(items[k].spec.n for k in active)
    steps = items[active[0]].spec.sampling.num_inference_steps
    previews = {k: preview_steps(steps, items[k].spec.partial_images) for k in active}
    group.begin(stack_inputs([items[k] for k in active]))
    in_flight: deque[_Step] = deque()

    def send(number: int, keep) -> None:
        offsets = row_offsets([items[k] for k in active])
        asked = [(k, previews[k][number]) for k in active if number in previews[k]]
        rows = [offsets[active.index(k)] for k, _ in asked]
        in_flight.append(_Step(number, list(active), asked, asyncio.ensure_future(group.step(keep, rows))))

    async def drop_stopped(done: int):
        """Rows to keep (None: all) once the requests stopped now leave, after `done` steps."""
        nonlocal active
        # Steps reported so far reach the log before the flags are read, so a log shows at most
        # the two steps in flight after any cancel.
        await progress.flush()
        stopped = await progress.stopped([ids[k] for k in active])
        if not stopped:
            return None
        offsets = row_offsets([items[k] for k in active])
        keep = [
            offsets[n] + r
            for n, k in enumerate(active)
            if ids[k] not in stopped
            for r in range(items[k].spec.n)
        ]
        for k in active:
            if ids[k] in stopped:
                results[k] = Cancelled(ids[k], STAGE, done)
        active = [k for k in active if ids[k] not in stopped]
        return keep

    next_step = 1
    try:
        while next_step <= steps or in_flight:
            if next_step <= steps and len(in_flight) < 2:
                keep = None if next_step == 1 else await drop_stopped(next_step - 1)
                if active:
                    send(next_step, keep)
                    next_step += 1
                    continue
                next_step = steps + 1  # every request stopped: let the steps in flight end
            sent = in_flight.popleft()
            report = await sent.call
            progress.metrics.step(sum(items[k].spec.n for k in sent.members), report.seconds)
            progress.emit(
                [
                    events.step_done(ids[k], sent.number, steps, report.seconds)
                    for k in sent.members
                    if items[k].reports
                ]
            )
            progress.emit(
                [
                    events.preview(ids[k], sent.number, index, png, width, height)
                    for (k, index), (png, width, height) in zip(sent.previews, report.previews)
                ]
            )
    except Exception as exc:
        if isinstance(exc, WorkerGroupBroken):  # nothing to wait for
            _cancel(in_flight)
            raise
        # The batch failed on every rank alike (out of memory, a bad input): the group is in step.
        # Let the steps already sent end (they fail fast: the ranks dropped the batch), then clear
        # it on every rank, so the next batch starts clean.
        await asyncio.gather(*(sent.call for sent in in_flight), return_exceptions=True)
        await group.abort()
        raise
    except BaseException:  # cancelled: the caller went away
        _cancel(in_flight)
        raise
    if not active:
        await group.abort()
        return results
    latents = await group.finish()
    progress.metrics.batch(rows_at_start, time.perf_counter() - began)
    for k, start in zip(active, row_offsets([items[k] for k in active])):
        results[k] = latents[start : start + items[k].spec.n].clone()
    return results


def _cancel(in_flight) -> None:
    for sent in in_flight:
        sent.call.cancel()
