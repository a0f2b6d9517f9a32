"""Job records and event logs outside any replica's memory (see `base.py`), and the factory that
opens the configured backend."""

from __future__ import annotations

from typing import Callable, Optional
import time

from deployments.job_store.base import JobStore


def open_job_store(
    backend: str,
    *,
    path: Optional[str] = None,
    url: Optional[str] = None,
    prefix: str = "dit-serve",
    clock: Callable[[], float] = time.time,
) -> JobStore:
    """`sqlite` (a file at `path`, created with its folder, private to this user) or `redis`
    (a server at `url`, keys under `prefix`)."""
    if backend == "sqlite":
        from deployments.job_store.sqlite import SqliteJobStore

        if not path:
            raise ValueError("the sqlite job store needs a path")
        return SqliteJobStore(path, clock=clock)
    if backend == "redis":
        from deployments.job_store.redis import RedisJobStore

        if not url:
            raise ValueError("the redis job store needs a url")
        return RedisJobStore(url, prefix=prefix, clock=clock)
    raise ValueError(f"unknown job store backend {backend!r}; known: sqlite, redis")
