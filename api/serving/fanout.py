"""Several jobs for one request (``n`` > 1, a list of prompts): each its own queued job, so the fleet runs
them in parallel on as many workers as are free, merged back into one response."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

from api.jobrun import JobRun
from api.jobs import INTERACTIVE, Disconnected, Dispatcher, RunOptions
from api.queue_position import furthest, waiting_room
from queueing import events
from queueing.jobs import Job

T = TypeVar("T")
# Names the jobs of one request: job index -> job id. Batch lines name theirs after the line, so that an API
# process taking over a batch finds the jobs already running; requests leave the ids random.
JobIds = Callable[[int], str]


async def gather_or_cancel(*aws: Awaitable[T]) -> list[T]:
    """All results in order; on the first error the others are cancelled and awaited before it is raised.

    Plain gather would leave them running: closing their runs then would close event streams that a
    sibling task is still reading.
    """
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def start_all(
    dispatcher: Dispatcher,
    jobs: Sequence[Job],
    disconnected: Disconnected | None,
    stack: contextlib.AsyncExitStack,
    options: RunOptions = INTERACTIVE,
) -> list[JobRun]:
    """Enqueue every job and wait until each was accepted; the runs close with ``stack``. While they wait,
    the request's response may tell the client where they stand (api/queue_position.py)."""
    runs = [await stack.enter_async_context(dispatcher.run(job, disconnected, options)) for job in jobs]
    # Only a stream's response can begin before its answer: a JSON answer has one status, sent with it.
    room = waiting_room.get() if all(job.stream for job in jobs) else None
    if room is not None:
        room.waiting(furthest([(run.job, run.queue) for run in runs], dispatcher.positions))
    try:
        await gather_or_cancel(*(run.start() for run in runs))
    finally:
        if room is not None:
            room.started = True
    return runs


async def start_streams(
    dispatcher: Dispatcher,
    jobs: Sequence[Job],
    disconnected: Disconnected | None,
    options: RunOptions = INTERACTIVE,
) -> tuple[list[JobRun], contextlib.AsyncExitStack]:
    """Start streamed jobs; the caller closes the returned stack when the response ends (it is closed here
    if starting fails)."""
    stack = contextlib.AsyncExitStack()
    try:
        return await start_all(dispatcher, jobs, disconnected, stack, options), stack
    except BaseException:
        await stack.aclose()
        raise


async def finish_all(runs: Sequence[JobRun]) -> list[events.Finished]:
    """The end of every non-streamed run, in order (a non-streamed job publishes no deltas)."""

    async def last(run: JobRun) -> events.Finished:
        async for event in run.rest():
            if isinstance(event, events.Finished):
                return event
        raise AssertionError("rest() ends with Finished or raises")

    return await gather_or_cancel(*(last(run) for run in runs))


async def merged(runs: Sequence[JobRun]) -> AsyncIterator[tuple[int, events.Delta | events.Finished]]:
    """The events of all streamed runs as they come, tagged with the run's index; the first error raises."""
    if len(runs) == 1:
        async for event in runs[0].rest():
            yield 0, event
        return
    queue: asyncio.Queue[tuple[int, events.Delta | events.Finished | Exception]] = asyncio.Queue()

    async def pump(i: int, run: JobRun) -> None:
        try:
            async for event in run.rest():
                await queue.put((i, event))
        except Exception as exc:  # handed to the consumer, which raises it
            await queue.put((i, exc))

    tasks = [asyncio.create_task(pump(i, run)) for i, run in enumerate(runs)]
    try:
        left = len(runs)
        while left:
            i, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            yield i, item
            if isinstance(item, events.Finished):
                left -= 1
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def complete_all(
    dispatcher: Dispatcher,
    jobs: Sequence[Job],
    disconnected: Disconnected | None,
    options: RunOptions = INTERACTIVE,
) -> tuple[list[events.Finished], list[JobRun]]:
    """Run non-streamed jobs to their end: the end of each, in order, and the runs (closed by then)."""
    async with contextlib.AsyncExitStack() as stack:
        runs = await start_all(dispatcher, jobs, disconnected, stack, options)
        finished = await finish_all(runs)
    return finished, runs


def named(jobs: list[Job], job_ids: JobIds | None) -> list[Job]:
    if job_ids is None:
        return jobs
    return [job.model_copy(update={"id": job_ids(i)}) for i, job in enumerate(jobs)]
