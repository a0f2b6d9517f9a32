"""Running out of device memory: telling it apart, provoking it on purpose, recovering from it.

A forward that runs out of memory (`torch.OutOfMemoryError`; `torch.cuda.OutOfMemoryError` is the
same class) is not a broken replica: the stage frees what it can and runs the batch again in halves,
down to single images (see `deployments.denoise_split` and the VAE decoder); only an image that does
not fit alone fails, its request alone, with `InsufficientMemory` (a 400 naming `size`).

Fault injection, for tests and for operators rehearsing: with `DIT_SERVE_FAULT_OOM_PIXELS=<int>` in
a process's environment, every forward of the denoiser (each step, on every rank) and of the VAE
decoder whose rows x height x width exceeds it raises `torch.OutOfMemoryError("injected ...")`
before it runs. The variable is read at every forward (docs/request-lifecycle.md, "Out of memory").
"""

from __future__ import annotations

import gc
import logging
import os
from typing import Callable, Optional, Sequence, TypeVar

from deployments.errors import InsufficientMemory

T = TypeVar("T")

FAULT_ENV = "DIT_SERVE_FAULT_OOM_PIXELS"

logger = logging.getLogger("ray.serve")


def is_oom(exc: Optional[BaseException]) -> bool:
    """True if `exc`, or what it wraps (a Ray task error's `cause`, an exception's `__cause__`), is
    a `torch.OutOfMemoryError`."""
    import torch

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, torch.OutOfMemoryError):
            return True
        cause = getattr(exc, "cause", None)
        exc = cause if isinstance(cause, BaseException) else exc.__cause__
    return False


def inject_oom(where: str, rows: int, height: int, width: int) -> None:
    """Raise an injected OutOfMemoryError if `DIT_SERVE_FAULT_OOM_PIXELS` is set and this forward's
    rows x height x width exceeds it."""
    limit = os.environ.get(FAULT_ENV)
    if not limit:
        return
    try:
        pixels_limit = int(limit)
    except ValueError:
        raise ValueError(f"{FAULT_ENV} must be an integer number of pixels, got {limit!r}") from None
    pixels = rows * height * width
    if pixels > pixels_limit:
        import torch

        raise torch.OutOfMemoryError(
            f"injected out of memory in {where}: {rows} x {width}x{height} = {pixels} pixels"
            f" > {FAULT_ENV}={pixels_limit}"
        )


def free_memory() -> None:
    """Release what a failed forward left: unreachable tensors, then the CUDA allocator's cache."""
    import torch

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def forward_freeing(fn: Callable[..., T], *args, on_oom: Optional[Callable[[], None]] = None) -> T:
    """`fn(*args)`; if it runs out of memory: drop the exception (its traceback holds the forward's
    tensors), call `on_oom` (drop the batch's own state), free the memory, and raise a fresh
    OutOfMemoryError with the same message."""
    import torch

    try:
        return fn(*args)
    except torch.OutOfMemoryError as exc:
        message = str(exc) or "out of memory"
    # Outside the except block: the exception and its frames (the activations) are gone now.
    if on_oom is not None:
        on_oom()
    free_memory()
    raise torch.OutOfMemoryError(message)


def run_halving(run: Callable[[list[int]], Sequence[T]], rows: Sequence[int], what: str) -> list[Optional[T]]:
    """`run(rows)` -> one result per row; when it runs out of memory, run each half of the rows in
    turn (recursively). A row that runs out of memory alone gets None. Other errors propagate."""
    rows = list(rows)
    try:
        return list(run(rows))
    except Exception as exc:  # noqa: BLE001 - only an OOM is handled here
        if not is_oom(exc):
            raise
        message = str(exc)
    if len(rows) == 1:
        logger.warning("%s: one row does not fit in device memory alone (%s)", what, message)
        return [None]
    logger.warning("%s: %d rows ran out of memory (%s); running them in halves", what, len(rows), message)
    mid = len(rows) // 2
    return run_halving(run, rows[:mid], what) + run_halving(run, rows[mid:], what)


def insufficient_memory(stage: str, width: int, height: int) -> InsufficientMemory:
    """The error of a request whose single image does not fit in `stage`'s device memory."""
    return InsufficientMemory(
        f"one {width}x{height} image does not fit in the {stage}'s device memory (it ran out of"
        f" memory generating a single image); reduce size. n is not the cause: a request's images"
        f" are run in as many smaller batches as memory needs.",
        "size",
    )
