"""A stage replica's Prometheus metrics, through `ray.serve.metrics` (exported on Ray's metrics
endpoint of each node, prefixed `ray_`; see docs/observability.md).

One `StageMetrics` per replica, built with its `StageProgress` (the object every stage replica
holds); nothing here lives at module level. Serve adds the `deployment`, `replica` and
`application` tags itself; every series also carries `stage`.

Queue wait is the time between a payload becoming ready for this stage (its `ready_at`, stamped
where it was made: by the ingress as it sends the encode request, by the previous stage when its
output was done) and the start of the batch that takes it. The stamps are wall-clock times from
other processes, possibly other nodes, so a wait is clamped at 0 against clock skew.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

# Seconds. A tiny model on a CPU takes milliseconds a batch; FLUX.1-dev at 1024px, 28 steps and a
# full batch takes minutes on one GPU.
BATCH_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
QUEUE_WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
STEP_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10)
# Rows (prompts for the text encoder, images for the denoiser and the decoder). Half-integer
# bounds: Ray exports a histogram's `_sum` from its buckets' midpoints, not the values observed,
# so every size up to 8 gets a bucket whose midpoint is the size itself and sums stay exact there
# (le="2.5" counts batches of at most 2 rows).
BATCH_SIZE_BUCKETS = (0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5, 8.5, 12.5, 16.5, 24.5, 32.5, 48.5, 64.5, 128.5)


def queue_wait(ready_at: float, started: float) -> float:
    """Seconds a payload waited for its batch; 0 when the clocks disagree the other way."""
    return max(0.0, started - ready_at)


class StageMetrics:
    def __init__(self, stage: str):
        from ray.serve.metrics import Gauge, Histogram

        self.stage = stage
        self.depth = 0  # requests in this replica: waiting in its batch queue or in a batch
        tags = ("stage",)
        self._batch_seconds = Histogram(
            "dit_serve_stage_batch_seconds",
            "Seconds a stage batch took to compute (the denoiser: one same-shape group, every step).",
            boundaries=list(BATCH_SECONDS_BUCKETS),
            tag_keys=tags,
        )
        self._batch_size = Histogram(
            "dit_serve_stage_batch_size",
            "Rows in a stage batch: prompts (text encoder) or images (denoiser, VAE decoder).",
            boundaries=list(BATCH_SIZE_BUCKETS),
            tag_keys=tags,
        )
        self._queue_wait = Histogram(
            "dit_serve_stage_queue_wait_seconds",
            "Seconds a request waited between being ready for a stage and the start of its batch there.",
            boundaries=list(QUEUE_WAIT_BUCKETS),
            tag_keys=tags,
        )
        self._queue_depth = Gauge(
            "dit_serve_stage_queue_depth",
            "Requests in a stage replica: waiting in its batch queue or running in a batch.",
            tag_keys=tags,
        )
        self._step_seconds = Histogram(
            "dit_serve_denoise_step_seconds",
            "Seconds one denoising step took on the worker group, by the rows it computed.",
            boundaries=list(STEP_SECONDS_BUCKETS),
            tag_keys=tags + ("rows",),
        )
        for metric in (
            self._batch_seconds,
            self._batch_size,
            self._queue_wait,
            self._queue_depth,
            self._step_seconds,
        ):
            metric.set_default_tags({"stage": stage})
        self._queue_depth.set(0)

    def batch(self, rows: int, seconds: float) -> None:
        """One batch (of `rows`) computed in `seconds`."""
        self._batch_seconds.observe(seconds)
        self._batch_size.observe(rows)

    def waited(self, ready_at: float, started: float) -> None:
        """A request that became ready at `ready_at` started its batch at `started`."""
        self._queue_wait.observe(queue_wait(ready_at, started))

    def step(self, rows: int, seconds: float) -> None:
        """One denoising step over `rows` rows."""
        self._step_seconds.observe(seconds, tags={"rows": str(rows)})

    @contextlib.contextmanager
    def in_stage(self) -> Iterator[None]:
        """Around a request's call into this replica: counted in the queue depth while it waits
        for its batch and while the batch runs."""
        self.depth += 1
        self._queue_depth.set(self.depth)
        try:
            yield
        finally:
            self.depth -= 1
            self._queue_depth.set(self.depth)
