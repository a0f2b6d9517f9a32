"""A denoise batch that runs out of device memory is run again in halves, down to single images.

`run_splitting` is `run_group` (deployments.denoise_loop) for a batch that may not fit: when a
step raises an out of memory on the worker group (on every rank alike; the ranks dropped the batch
and freed its memory), the batch's rows are split in two halves and each half restarts from its
initial latents, one after the other, recursively. Rows of one request may land in different halves
(its images are independent rows). Seeds are per image, so every image equals its solo run. An
image that runs out of memory alone fails its request, alone, with `InsufficientMemory` (a 400
naming `size`), returned as that request's `Rejected`; the other requests get their latents. A
restarted request's `step` events start again at 1; a split request reports the steps of its first
part only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from deployments.denoise_loop import STAGE, DenoiseItem, run_group
from deployments.oom import insufficient_memory, is_oom
from deployments.payloads import Cancelled, Rejected
from deployments.progress import StageProgress
from deployments.runtime import logger


@dataclass(frozen=True)
class Part:
    """Rows [start, stop) of request `origin` (its index in the batch)."""

    origin: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def whole(items: Sequence[DenoiseItem]) -> list[Part]:
    return [Part(k, 0, item.spec.n) for k, item in enumerate(items)]


def halves(parts: Sequence[Part]) -> tuple[list[Part], list[Part]]:
    """The first rows // 2 rows and the rest, in row order; a part across the middle is cut."""
    mid = sum(p.rows for p in parts) // 2
    first: list[Part] = []
    second: list[Part] = []
    row = 0
    for p in parts:
        if row + p.rows <= mid:
            first.append(p)
        elif row >= mid:
            second.append(p)
        else:
            cut = p.start + mid - row
            first.append(Part(p.origin, p.start, cut))
            second.append(Part(p.origin, cut, p.stop))
        row += p.rows
    return first, second


def part_item(item: DenoiseItem, part: Part) -> DenoiseItem:
    """The request's rows of `part` as an item of their own: their seeds; previews (of image 0) and
    step events only with the first rows."""
    if part.start == 0 and part.stop == item.spec.n:
        return item
    sampling = item.spec.sampling
    spec = replace(
        item.spec,
        sampling=sampling.with_seeds(sampling.seeds[part.start : part.stop]),
        partial_images=item.spec.partial_images if part.start == 0 else 0,
    )
    return DenoiseItem(spec, item.embeddings, reports=item.reports and part.start == 0)


def merge(items: Sequence[DenoiseItem], done: Sequence[tuple[Part, object]]) -> list:
    """One outcome per item from its parts' outcomes: a `Rejected` part rejects the request, a
    `Cancelled` one cancels it, else its parts' latents in row order."""
    by_origin: dict[int, list[tuple[int, object]]] = {}
    for part, outcome in done:
        by_origin.setdefault(part.origin, []).append((part.start, outcome))
    results = []
    for k in range(len(items)):
        outcomes = [o for _, o in sorted(by_origin[k], key=lambda pair: pair[0])]
        ended = [o for o in outcomes if isinstance(o, Rejected)] or [
            o for o in outcomes if isinstance(o, Cancelled)
        ]
        if ended:
            results.append(ended[0])
        elif len(outcomes) == 1:
            results.append(outcomes[0])
        else:
            import torch

            results.append(torch.cat(outcomes))
    return results


async def run_splitting(group, items: Sequence[DenoiseItem], progress: StageProgress) -> list:
    """Latents, `Cancelled` or `Rejected` (out of memory alone) per item; raises what the worker
    group raises otherwise (a broken group, a failure that is not an out of memory)."""
    return merge(items, await _run_parts(group, items, whole(items), progress))


async def _run_parts(group, items, parts: list[Part], progress) -> list[tuple[Part, object]]:
    batch = [part_item(items[p.origin], p) for p in parts]
    try:
        return list(zip(parts, await run_group(group, batch, progress)))
    except Exception as exc:  # noqa: BLE001 - only an out of memory is handled here
        if not is_oom(exc):
            raise
        reason = str(getattr(exc, "cause", None) or exc).splitlines()[0]
    rows = sum(p.rows for p in parts)
    ids = [items[p.origin].spec.request_id for p in parts]
    if rows == 1:
        spec = items[parts[0].origin].spec
        logger.warning(
            "denoiser: request %s: one %dx%d image ran out of memory alone (%s): rejected",
            spec.request_id,
            spec.sampling.width,
            spec.sampling.height,
            reason,
        )
        error = insufficient_memory(STAGE, spec.sampling.width, spec.sampling.height)
        return [(parts[0], Rejected(spec.request_id, error))]
    logger.warning(
        "denoiser: a batch of %d images ran out of memory (%s); running it again in halves, requests %s",
        rows,
        reason,
        ids,
    )
    first, second = halves(parts)
    done = await _run_parts(group, items, first, progress)
    ended = {p.origin for p, o in done if isinstance(o, (Rejected, Cancelled))}
    rest = [p for p in second if p.origin not in ended]  # a request already failed needs no more
    if rest:
        done += await _run_parts(group, items, rest, progress)
    return done
