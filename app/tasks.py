"""Stopping the service's background tasks at shutdown."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

# How long each cancellation is given before it is sent again.
RECANCEL_SECONDS = 0.1


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel `task` and wait until it has ended.

    One cancel() is not always enough on Python 3.11: asyncio.wait_for() swallows a
    cancellation that arrives just as the future it waits on completes (CPython
    gh-86296, fixed in 3.12), and the task then goes on (a retention round into its next
    sleep), so a bare `await task` after cancel() could wait for good. The cancellation is
    sent again until the task is done.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=RECANCEL_SECONDS)
    with contextlib.suppress(asyncio.CancelledError):
        await task
