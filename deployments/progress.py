"""A stage replica's link to the job store: progress events out, stop flags in.

Events are written by one task per replica, in the order they were emitted, off the compute path
(a step never waits for a write); `flush` waits until everything emitted so far is written, and a
stage flushes before it returns a result, so a request's log is always in causal order across
stages. Store failures are logged and never fail a request: progress is a report, not the work.

It also holds the replica's `StageMetrics` (`metrics`): `run_batch` records each batch's size,
time and queue waits; the denoiser's loop records its own.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
import time
from typing import Optional, Sequence

from deployments import events
from deployments.job_store.base import JobStore, NewEvent
from deployments.metrics import StageMetrics
from deployments.payloads import Cancelled

logger = logging.getLogger("ray.serve")


class StageProgress:
    def __init__(
        self,
        store: JobStore,
        stage: str,
        metrics: Optional[StageMetrics] = None,
        model: Optional[str] = None,
    ):
        self.stage = stage
        self.model = model  # stamped on the progress a record keeps (per-model queue depths)
        self.metrics = metrics or StageMetrics(stage)
        self._store = store
        self._pending: list[NewEvent] = []
        self._emitted = 0
        self._written = 0
        self._writer: asyncio.Task | None = None
        self._wrote = asyncio.Condition()
        self._local_stops: set[str] = set()

    # -- stop flags -----------------------------------------------------------------------------
    def stop_locally(self, request_id: str) -> None:
        """The caller of this request went away (Serve cancelled its call in this replica)."""
        self._local_stops.add(request_id)

    def forget(self, request_ids: Sequence[str]) -> None:
        self._local_stops.difference_update(request_ids)

    async def stopped(self, request_ids: Sequence[str]) -> set[str]:
        """Which of these requests must stop now: cancelled (anywhere), ended, or abandoned."""
        local = self._local_stops.intersection(request_ids)
        try:
            flagged = await asyncio.to_thread(self._store.cancel_requested, list(request_ids))
        except Exception:  # noqa: BLE001 - a store outage must not stop the work
            logger.exception("%s: reading cancel flags failed; going on", self.stage)
            flagged = set()
        return local | flagged

    async def run_batch(self, items: Sequence, ids: Sequence[str], rows_of, work, done_type) -> list:
        """One batch of a stage that reports only its start and end (text encoder, VAE): stopped
        requests are answered `Cancelled` without work; the others get `stage` started/finished
        events around `work(todo)` (one result per item), written before the results return.
        Items carry `ready_at` (when each became ready for this stage: its queue wait's start)."""
        started = time.time()
        stopped = await self.stopped(ids)
        todo = [item for item, i in zip(items, ids) if i not in stopped]
        rows = rows_of(todo)
        self.emit([events.stage_started(i, self.stage, rows) for i in ids if i not in stopped])
        for item in todo:
            self.metrics.waited(item.ready_at, started)
        done = iter(await self._timed(work, todo, rows) if todo else ())
        results = [Cancelled(i, self.stage) if i in stopped else next(done) for i in ids]
        self.emit(
            [
                events.stage_finished(i, self.stage, rows, out.trace[-1].seconds)
                for i, out in zip(ids, results)
                if isinstance(out, done_type)
            ]
        )
        await self.flush()
        return results

    async def _timed(self, work, todo: Sequence, rows: int) -> list:
        began = time.perf_counter()
        results = await work(todo)
        self.metrics.batch(rows, time.perf_counter() - began)
        return results

    # -- events ---------------------------------------------------------------------------------
    def emit(self, events: Sequence[NewEvent]) -> None:
        if not events:
            return
        if self.model is not None:
            events = [
                e if e.progress is None else replace(e, progress={**e.progress, "model": self.model})
                for e in events
            ]
        self._pending.extend(events)
        self._emitted += len(events)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write())

    async def flush(self) -> None:
        target = self._emitted
        async with self._wrote:
            await self._wrote.wait_for(lambda: self._written >= target)

    async def _write(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await asyncio.to_thread(self._store.append_events, batch)
            except Exception:  # noqa: BLE001 - progress is best effort
                logger.exception("%s: writing %d progress events failed", self.stage, len(batch))
            async with self._wrote:
                self._written += len(batch)
                self._wrote.notify_all()
