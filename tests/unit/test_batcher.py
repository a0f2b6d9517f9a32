"""The stages' batch queue (deployments/batcher.py): batches form from what queued while the stage
was busy, an idle stage waits only its window, order and size limits hold, callers that go away
are dropped, and a failing batch fails only its own callers."""

from __future__ import annotations

import asyncio

import pytest

from deployments.batcher import StageBatcher


class Stage:
    """A stage whose batches block until the test releases them, recording what each held."""

    def __init__(self):
        self.batches: list[list] = []
        self.release = asyncio.Event()
        self.started = asyncio.Event()

    async def run(self, items):
        self.batches.append(list(items))
        self.started.set()
        await self.release.wait()
        return [f"done:{i}" for i in items]


async def until(predicate, limit: int = 1000):
    """Yield to the loop until `predicate()` (bounded: fails instead of hanging)."""
    for _ in range(limit):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=20))


def test_an_item_at_an_idle_stage_runs_at_once_and_items_queued_meanwhile_form_the_next_batch():
    async def main():
        stage = Stage()
        batcher = StageBatcher(stage.run, max_batch_size=8, batch_wait_timeout_s=0.0)
        first = asyncio.ensure_future(batcher.submit("a"))
        await stage.started.wait()
        assert stage.batches == [["a"]]  # no window: it did not wait for company
        rest = [asyncio.ensure_future(batcher.submit(x)) for x in "bcde"]
        await until(lambda: batcher.queued() == 4)
        stage.release.set()
        assert await first == "done:a"
        assert await asyncio.gather(*rest) == ["done:b", "done:c", "done:d", "done:e"]
        assert stage.batches == [["a"], ["b", "c", "d", "e"]]

    run(main())


def test_batches_respect_max_size_by_weight_and_keep_arrival_order():
    async def main():
        stage = Stage()
        batcher = StageBatcher(stage.run, 4, 0.0, size_fn=lambda items: sum(n for _, n in items))
        blocker = asyncio.ensure_future(batcher.submit(("x", 1)))
        await stage.started.wait()
        waiting = [("a", 2), ("b", 1), ("c", 2), ("d", 1), ("e", 4)]
        futures = [asyncio.ensure_future(batcher.submit(w)) for w in waiting]
        await until(lambda: batcher.queued() == 5)
        stage.release.set()
        await asyncio.gather(blocker, *futures)
        # c does not fit after a+b (2+1+2 > 4), so it opens the next batch; d does not jump it.
        assert stage.batches == [[("x", 1)], [("a", 2), ("b", 1)], [("c", 2), ("d", 1)], [("e", 4)]]

    run(main())


def test_an_item_heavier_than_a_batch_is_refused():
    async def main():
        batcher = StageBatcher(Stage().run, 2, 0.0, size_fn=lambda items: 3 * len(items))
        with pytest.raises(ValueError, match="exceeds max_batch_size 2"):
            await batcher.submit("big")

    run(main())


def test_an_idle_stage_waits_its_window_only_until_a_full_batch_forms():
    async def main():
        stage = Stage()
        stage.release.set()
        # A window far longer than the test's timeout: only a full batch can close it.
        batcher = StageBatcher(stage.run, max_batch_size=3, batch_wait_timeout_s=3600.0)
        first = asyncio.ensure_future(batcher.submit(1))
        await until(lambda: batcher._task is not None)
        for _ in range(5):
            await asyncio.sleep(0)
        assert stage.batches == []  # waiting for company
        others = [asyncio.ensure_future(batcher.submit(i)) for i in (2, 3)]
        assert await asyncio.gather(first, *others) == ["done:1", "done:2", "done:3"]
        assert stage.batches == [[1, 2, 3]]

    run(main())


def test_a_window_that_expires_runs_what_it_has():
    async def main():
        stage = Stage()
        stage.release.set()
        batcher = StageBatcher(stage.run, max_batch_size=8, batch_wait_timeout_s=0.05)
        assert await batcher.submit("lonely") == "done:lonely"
        assert stage.batches == [["lonely"]]

    run(main())


def test_a_caller_that_goes_away_before_its_batch_is_dropped_and_the_others_run():
    async def main():
        stage = Stage()
        batcher = StageBatcher(stage.run, 8, 0.0)
        blocker = asyncio.ensure_future(batcher.submit("x"))
        await stage.started.wait()
        keep = asyncio.ensure_future(batcher.submit("keep"))
        gone = asyncio.ensure_future(batcher.submit("gone"))
        await until(lambda: batcher.queued() == 2)
        gone.cancel()
        await until(lambda: batcher.queued() == 1)
        stage.release.set()
        assert await keep == "done:keep"
        await blocker
        assert stage.batches == [["x"], ["keep"]]

    run(main())


def test_a_failing_batch_fails_its_callers_only_and_the_next_batch_runs():
    async def main():
        calls = []

        async def flaky(items):
            calls.append(list(items))
            if len(calls) == 1:
                raise RuntimeError("boom")
            return [i * 10 for i in items]

        batcher = StageBatcher(flaky, 8, 0.0)
        assert isinstance(await batcher.submit(1), RuntimeError)  # delivered as a value
        assert await batcher.submit(2) == 20

        async def short(items):
            return items[:-1]

        assert "1 items gave 0 results" in str(await StageBatcher(short, 8, 0.0).submit(7) or "")

    run(main())
