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


async def run_group(group, items: Sequence[DenoiseItem], progress: StageProgress) -> list:
    """Latents (the rows, CPU) or `Cancelled` per item. Raises what the worker group raises."""
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
    group.begin(stack_inputs([items[i] for i in active]))
    keep = None
    for step in range(1, steps + 1):
        if step > 1:
            stopped = await progress.stopped([ids[i] for i in active])
            if stopped:
                offsets = row_offsets([items[i] for i in active])
                keep = [
                    offsets[k] + r
                    for k, i in enumerate(active)
                    if ids[i] not in stopped
                    for r in range(items[i].spec.n)
                ]
                for i in active:
                    if ids[i] in stopped:
                        results[i] = Cancelled(ids[i], STAGE, step - 1)
                active = [i for i in active if ids[i] not in stopped]
                if not active:
                    await group.abort()
                    return results
        offsets = row_offsets([items[i] for i in active])
        asked = [(i, previews[i][step]) for i in active if step in previews[i]]
        report = await group.step(keep, [offsets[active.index(i)] for i, _ in asked])
        keep = None
        progress.emit([events.step_done(ids[i], step, steps, report.seconds) for i in active])
        progress.emit(
            [
                events.preview(ids[i], step, index, png, width, height)
                for (i, index), (png, width, height) in zip(asked, report.previews)
            ]
        )
    latents = await group.finish()
    for i, start in zip(active, row_offsets([items[i] for i in active])):
        results[i] = latents[start : start + items[i].spec.n].clone()
    return results
