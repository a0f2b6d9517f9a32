"""One tail of the job store's event log per ingress replica, fanned out to the streams open here.

Every `GET /v1/images/jobs/{id}/events` and every streamed generation subscribes to its job here
instead of querying the store on its own, so hundreds of open streams cost one store query (or one
blocking read) at a time. A subscriber reads the job's history from the store itself after
subscribing, so nothing falls between the two; events arriving twice are dropped by their seq.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict

from deployments.job_store.base import JobEvent, JobStore

logger = logging.getLogger("dit_serve")
TAIL_WAIT_S = 1.0


class EventHub:
    def __init__(self, store: JobStore):
        self._store = store
        self._subscribers: dict[str, set[asyncio.Queue]] = defaultdict(set)
        self._task: asyncio.Task | None = None

    def subscribe(self, job_id: str) -> asyncio.Queue:
        queue: asyncio.Queue[JobEvent] = asyncio.Queue()
        self._subscribers[job_id].add(queue)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._tail())
        return queue

    def unsubscribe(self, job_id: str, queue: asyncio.Queue) -> None:
        queues = self._subscribers.get(job_id)
        if queues is not None:
            queues.discard(queue)
            if not queues:
                del self._subscribers[job_id]

    async def _tail(self) -> None:
        cursor = await asyncio.to_thread(self._store.tail_cursor)
        while self._subscribers:
            try:
                events, cursor = await asyncio.to_thread(self._store.tail, cursor, TAIL_WAIT_S)
            except Exception:  # noqa: BLE001 - streams fall back on their own reads
                logger.exception("tailing job events failed")
                await asyncio.sleep(TAIL_WAIT_S)  # a period: do not spin on a failing store
                continue
            for event in events:
                for queue in self._subscribers.get(event.job_id, ()):
                    queue.put_nowait(event)
