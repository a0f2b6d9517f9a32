"""Shape keys and batch costs: which requests can share one forward pass, and what a batch weighs."""

from __future__ import annotations

import logging
from typing import Callable, Hashable, Sequence, TypeVar

from deployments.errors import ApiError, StageFailure
from deployments.payloads import GenerationSpec, Rejected

T = TypeVar("T")


def denoise_key(spec: GenerationSpec) -> tuple:
    return spec.sampling.batch_key


def decode_key(spec: GenerationSpec) -> tuple:
    return spec.sampling.size_key


def group_by(items: Sequence[T], key: Callable[[T], Hashable]) -> list[list[int]]:
    """Indices of `items` grouped by key, groups and members in arrival order."""
    groups: dict[Hashable, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(key(item), []).append(i)
    return list(groups.values())


def images_in(items: Sequence) -> int:
    """`batch_size_fn` for stages whose items carry a spec: a batch weighs its images, not its
    requests (a request for n=4 costs the transformer four rows)."""
    return sum(item.spec.n for item in items)


def row_slices(counts: Sequence[int]) -> list[slice]:
    """Consecutive row blocks, one per count: how a concatenated batch splits back per request."""
    out, start = [], 0
    for count in counts:
        out.append(slice(start, start + count))
        start += count
    return out


def isolate_failures(items: Sequence[T], run: Callable[[list[T]], list], failed: Callable[[T, Exception], object]) -> list:
    """`run(items)` -> one result per item; if the batch raises, each item runs alone, and an item
    that raises alone gets `failed(item, error)` instead: one bad item fails only itself."""
    items = list(items)
    try:
        return run(items)
    except Exception as exc:  # noqa: BLE001 - retried item by item below
        if len(items) == 1:
            return [failed(items[0], exc)]
        logging.getLogger("ray.serve").warning(
            "a batch of %d items failed (%s: %s); running them one by one", len(items), type(exc).__name__, exc
        )
    results = []
    for item in items:
        try:
            results.extend(run([item]))
        except Exception as exc:  # noqa: BLE001 - this item's own failure
            results.append(failed(item, exc))
    return results


def rejected_alone(stage: str, request_id: str, exc: Exception) -> Rejected:
    """What a request that failed alone gets: its own client error, or an internal error carrying
    its request id (the traceback goes to the log under that id, never into a body)."""
    if isinstance(exc, ApiError):
        return Rejected(request_id, exc)
    logging.getLogger("ray.serve").error("%s failed for request %s", stage, request_id, exc_info=exc)
    return Rejected(request_id, StageFailure(stage, request_id))
