"""Background tasks end at shutdown even when one cancellation is swallowed."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from app.tasks import cancel_and_wait


async def swallows_one_cancel() -> None:
    # What asyncio.wait_for does on Python 3.11 when the cancellation arrives just as the
    # future it waits on completes (gh-86296): the task goes on.
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(60)
    await asyncio.sleep(60)


async def cancel_once(task: asyncio.Task[None]) -> None:
    # The shutdown code before app/tasks.py: one cancel, then wait.
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@pytest.mark.parametrize(("stop", "ends"), [(cancel_and_wait, True), (cancel_once, False)])
def test_a_task_that_swallows_a_cancellation_still_ends(stop: object, ends: bool) -> None:
    async def scenario() -> bool:
        task = asyncio.create_task(swallows_one_cancel())
        await asyncio.sleep(0)  # let it reach its first sleep
        stopper = asyncio.create_task(stop(task))  # type: ignore[operator]
        done, _ = await asyncio.wait({stopper}, timeout=2)
        ended = stopper in done and task.cancelled()
        for leftover in (stopper, task):
            leftover.cancel()
        await asyncio.wait({stopper, task})
        return ended

    assert asyncio.run(scenario()) is ends
