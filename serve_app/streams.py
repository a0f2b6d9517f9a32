"""Following a job's event log: its history from the store, then live events from the hub, in
seq order, without gaps or repeats, ending with its terminal event."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from deployments.events import TERMINAL_EVENTS
from deployments.job_store.base import JobEvent, JobStore
from serve_app.event_hub import EventHub

# With no event for this long, look at the store again (a missed wake-up, a deleted job).
IDLE_CHECK_S = 5.0


async def follow(store: JobStore, hub: EventHub, job_id: str, after_seq: int = 0) -> AsyncIterator[JobEvent]:
    queue = hub.subscribe(job_id)
    last = after_seq
    try:
        while True:
            history = await asyncio.to_thread(store.events, job_id, last)
            for event in history:
                yield event
                last = event.seq
                if event.type in TERMINAL_EVENTS:
                    return
            if not history:
                record = await asyncio.to_thread(store.get, job_id)
                if record is None or record.terminal:
                    return  # deleted, or over with nothing after `after_seq`
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), IDLE_CHECK_S)
                except asyncio.TimeoutError:
                    break  # read the store again
                if event.seq <= last:
                    continue
                if event.seq != last + 1:
                    break  # a gap: the store has what fell between
                yield event
                last = event.seq
                if event.type in TERMINAL_EVENTS:
                    return
    finally:
        hub.unsubscribe(job_id, queue)
