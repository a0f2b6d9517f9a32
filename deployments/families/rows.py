"""The step protocol's shared check: which rows may share one `forward_rows` call.

Step-level batching (`denoiser.batching.mode: step`) keeps every image between steps as a row of
its family (`FluxRow`, `SD3Row`, `PixArtRow`), each with its own scheduler, timesteps, generator and
guidance. A family's `forward_rows` runs any set of its rows in one transformer call, provided they
share height and width (one token sequence length) and no row is given twice or after its last step.
"""

from __future__ import annotations

from typing import Any, Sequence

from deployments.families.speed import new_run


def check_rows(rows: Sequence[Any], denoising: Any) -> None:
    """Refuse rows that cannot share one `forward_rows` call (sizes, repeats, done rows), and
    start the transformer's per-batch state afresh when the set of rows changed."""
    sizes = sorted({(r.height, r.width) for r in rows})
    if len(sizes) > 1:
        named = ", ".join(f"{h}x{w}" for h, w in sizes)
        raise ValueError(f"rows of different sizes cannot share a transformer call (height x width: {named})")
    keys = tuple(r.key for r in rows)
    if len(set(keys)) < len(keys) or any(r.done for r in rows):
        raise ValueError("every row must be given once and not be done")
    if keys != denoising.rows_forwarded:
        denoising.rows_forwarded = keys
        new_run(denoising.transformer)


def row_tensors(run: Any, names: Sequence[str], i: int) -> dict:
    """Image `i` of each of the run's batched tensors `names` (batch dimension kept; a tensor the
    run does not have, such as the negative ones without CFG, stays None): a row's fields."""
    return {name: None if getattr(run, name) is None else getattr(run, name)[i : i + 1] for name in names}
