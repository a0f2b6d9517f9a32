"""The denoiser's per-step contract: one same-key group of requests, run step by step.

Between two steps the loop asks which of its requests must stop (cancelled by a DELETE on any
ingress, abandoned by a client that went away, or already ended) and sends the next step with the
rows to keep to every rank of the worker group: the ranks never decide anything themselves, so
they cannot disagree and no collective waits on a rank that stopped. Stopped requests leave the
batch at once (their callers get `Cancelled`, their rows stop costing compute); the others go on
as if the stopped ones had never been there. Each step is reported per request (`step` events),
with previews of image 0 where a request asked for them.

A later step-level scheduler replaces this loop behind the same contract: requests in, a stop
check by request id at every step boundary, step events out, latents or `Cancelled` per request.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Sequence

from deployments import events
from deployments.families.base import DenoiseInputs
from deployments.payloads import Cancelled, GenerationSpec, PromptEmbeddings
from deployments.progress import StageProgress
from deployments.sampling import SamplingParams

STAGE = "denoiser"


@dataclass(frozen=True)
class DenoiseItem:
    spec: GenerationSpec
    embeddings: PromptEmbeddings


def stack_inputs(items: Sequence[DenoiseItem]) -> DenoiseInputs:
    """One transformer batch from same-key requests: each prompt's rows repeated n times."""
    import torch

    pooled = [it.embeddings.pooled_prompt_embeds for it in items]
    return DenoiseInputs(
        prompt_embeds=torch.cat([it.embeddings.prompt_embeds.repeat(it.spec.n, 1, 1) for it in items]),
        pooled_prompt_embeds=None
        if pooled[0] is None
        else torch.cat([p.repeat(it.spec.n, 1) for p, it in zip(pooled, items)]),
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
    ids = [it.spec.request_id for it in items]
    results: list = [None] * len(items)
    stopped = await progress.stopped(ids)
    active = [i for i in range(len(items)) if ids[i] not in stopped]
    for i in range(len(items)):
        if i not in active:
            results[i] = Cancelled(ids[i], STAGE, 0)
    if not active:
        return results
    sampling = items[active[0]].spec.sampling
    steps = sampling.num_inference_steps
    previews = {i: preview_steps(steps, items[i].spec.partial_images) for i in active}
    done = {i: 0 for i in active}  # steps sent with each item's rows
    group.begin(stack_inputs([items[i] for i in active]))
    in_flight: deque[_Step] = deque()
    sent_with = list(active)  # the members of the last step sent (the ranks' current rows)

    def send(number: int, keep) -> None:
        offsets = row_offsets([items[i] for i in active])
        asked = [(i, previews[i][number]) for i in active if number in previews[i]]
        rows = [offsets[active.index(i)] for i, _ in asked]
        call = asyncio.ensure_future(group.step(keep, rows))
        in_flight.append(_Step(number, list(active), asked, call))
        for i in active:
            done[i] = number

    next_step = 1
    try:
        while next_step <= steps or in_flight:
            if next_step <= steps and len(in_flight) < 2 and active:
                keep = None
                if next_step > 1:
                    # Steps reported so far reach the log before the flags are read, so a log
                    # shows at most the two steps in flight after any cancel.
                    await progress.flush()
                    stopped = await progress.stopped([ids[i] for i in active])
                    if stopped:
                        offsets = row_offsets([items[i] for i in sent_with])
                        keep = [
                            offsets[k] + r
                            for k, i in enumerate(sent_with)
                            if ids[i] not in stopped
                            for r in range(items[i].spec.n)
                        ]
                        for i in active:
                            if ids[i] in stopped:
                                results[i] = Cancelled(ids[i], STAGE, done[i])
                        active = [i for i in active if ids[i] not in stopped]
                if active:
                    send(next_step, keep)
                    sent_with = list(active)
                    next_step += 1
                    continue
                next_step = steps + 1  # every request stopped: let the steps in flight end
            sent = in_flight.popleft()
            report = await sent.call
            progress.emit([events.step_done(ids[i], sent.number, steps, report.seconds) for i in sent.members])
            progress.emit(
                [
                    events.preview(ids[i], sent.number, index, png, width, height)
                    for (i, index), (png, width, height) in zip(sent.previews, report.previews)
                ]
            )
    finally:
        for sent in in_flight:  # a failure: the group is broken; nothing to wait for
            sent.call.cancel()
    if not active:
        await group.abort()
        return results
    latents = await group.finish()
    for i, start in zip(active, row_offsets([items[i] for i in active])):
        results[i] = latents[start : start + items[i].spec.n].clone()
    return results
