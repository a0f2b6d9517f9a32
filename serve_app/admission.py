"""Admission: what a request costs, whether the service takes it, and when to come back if not.

The rule itself is enforced by the job store, atomically with the creation of the request's record
(`JobStore.create(admit=...)`): the pending work of every ingress replica is in the store, so two
replicas can never both take the last place. This module computes the inputs (the request's cost,
the tenant's limits), checks per-key request rates (also in the store, so they hold across
replicas), and turns a refusal into 429 + a Retry-After estimated from the work ahead and the
throughput this replica has measured over the last minute.
"""

from __future__ import annotations

import collections
import math
import time
from typing import Callable, Optional

from deployments.errors import InvalidParameter, RateLimited, TooManyRequests
from deployments.job_store.base import Admission, AdmissionRejected
from deployments.sampling import SamplingParams
from serve_app.auth import Tenant
from serve_app.config import AppConfig

THROUGHPUT_WINDOW_S = 60.0


def request_cost(sampling: SamplingParams) -> float:
    """Images x steps x megapixels: what a request asks of the denoiser, the dominant stage."""
    pixels = sampling.width * sampling.height / 1e6
    return len(sampling.seeds) * sampling.num_inference_steps * pixels


class AdmissionControl:
    def __init__(self, config: AppConfig, clock: Callable[[], float] = time.monotonic):
        self.settings = config.admission
        self.clock = clock
        self._started = clock()
        self._finished: collections.deque[tuple[float, float]] = collections.deque()  # (time, cost)

    def limits(self, tenant: Tenant) -> Admission:
        """The store's admission rule for a request of this tenant."""
        s = self.settings
        max_active = tenant.max_active or s.max_active_per_key
        return Admission(
            max_pending_cost=s.max_pending_cost, max_pending=s.max_pending, owner_max_active=max_active
        )

    def rate_limit(self, tenant: Tenant) -> Optional[int]:
        return tenant.requests_per_minute or self.settings.requests_per_minute

    def rate_refused(self, tenant: Tenant, retry_after_s: float) -> RateLimited:
        return RateLimited(
            f"API key {tenant.name!r} is over its limit of {self.rate_limit(tenant)} requests a"
            " minute; retry later",
            retry_after_s=min(retry_after_s, self.settings.max_retry_after_s),
        )

    def refused(self, rejected: AdmissionRejected, cost: float, tenant: Tenant) -> TooManyRequests:
        """The 429 for a request the store did not admit."""
        s = self.settings
        if rejected.reason == "owner_active":
            limit = self.limits(tenant).owner_max_active
            return RateLimited(
                f"API key {tenant.name!r} already has {limit} unfinished requests, its limit;"
                " retry when one finishes",
                retry_after_s=self.retry_after(cost),
            )
        if rejected.reason == "count":
            excess = rejected.pending_cost / max(rejected.pending, 1)  # about one request's work
        else:
            excess = rejected.pending_cost + cost - s.max_pending_cost
        return TooManyRequests(
            f"the service is at capacity ({rejected.pending} requests, {rejected.pending_cost:.1f}"
            f" cost units pending); retry later",
            retry_after_s=self.retry_after(excess),
        )

    def retry_after(self, work: float) -> float:
        """Seconds until `work` cost units have drained, at the measured throughput."""
        seconds = max(work, 0.0) / self.throughput()
        return min(max(1.0, math.ceil(seconds)), float(self.settings.max_retry_after_s))

    def finished(self, cost: float) -> None:
        """A request finished here: count its work towards the measured throughput."""
        now = self.clock()
        self._finished.append((now, cost))
        self._trim(now)

    def throughput(self) -> float:
        """Cost units finished per second over the last minute (this replica's view), or the
        configured hint before anything has finished."""
        now = self.clock()
        self._trim(now)
        if not self._finished:
            return self.settings.throughput_hint
        span = min(THROUGHPUT_WINDOW_S, max(now - self._started, 1.0))
        return max(sum(cost for _, cost in self._finished) / span, 1e-6)

    def _trim(self, now: float) -> None:
        while self._finished and now - self._finished[0][0] > THROUGHPUT_WINDOW_S:
            self._finished.popleft()

    def deadline_s(self, requested: Optional[float]) -> Optional[float]:
        """The deadline a request runs under; a 400 names `deadline_s` when it asks too much."""
        if requested is None:
            return self.settings.default_deadline_s
        if requested > self.settings.max_deadline_s:
            raise InvalidParameter(
                f"deadline_s must be at most {self.settings.max_deadline_s:g}", "deadline_s"
            )
        return requested
