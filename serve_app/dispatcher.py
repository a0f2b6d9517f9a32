"""Each ingress replica's background loops: claim queued jobs while it has room, and maintain
(renew its leases, recover jobs whose ingress died, delete expired records).

Started on the replica's event loop when the replica starts; `stop` (Serve's graceful shutdown)
ends them and releases this ingress's leases, so another ingress (or this app after a restart)
re-queues its unfinished jobs at once instead of after the lease time.
"""

from __future__ import annotations

import asyncio
import logging

from serve_app.jobs import Jobs

logger = logging.getLogger("dit_serve")


class Dispatcher:
    def __init__(self, jobs: Jobs):
        self.jobs = jobs
        self.settings = jobs.settings
        self._wake = asyncio.Event()
        self._claimed: set[str] = set()
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._claim_loop()), loop.create_task(self._maintain_loop())]

    def wake(self) -> None:
        """A job was queued here: look now instead of at the next poll."""
        self._wake.set()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        released = await self.jobs.call(self.jobs.store.release, self.jobs.worker)
        logger.info("dispatcher %s stopped; released %d lease(s)", self.jobs.worker, released)

    async def _claim_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.settings.poll_interval_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                await self._claim()
            except Exception:  # noqa: BLE001 - keep dispatching through a store hiccup
                logger.exception("claiming jobs failed")

    async def _claim(self) -> None:
        self._claimed &= set(self.jobs.running)
        room = self.settings.max_running - len(self._claimed)
        if room <= 0:
            return
        jobs = self.jobs
        for record in await jobs.call(jobs.store.claim, jobs.worker, self.settings.lease_s, room):
            self._claimed.add(record.id)
            jobs.run_claimed(record).add_done_callback(lambda _: self._wake.set())

    async def _maintain_loop(self) -> None:
        interval = min(self.settings.maintenance_interval_s, self.settings.lease_s / 3)
        while True:
            try:
                await self.jobs.maintain()
            except Exception:  # noqa: BLE001
                logger.exception("job maintenance failed")
            await asyncio.sleep(interval)  # a period, not a wait for a signal
