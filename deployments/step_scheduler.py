"""Step-level batching for the denoiser (`denoiser.batching.mode: step`, the default).

Requests join and leave a running batch at step boundaries instead of waiting for a whole batch to
end: every call to the worker group (`WorkerGroup.rows_step`) forwards every running row once, each
row at its own step with its own step count and guidance (`Denoising.forward_rows`), so a request
never waits for a batch of another key, only for the current step.

Between two calls the scheduler, and only it, decides (the ranks never do):
  - stop: running or waiting requests whose stop flag is set (a DELETE anywhere, an ended job, a
    caller that went away: `StageProgress.stopped`) leave; running ones are dropped on the ranks
    with the next call (a call that only drops, when nothing is left to compute), and their
    callers get `Cancelled(id, "denoiser", steps done)`;
  - plan: every request here (running, paused or waiting) with steps left to send, in order of
    priority, then arrival. The first one's size (height, width) is the call's; the call takes, in
    that order, every request of that size while they fit `max_rows` transformer rows (a request
    with classifier-free guidance counts twice). A request of that size that does not fit stops the
    plan (no starvation of big requests); requests of other sizes wait until the first request is
    of their size, that is until the requests before them have sent their last step (no
    starvation of other sizes). Waiting requests taken join; running requests left out are paused:
    their rows stay on the ranks, latents and scheduler state and all, and resume where they
    stopped when they are taken again, with the image they would have had (each row has its own
    scheduler and generator);
  - refuse: a request whose deadline cannot be met (now + its remaining steps x the recent time
    of a call) is answered `DeadlineExceeded` before it joins, instead of running late.
After each call it reports a `step` event per forwarded request (its own step and step count, and
`rows`: how many rows the forward had), `stage` started/finished events as requests join and end,
the step's metrics, and hands finished requests their latents.

Two calls are in flight, as in the request mode: while the ranks compute one, the scheduler
reports the one before and sends the next, planned from what it knew then. So the ranks never wait
for a round trip. A stop or a pause takes effect one call later: a stopped request has at most the
two calls in flight computed after it, and a paused one gets at most one more step first.

Failures: a broken worker group answers every request `Unavailable` (retryable) and retires the
replica (`on_broken`). A call out of memory clears the rows on every rank; a request that was alone
in it fails with `InsufficientMemory` (a 400 naming `size`), otherwise the running requests start
again from their first step in calls of at most half the rows, until they drain. Any other
failure of a call answers the running requests `StageFailure`, clears the rows on every rank, and
the loop goes on with the waiting ones.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Optional

from deployments import events
from deployments.denoise_loop import STAGE, DenoiseItem, preview_steps, stack_inputs
from deployments.errors import DeadlineExceeded, StageFailure, Unavailable
from deployments.oom import insufficient_memory, is_oom
from deployments.payloads import Cancelled, Latents, Rejected, StageTrace
from deployments.progress import StageProgress
from deployments.runtime import logger
from deployments.sp_group import WorkerGroupBroken


@dataclass(eq=False)
class _Entry:
    item: DenoiseItem
    future: asyncio.Future
    seq: int = 0  # arrival order
    steps_done: int = 0  # steps reported
    planned: int = 0  # calls sent that compute it (at most `steps`)
    joined: float = 0.0  # perf_counter when it joined the running rows
    max_rows: int = 0  # the largest forward it shared (its trace's batch size)
    trace: Optional[StageTrace] = None

    @property
    def id(self) -> str:
        return self.item.spec.request_id

    @property
    def n(self) -> int:
        return self.item.spec.n

    @property
    def size(self) -> tuple[int, int]:
        return self.item.spec.sampling.size_key

    @property
    def rows(self) -> int:
        """Transformer rows per call: each image twice with classifier-free guidance."""
        return self.n * (2 if self.item.embeddings.negative_prompt_embeds is not None else 1)

    @property
    def order(self) -> tuple[int, int]:
        return (-self.item.spec.priority, self.seq)

    @property
    def steps(self) -> int:
        return self.item.spec.sampling.num_inference_steps

    @cached_property
    def previews(self) -> dict[int, int]:
        """{step after which image 0 is previewed: preview index}, as the request mode makes them."""
        if not self.item.reports:
            return {}
        return preview_steps(self.steps, self.item.spec.partial_images)

    @property
    def steps_left(self) -> int:
        return self.steps - self.steps_done


@dataclass
class StepScheduler:
    group: Any  # a WorkerGroup
    progress: StageProgress
    max_rows: int
    on_broken: Callable[[str], None] = lambda reason: None
    _waiting: deque = field(default_factory=deque)
    _running: dict = field(default_factory=dict)  # request id -> _Entry with rows on the ranks
    _paused: set = field(default_factory=set)  # ids of running requests the last call left out
    _task: Optional[asyncio.Task] = None
    _arrivals: int = 0
    _call_s: Optional[float] = None  # recent time of one call (moving average): deadline estimates
    _limit: Optional[int] = None  # rows a call may hold after an out of memory (None: max_rows)
    _drops: list = field(default_factory=list)  # ids of stopped rows still on the ranks: next call

    async def submit(self, item: DenoiseItem):
        """The request's latents (CPU, its rows), or `Cancelled`, or the error value (`Unavailable`,
        `StageFailure`) the request mode gives; errors are returned, not raised."""
        return (await self.submit_traced(item))[0]

    async def submit_traced(self, item: DenoiseItem) -> tuple[Any, Optional[StageTrace]]:
        self._arrivals += 1
        entry = _Entry(item, asyncio.get_running_loop().create_future(), seq=self._arrivals)
        late = self._late(entry)
        if late is not None:
            return late, None
        self._waiting.append(entry)
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._loop())
        try:
            outcome = await asyncio.shield(entry.future)
        except asyncio.CancelledError:
            # The caller went away (Serve cancelled its call): it leaves at the next boundary.
            self.progress.stop_locally(entry.id)
            raise
        await self.progress.flush()  # its events reach the log before its result goes on
        return outcome, entry.trace

    async def denoise(self, item: DenoiseItem):
        """`submit` as the Denoiser answers: `Latents` (trace as the request mode builds it), or
        the `Cancelled` / error value."""
        outcome, trace = await self.submit_traced(item)
        if isinstance(outcome, (Cancelled, Rejected, BaseException)):
            return outcome
        return Latents(spec=item.spec, latents=outcome, trace=item.embeddings.trace + (trace,))

    # -- the loop -------------------------------------------------------------------------------
    async def _loop(self) -> None:
        in_flight: deque = deque()  # calls sent and not yet reported, oldest first
        while self._waiting or self._running or in_flight:
            try:
                if len(in_flight) < 2 and self._sendable():
                    sent = await self._send()
                    if sent is not None:
                        in_flight.append(sent)
                        continue
                if in_flight:
                    await self._receive(in_flight)
            except Exception:  # noqa: BLE001 - never leave a caller waiting forever
                logger.exception("denoiser step scheduler failed")
                await _settle(in_flight)
                for entry in self._everyone():
                    self._end(entry, StageFailure(STAGE, entry.id))

    def _sendable(self) -> bool:
        """Whether a call would compute anything: a waiting request, or a running one with steps
        not yet sent."""
        return bool(self._waiting) or any(e.planned < e.steps for e in self._running.values())

    async def _send(self):
        """Stops, admissions, then one call sent to the ranks: (its awaitable, the requests it
        computes), or None."""
        await self.progress.flush()  # steps reported so far reach the log before flags are read
        stopped = await self.progress.stopped([e.id for e in self._everyone()])
        # Their rows leave the ranks with the next call (or they would be forwarded again): with
        # this one, or, if it is not sent (the group broke), with the first one that is.
        for rid in [rid for rid in self._running if rid in stopped]:
            entry = self._running.pop(rid)
            self._drops.append(rid)
            self._end(entry, Cancelled(rid, STAGE, entry.steps_done))
        for entry in [e for e in self._waiting if e.id in stopped]:
            self._waiting.remove(entry)
            self._end(entry, Cancelled(entry.id, STAGE, 0))
        joins, paused = self._plan()
        computed = [e for e in self._running.values() if e.id not in paused and e.planned < e.steps]
        if not computed and not self._drops:
            return None
        # With nothing to compute (the last running requests stopped), the call only drops rows:
        # the ranks then keep none of a request that has ended.
        previews = {}  # request id -> (the step this call takes it to, preview index)
        for entry in computed:
            entry.planned += 1
            index = entry.previews.get(entry.planned)
            if index is not None:
                previews[entry.id] = (entry.planned, index)
        joined = [(e.id, stack_inputs([e.item])) for e in joins]
        try:
            call = self.group.rows_step(joined, self._drops, paused, list(previews))
        except WorkerGroupBroken as exc:
            self._broken(exc)
            return None
        self._drops = []
        return call, computed, previews

    async def _receive(self, in_flight: deque) -> None:
        """The oldest call's report; a failed call fails the requests it had (out of memory: they
        start again in smaller calls)."""
        call, computed, previews = in_flight.popleft()
        try:
            report = await call
        except WorkerGroupBroken as exc:
            await _settle(in_flight)
            self._broken(exc)
            return
        except Exception as exc:
            await _settle(in_flight)  # the calls sent after it: their rows go too
            oom = is_oom(exc)
            if oom:
                self._out_of_memory(exc, computed)
            else:
                logger.exception("denoiser step failed; requests %s", list(self._running))
                for entry in list(self._running.values()):
                    self._end(entry, StageFailure(STAGE, entry.id))
            try:
                await self.group.rows_reset()  # every rank starts clean; the waiting go on
            except WorkerGroupBroken as exc:
                self._broken(exc)
            return
        self._reported(report, previews)

    def _out_of_memory(self, exc: BaseException, computed: list) -> None:
        """A call ran out of memory (the ranks dropped every row): a request that was alone in it
        fails with a 400 naming `size`; otherwise every running request starts again from its first
        step (same seeds, same image) in calls of at most half as many rows, until the running
        rows drain."""
        rows = sum(e.rows for e in computed)
        reason = str(getattr(exc, "cause", None) or exc).splitlines()[0]
        if len(computed) == 1:
            entry = computed[0]
            logger.warning("denoiser: request %s ran out of memory alone (%s): rejected", entry.id, reason)
            width, height = entry.item.spec.sampling.width, entry.item.spec.sampling.height
            self._end(entry, Rejected(entry.id, insufficient_memory(STAGE, width, height)))
        else:
            self._limit = max(1, rows // 2)
            logger.warning(
                "denoiser: a call of %d rows ran out of memory (%s); requests %s start again in calls"
                " of at most %d rows",
                rows,
                reason,
                [e.id for e in computed],
                self._limit,
            )
        restarted = sorted(self._running.values(), key=lambda e: e.seq)
        self._running.clear()
        self._paused.clear()
        for entry in reversed(restarted):
            entry.steps_done = entry.planned = 0
            self._waiting.appendleft(entry)

    def _broken(self, exc: WorkerGroupBroken) -> None:
        """The group is gone for good: every request here gets a retryable 503."""
        logger.error("denoiser worker group broken (%s); requests %s", exc, [e.id for e in self._everyone()])
        self.on_broken(str(exc))
        for entry in self._everyone():
            self._end(entry, Unavailable("the denoiser is restarting; retry the request"))

    def _plan(self) -> tuple[list[_Entry], list[str]]:
        """This call's joins and the running requests it leaves out (paused): see the module
        docstring. Waiting requests whose deadline can no longer be met are refused first."""
        for entry in list(self._waiting):
            late = self._late(entry)
            if late is not None:
                self._end(entry, late)
        budget = self.max_rows if self._limit is None else min(self.max_rows, self._limit)
        chosen, rows, size = [], 0, None
        unsent = [e for e in self._everyone() if e.planned < e.steps]
        for entry in sorted(unsent, key=lambda e: e.order):
            size = entry.size if size is None else size
            if entry.size != size:
                continue
            if rows and rows + entry.rows > budget:
                break
            chosen.append(entry)
            rows += entry.rows
        joins = [e for e in chosen if e.id not in self._running]
        started = time.time()
        for entry in joins:
            self._waiting.remove(entry)
            entry.joined = time.perf_counter()
            self._running[entry.id] = entry
            if entry.item.reports:
                self.progress.metrics.waited(entry.item.embeddings.ready_at, started)
        self.progress.emit([events.stage_started(e.id, STAGE, rows) for e in joins])
        chosen_ids = {e.id for e in chosen}
        paused = [e.id for e in unsent if e.id in self._running and e.id not in chosen_ids]
        for rid in set(paused) ^ self._paused:
            logger.info("denoiser: request %s %s", rid, "paused" if rid in paused else "resumed")
        self._paused = set(paused)
        return joins, paused

    def _late(self, entry: _Entry):
        """`Rejected` with `DeadlineExceeded` if the request cannot end by its deadline, else None."""
        deadline_at = entry.item.spec.deadline_at
        if deadline_at is None or self._call_s is None:
            return None
        left, needed = deadline_at - time.time(), entry.steps_left * self._call_s
        if needed <= left:
            return None
        return Rejected(
            entry.id,
            DeadlineExceeded(
                f"request {entry.id} cannot finish within its deadline: its {entry.steps_left}"
                f" steps need about {needed:.1f} s at the denoiser's current pace, and"
                f" {max(left, 0.0):.1f} s are left",
                "deadline_s",
            ),
        )

    def _reported(self, report, previews: dict) -> None:
        if report.rows:
            self.progress.metrics.step(report.rows, report.seconds)
            previous = report.seconds if self._call_s is None else self._call_s
            self._call_s = 0.8 * previous + 0.2 * report.seconds
        step_events = []
        for rid, step in report.steps.items():
            entry = self._running.get(rid)
            if entry is None:  # it ended (stopped) while this call ran
                continue
            entry.steps_done, entry.max_rows = step, max(entry.max_rows, report.rows)
            if entry.item.reports:
                steps = entry.item.spec.sampling.num_inference_steps
                step_events.append(events.step_done(rid, step, steps, report.seconds, rows=report.rows))
        self.progress.emit(step_events)
        self.progress.emit(
            [
                events.preview(rid, previews[rid][0], previews[rid][1], png, width, height)
                for rid, (png, width, height) in report.previews.items()
                if rid in self._running and rid in previews
            ]
        )
        for rid, latents in report.finished.items():
            entry = self._running.pop(rid, None)
            if entry is None:
                continue
            entry.trace = StageTrace(STAGE, entry.max_rows, time.perf_counter() - entry.joined)
            self.progress.emit([events.stage_finished(rid, STAGE, entry.max_rows, entry.trace.seconds)])
            # The stage's batch metrics, one observation per request: the most rows it shared a
            # call with, and its time from joining to its last step.
            self.progress.metrics.batch(entry.max_rows, entry.trace.seconds)
            logger.info(
                "denoiser request=%s steps=%d size=%dx%d rows<=%d %.3fs",
                rid,
                entry.steps,
                entry.item.spec.sampling.width,
                entry.item.spec.sampling.height,
                entry.max_rows,
                entry.trace.seconds,
            )
            self._end(entry, latents)
        if not self._running:
            self._limit = None  # the rows of an out of memory have drained: full calls again

    def _everyone(self) -> list[_Entry]:
        return [*self._running.values(), *self._waiting]

    def _end(self, entry: _Entry, outcome) -> None:
        self._running.pop(entry.id, None)
        self._paused.discard(entry.id)
        if entry in self._waiting:
            self._waiting.remove(entry)
        self.progress.forget([entry.id])
        if not entry.future.done():
            entry.future.set_result(outcome)


async def _settle(in_flight: deque) -> None:
    """Wait out the calls still in flight, whatever they return (their requests are answered by
    the caller)."""
    while in_flight:
        try:
            await in_flight.popleft()[0]
        except Exception:  # noqa: BLE001
            pass
