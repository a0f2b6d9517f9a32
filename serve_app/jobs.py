"""The life of a request, over the job store (the state machine is in docs/request-lifecycle.md).

Every request gets a record. An async job is created `queued` and run by whichever ingress claims
it; a synchronous or streamed request is created `running`, leased to the ingress holding its
connection, and run at once in a task of its own (shielded from the connection, so a client that
goes away cancels the request instead of abandoning it half-way). An attempt runs the pipeline
once; a stage dying under it is retried (an async job goes back to the queue, where any ingress may
take it; an attached one is retried in place), up to `jobs.max_attempts`. Every attempt ends in
exactly one `finish`: succeeded, failed or cancelled, with its event.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass, replace
from typing import Optional

from deployments.errors import (
    ApiError,
    DeadlineExceeded,
    InvalidParameter,
    NotFound,
    TooManyRequests,
    Unavailable,
)
from deployments.events import cancelled as cancelled_event
from deployments.job_store.base import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    AdmissionRejected,
    JobRecord,
    JobStore,
    NewEvent,
)
from deployments.payloads import Cancelled, EncodedImages, Rejected
from serve_app.admission import AdmissionControl, request_cost
from serve_app.auth import Tenant
from serve_app.config import AppConfig
from serve_app.errors import classify, internal_error_object
from serve_app.image_store import ImageStore
from serve_app.metrics import ApiMetrics
from serve_app.pipeline import Pipeline
from serve_app.planning import Planner
from serve_app.protocol import ImageGenerationRequest

logger = logging.getLogger("dit_serve")

JOB_ID_RE = re.compile(r"^job_[0-9a-f]{24}$")
IMAGE_SWEEP_INTERVAL_S = 300.0  # a scan of the image store for expired images
IMAGE_GRACE_S = 5.0


def new_job_id() -> str:
    return "job_" + secrets.token_hex(12)


def check_job_id(job_id: str, param: str = "job_id") -> str:
    if not JOB_ID_RE.match(job_id):
        raise InvalidParameter(
            f"{param} must be a job id: job_ followed by 24 lowercase hex characters", param
        )
    return job_id


def request_hash(req: ImageGenerationRequest) -> str:
    """Of the request as the client sent it (before a random seed is fixed): what an idempotency
    key is bound to."""
    body = json.dumps(req.model_dump(exclude_none=True), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


@dataclass(frozen=True)
class Outcome:
    """How one attempt ended."""

    status: str  # succeeded | failed | cancelled | retry
    images: Optional[EncodedImages] = None
    seeds: tuple[int, ...] = ()  # succeeded: the seed of each image, from the plan
    exception: Optional[BaseException] = None  # failed / retry: what the client is told
    cancelled: Optional[Cancelled] = None


class Jobs:
    def __init__(
        self,
        config: AppConfig,
        store: JobStore,
        pipeline: Pipeline,
        images: ImageStore,
        worker: str,
        metrics: Optional[ApiMetrics] = None,
    ):
        self.config = config
        self.metrics = metrics if metrics is not None else ApiMetrics()
        self.settings = config.jobs
        self.store = store
        self.pipeline = pipeline
        self.images = images
        self.worker = worker
        self.planner = Planner(config)
        self.admission = AdmissionControl(config)
        self.running: dict[str, asyncio.Task] = {}  # job id -> the task running it here
        self._expired: set[str] = set()  # jobs this ingress stopped at their deadline
        self._background: set[asyncio.Task] = set()
        self._next_image_sweep = 0.0

    async def call(self, fn, *args, **kwargs):
        """A store call, off the event loop."""
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def log(self, job_id: str, kind: str, data: dict) -> None:
        """Append one event to a job's log."""
        await self.call(self.store.append_events, [NewEvent(job_id, kind, data)])

    # -- accepting ------------------------------------------------------------------------------
    def _record(self, req, kind, tenant: Tenant, request_id, **fields) -> JobRecord:
        accepted, spec = self.planner.accept(req)  # the client's 4xx before anything is stored
        deadline_s = self.admission.deadline_s(req.deadline_s)
        stored = {"body": accepted.model_dump(exclude_none=True), "request_id": request_id}
        if deadline_s is not None:  # counted from the record's created_at
            stored["deadline_s"] = deadline_s
        return JobRecord(
            id=new_job_id(),
            kind=kind,
            owner=tenant.name,
            request=stored,
            priority=req.priority or 0,
            cost=request_cost(spec.sampling),
            **fields,
        )

    async def _create(self, record: JobRecord, tenant: Tenant) -> tuple[JobRecord, bool]:
        """Store a new record if admission lets it in (per-key rate, then the store's atomic
        budget check); a 429 naming the limit if not."""
        rate = self.admission.rate_limit(tenant)
        if rate is not None:
            allowed, retry_after = await self.call(self.store.rate_hit, f"rpm:{tenant.name}", 60.0, rate)
            if not allowed:
                self.metrics.rejected("rate")
                raise self.admission.rate_refused(tenant, retry_after)
        try:
            return await self.call(self.store.create, record, admit=self.admission.limits(tenant))
        except AdmissionRejected as rejected:
            logger.info("request %s refused (%s)", record.request.get("request_id"), rejected.reason)
            self.metrics.rejected(rejected.reason)
            raise self.admission.refused(rejected, record.cost, tenant) from None

    async def submit(
        self,
        req: ImageGenerationRequest,
        tenant: Tenant,
        request_id: str,
        idempotency_key: Optional[str] = None,
    ) -> tuple[JobRecord, bool, Optional[int]]:
        """Queue an async job; (record, created, queue position). A retried POST with the same
        idempotency key gets the first job back (created False). Its place in the queue: its
        arrival, moved ahead by `priority_boost_s` per priority level."""
        record = self._record(
            req,
            "job",
            tenant,
            request_id,
            idempotency_key=idempotency_key,
            request_hash=request_hash(req) if idempotency_key else None,
            rank=time.time() - (req.priority or 0) * self.config.admission.priority_boost_s,
        )
        record, created = await self._create(record, tenant)
        position = await self.call(self.store.queue_position, record.id)
        if created:
            await self.log(record.id, "queued", {"position": position})
            logger.info("request %s queued job %s", request_id, record.id)
        return record, created, position

    async def start_attached(
        self, req: ImageGenerationRequest, kind: str, tenant: Tenant, request_id: str
    ) -> tuple[JobRecord, asyncio.Task]:
        """Create a sync/stream record leased to this ingress and start running it; the task gives
        (final record, images or None, outcome)."""
        now = time.time()
        record = self._record(
            req,
            kind,
            tenant,
            request_id,
            status=RUNNING,
            attempts=1,
            lease_owner=self.worker,
            lease_expires=now + self.settings.lease_s,
            started_at=now,
        )
        record, _ = await self._create(record, tenant)
        logger.info("request %s runs as %s %s", request_id, kind, record.id)
        return record, self._spawn(record.id, self._run_attached(record))

    def _spawn(self, job_id: str, coro) -> asyncio.Task:
        """Run `coro` as a task of its own, in a fresh context: Serve treats calls made in an HTTP
        request's context as that request's children and cancels them when the client goes away,
        but an attempt belongs to the job; its cancellation goes through the store's flag."""
        task = contextvars.Context().run(asyncio.get_running_loop().create_task, coro)
        self.running[job_id] = task
        task.add_done_callback(lambda done: self._ended(job_id, done))
        return task

    def _ended(self, job_id: str, task: asyncio.Task) -> None:
        self.running.pop(job_id, None)
        if not task.cancelled() and task.exception() is not None:
            # The store failed under it: its lease lapses and recovery ends or re-runs it.
            logger.error("job %s: its run failed", job_id, exc_info=task.exception())

    # -- running --------------------------------------------------------------------------------
    async def _run_attached(self, record: JobRecord):
        attempt = 1
        while True:
            outcome = await self._attempt(record, attempt)
            if outcome.status != "retry" or attempt >= self.settings.max_attempts:
                break
            if record.id in await self.call(self.store.cancel_requested, [record.id]):
                outcome = Outcome("cancelled", cancelled=Cancelled(record.id, "ingress"))
                break
            delay = self._backoff(attempt)
            await self.call(self.store.append_events, [self._retry_event(record, attempt, outcome, delay)])
            await asyncio.sleep(delay)  # the retry policy's wait, not a stand-in for a signal
            attempt += 1
        final = await self._finish(record, outcome, attempt)
        return final, outcome.images, outcome

    def run_claimed(self, record: JobRecord) -> asyncio.Task:
        """Run a job this ingress claimed: one attempt; a retry goes back to the queue."""
        return self._spawn(record.id, self._run_claimed(record))

    async def _run_claimed(self, record: JobRecord) -> None:
        outcome = await self._attempt(record, record.attempts)
        if outcome.status == "retry" and record.attempts < self.settings.max_attempts:
            delay = self._backoff(record.attempts)
            event = self._retry_event(record, record.attempts, outcome, delay)
            if await self.call(self.store.requeue, record.id, self.worker, delay_s=delay, event=event):
                return
        await self._finish(record, outcome, record.attempts)

    def _backoff(self, attempt: int) -> float:
        return self.settings.retry_backoff_s * 2 ** (attempt - 1)

    @staticmethod
    def _retry_event(record, attempt: int, outcome: Outcome, delay: float) -> NewEvent:
        reason = getattr(outcome.exception, "message", None) or type(outcome.exception).__name__
        return NewEvent(record.id, "retry", {"attempt": attempt, "reason": reason, "delay_s": delay})

    async def _attempt(self, record: JobRecord, attempt: int) -> Outcome:
        req = ImageGenerationRequest.model_validate(record.request["body"])
        encode_request, spec = self.planner.plan(req, record.id)
        deadline_s = record.request.get("deadline_s")
        deadline_at = None if deadline_s is None else record.created_at + deadline_s
        spec = replace(spec, priority=record.priority, deadline_at=deadline_at)
        if deadline_at is not None and time.time() >= deadline_at:
            return Outcome("failed", exception=self._deadline_error(record))
        await self.log(record.id, "dispatched", {"attempt": attempt})
        watchdog = None
        if deadline_at is not None:
            delay = max(deadline_at - time.time(), 0.0)
            watchdog = asyncio.get_running_loop().call_later(delay, self._expire, record.id)
        try:
            encode_request = replace(encode_request, ready_at=time.time())  # its queue wait starts
            out = await self.pipeline.run(encode_request, spec)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an outcome
            error = classify(exc)
            if record.id in self._expired:
                return Outcome("failed", exception=self._deadline_error(record))
            if isinstance(error, (Unavailable, TooManyRequests)):
                logger.warning("job %s attempt %d: %s", record.id, attempt, error.message)
                return Outcome("retry", exception=error)
            if not isinstance(error, ApiError):
                logger.error(
                    "job %s (request %s) failed", record.id, record.request.get("request_id"), exc_info=exc
                )
            return Outcome("failed", exception=error)
        finally:
            if watchdog is not None:
                watchdog.cancel()
        if isinstance(out, Rejected):
            return Outcome("failed", exception=out.error)
        if isinstance(out, Cancelled):
            if record.id in self._expired:
                return Outcome("failed", exception=self._deadline_error(record))
            return Outcome("cancelled", cancelled=out)
        return Outcome("succeeded", images=out, seeds=spec.sampling.seeds)

    @staticmethod
    def _deadline_error(record: JobRecord) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"request {record.id} did not finish within its deadline of"
            f" {record.request.get('deadline_s', 0):g} s",
            "deadline_s",
        )

    def _expire(self, job_id: str) -> None:
        """A running request's deadline passed: stop its work through the store's cancel flag
        (every stage checks it) and end it as deadline_exceeded."""
        self._expired.add(job_id)
        self.cancel_soon(job_id, None, "its deadline passed")

    def cancel_soon(self, job_id: str, owner: Optional[str], reason: str) -> None:
        """Record a cancel in a task of its own (from a deadline timer, or a connection being
        torn down, neither of which can wait for the store)."""
        task = asyncio.get_running_loop().create_task(self.cancel(job_id, owner, reason))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _finish(self, record: JobRecord, outcome: Outcome, attempts: int) -> JobRecord:
        result = error = None
        if outcome.status == "succeeded":
            status, result = SUCCEEDED, await self._keep(record, outcome.images, outcome.seeds)
            event = NewEvent(record.id, "completed", result)
        elif outcome.status == "cancelled":
            stop = outcome.cancelled
            status = CANCELLED
            event = cancelled_event(record.id, "cancelled", stop.stage, stop.steps_done)
        else:
            status, error = FAILED, self._error_object(record, outcome, attempts)
            event = NewEvent(record.id, "failed", {"error": error})
        final = await self.call(
            self.store.finish,
            record.id,
            self.worker,
            status,
            retention_s=self.settings.retention_s,
            result=result,
            error=error,
            event=event,
        )
        if final is None:  # the lease was lost (this ingress was presumed dead): not ours to end
            logger.warning("job %s: lease lost before it ended %s here", record.id, status)
            if result:
                await asyncio.to_thread(self._delete_images, result)
            return await self.call(self.store.get, record.id) or record
        logger.info("job %s %s after %d attempt(s)", record.id, status, attempts)
        self.metrics.finished(status, record.kind)
        if status == SUCCEEDED:
            self.metrics.images(len(outcome.images.images), record.kind)
        elif status == CANCELLED:
            self.metrics.cancelled(outcome.cancelled.stage)
        self._expired.discard(record.id)
        if status == SUCCEEDED:
            self.admission.finished(record.cost)
        return final

    @staticmethod
    def _error_object(record: JobRecord, outcome: Outcome, attempts: int) -> dict:
        exc = outcome.exception
        if outcome.status == "retry":
            return {
                "message": f"gave up after {attempts} attempts: {exc.message}",
                "type": "server_error",
                "param": None,
                "code": "unavailable",
            }
        if isinstance(exc, ApiError):
            return exc.error_object()
        return internal_error_object(record.request.get("request_id", "unknown"))

    async def _keep(self, record: JobRecord, images: EncodedImages, seeds: tuple[int, ...]) -> dict:
        """The result to store. Images are written to the image store for async jobs (fetched
        later) and url responses; a synchronous b64 response carries them itself."""
        body = record.request["body"]
        url = body.get("response_format") == "url"
        keep = record.kind == "job" or url
        names = [None] * len(images.images)
        if keep:  # kept as long as the record (a URL expires with the retention), and a little
            # longer, so a record read just before it expires still finds its images
            expires_at = time.time() + self.settings.retention_s + IMAGE_GRACE_S
            names = [
                await asyncio.to_thread(
                    self.images.save, blob, images.output_format, record.owner, expires_at
                )
                for blob in images.images
            ]
        return {
            "created": int(time.time()),
            "response_format": "url" if url else "b64_json",
            "output_format": images.output_format,
            "size": f"{images.width}x{images.height}",
            "images": [{"seed": s, "name": n} for s, n in zip(seeds, names)],
        }

    def _delete_images(self, result: dict) -> None:
        for image in result.get("images", ()):
            if image.get("name"):
                self.images.delete(image["name"])

    # -- cancelling and reading -----------------------------------------------------------------
    async def cancel(self, job_id: str, owner: Optional[str], reason: str) -> JobRecord:
        """Cancel a job of `owner` (None: this service itself, at a deadline)."""
        record = await self.get(job_id, owner)
        was_queued = record.status == QUEUED
        record = await self.call(
            self.store.request_cancel, record.id, retention_s=self.settings.retention_s
        )
        if record is not None and record.status == RUNNING:
            await self.log(record.id, "cancel_requested", {"reason": reason})
        elif record is not None and was_queued and record.status == CANCELLED:
            self.metrics.cancelled("queue")  # ended by the store at once; no attempt to finish
        return record

    async def get(self, job_id: str, owner: Optional[str]) -> JobRecord:
        record = await self.call(self.store.get, check_job_id(job_id))
        if record is None or (owner is not None and record.owner != owner):
            raise NotFound(f"no job {job_id!r}", "job_id")
        return record

    # -- maintenance ----------------------------------------------------------------------------
    async def maintain(self) -> None:
        """Renew the leases of what runs here; recover what other (dead) ingresses left; delete
        what expired; refresh the jobs-by-state gauge."""
        renewing = dict(self.running)  # jobs started while the call runs are not judged by it
        held = await self.call(self.store.renew, self.worker, list(renewing), self.settings.lease_s)
        for job_id, task in renewing.items():
            if job_id not in held and not task.done():
                logger.warning("job %s: lease lost; stopping it here", job_id)
                task.cancel()
        for recovered in await self.call(
            self.store.recover,
            max_attempts=self.settings.max_attempts,
            retention_s=self.settings.retention_s,
        ):
            logger.warning("job %s recovered -> %s (%s)", recovered.job_id, recovered.status, recovered.reason)
        for record in await self.call(self.store.sweep):
            if record.result:
                await asyncio.to_thread(self._delete_images, record.result)
        if time.monotonic() >= self._next_image_sweep:  # images no record names any more
            self._next_image_sweep = time.monotonic() + IMAGE_SWEEP_INTERVAL_S
            await asyncio.to_thread(self.images.sweep, time.time())
        self.metrics.jobs_by_state(await self.call(self.store.counts_by_status))
