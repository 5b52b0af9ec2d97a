"""Stopping the API's background loops at shutdown.

A loop that outlives its ``close`` holds the lifespan's shutdown, and with it the process, for ever (seen once
in a full test run: an API process given SIGTERM still ran its re-queue sweep 15 s later). A cancellation
can be lost on its way into a loop: a library that catches it and raises its own error instead (Python
3.11's ``asyncio.timeout`` when its deadline falls with the cancel, a client's disconnect path), which the
loop's ``except`` for that error then treats as one more failed pass. So the task is cancelled again until
it has ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

logger = logging.getLogger(__name__)


async def cancel_and_wait(task: asyncio.Task[None], grace: float = 1.0) -> None:
    """Cancel ``task`` and wait for its end, cancelling again every ``grace`` seconds it goes on."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=grace)
        if not task.done():
            logger.warning("task %s went on after it was cancelled; cancelling it again", task.get_name())
    with contextlib.suppress(asyncio.CancelledError):
        await task
