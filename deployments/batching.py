"""Shape keys and batch costs: which requests can share one forward pass, and what a batch weighs."""

from __future__ import annotations

from typing import Callable, Hashable, Sequence, TypeVar

from deployments.payloads import GenerationSpec

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
