"""A stage's batch queue: a batch starts the moment the stage is free, with what is queued.

Serve's `@serve.batch` closes a batch `batch_wait_timeout_s` after its first item whether or not
the stage could run it: an idle stage makes a lone request wait out the window, and a busy one
cuts the next batch short after the window while the current batch still runs (the items behind
it then queue as further small batches). Here a batch is taken when the stage is ready for it:

- items that queued while a batch ran all go into the next batch at once (up to
  `max_batch_size`, weighed by `size_fn`), with no window: under load batches fill by themselves;
- an item that reaches an idle stage waits at most `batch_wait_timeout_s` for company (0: runs at
  once), and less if a full batch forms sooner.

Order is first in, first out: an item that does not fit the batch being taken opens the next one.
A caller that goes away (its task cancelled) before its batch is taken is dropped from the queue;
one cancelled during its batch has its result discarded. `run` gets the items and returns one
result per item, in order; a result may be an exception value (the caller raises it), and an
exception raised by `run` reaches every caller of that batch.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Awaitable, Callable, Optional, Sequence


class StageBatcher:
    def __init__(
        self,
        run: Callable[[list], Awaitable[Sequence[Any]]],
        max_batch_size: int,
        batch_wait_timeout_s: float,
        size_fn: Callable[[Sequence], int] = len,
    ):
        self._run = run
        self._max = max_batch_size
        self._wait_s = batch_wait_timeout_s
        self._size = size_fn
        self._queue: deque[tuple[Any, asyncio.Future]] = deque()
        self._arrived = asyncio.Event()
        self._task: Optional[asyncio.Task] = None

    @classmethod
    def from_config(cls, run, batching, size_fn: Callable[[Sequence], int] = len) -> "StageBatcher":
        return cls(run, batching.max_batch_size, batching.batch_wait_timeout_s, size_fn)

    def queued(self) -> int:
        return sum(not fut.done() for _, fut in self._queue)

    async def submit(self, item) -> Any:
        """The item's result, once the batch it joined has run."""
        if self._size([item]) > self._max:
            raise ValueError(f"an item of size {self._size([item])} exceeds max_batch_size {self._max}")
        future = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        self._arrived.set()
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._serve())
        return await future

    async def _serve(self) -> None:
        backlog = False  # items queued while the last batch ran: they go at once
        while True:
            if not backlog:  # an idle stage: the first arrival may wait a window for company
                while not self._drop_gone():
                    self._arrived.clear()
                    await self._arrived.wait()
                await self._fill(self._wait_s)
            batch = self._take()
            if batch:
                await self._run_batch(batch)
            backlog = self._drop_gone() > 0

    def _drop_gone(self) -> int:
        """Forget callers that went away; how many items wait."""
        self._queue = deque((item, fut) for item, fut in self._queue if not fut.done())
        return len(self._queue)

    async def _fill(self, wait_s: float) -> None:
        if wait_s <= 0:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while self._weight(self._queue) < self._max:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _take(self) -> list[tuple[Any, asyncio.Future]]:
        self._drop_gone()
        batch: list[tuple[Any, asyncio.Future]] = []
        while self._queue and (not batch or self._weight(batch + [self._queue[0]]) <= self._max):
            batch.append(self._queue.popleft())
        return batch

    def _weight(self, entries) -> int:
        return self._size([item for item, _ in entries])

    async def _run_batch(self, batch: list[tuple[Any, asyncio.Future]]) -> None:
        try:
            results = list(await self._run([item for item, _ in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} items gave {len(results)} results")
        except asyncio.CancelledError:  # the replica is going away
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - delivered to every caller of the batch
            results = [exc] * len(batch)
        for (_, future), result in zip(batch, results):
            if not future.done():
                future.set_result(result)
