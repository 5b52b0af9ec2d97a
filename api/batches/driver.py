"""Driving batches: every API process runs a ``BatchDriver``, which takes a lease on each unfinished batch
that nobody drives, feeds its lines to the fleet at batch priority (a bounded number at a time), and writes
the output and error files at the end.

Nothing lives only in this process: a line's jobs are named after the line and its result is written once
in Redis, so when the process dies its lease lapses and another process (or this one, restarted) follows
the jobs already running and queues only the lines that never ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field, replace

from api import errors
from api.batches import lines
from api.batches.input import InputLine, parse
from api.batches.store import BatchStore
from api.files import Files
from api.jobs import Dispatcher, Limits, RunOptions
from api.protocol.batches import TERMINAL, Batch, BatchError, BatchErrors, BatchStatus, ResultLine
from api.usage import requested_account
from queueing.catalog import Catalog
from queueing.settings import Settings

logger = logging.getLogger(__name__)

# Statuses a batch moves on from while lines still run.
_RUNNING = ("validating", "in_progress")
# Why a batch stopped -> the status it ends in, and the statuses it may end from.
_ENDINGS: dict[str | None, tuple[BatchStatus, tuple[str, ...]]] = {
    None: ("completed", ("finalizing",)),
    "cancelled": ("cancelled", ("cancelling",)),
    "expired": ("expired", (*_RUNNING, "finalizing")),
}
# How often a line is tried when running it fails for a reason that is not its request's.
_LINE_TRIES = 3


@dataclass
class _Run:
    """One pass over a batch's pending lines."""

    batch: Batch
    options: RunOptions
    # Line index -> the ids its jobs were given, so that a stop can cancel them.
    named: dict[int, list[str]] = field(default_factory=dict)
    # Models no worker served within the no-worker timeout during this pass.
    unserved: set[str] = field(default_factory=set)


class BatchDriver:
    def __init__(
        self,
        store: BatchStore,
        files: Files,
        dispatcher: Dispatcher,
        catalog: Catalog,
        settings: Settings,
        lease_seconds: float = 10.0,
    ) -> None:
        self.store = store
        self.files = files
        self.dispatcher = dispatcher
        self.catalog = catalog
        self.max_in_flight = settings.batch_max_in_flight
        self.no_worker_timeout = settings.batch_no_worker_timeout
        self.max_json_depth = settings.max_json_depth
        self.lease_seconds = lease_seconds
        self.poll = dispatcher.limits.poll
        self.holder = uuid.uuid4().hex
        self._runs: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        self._loop = asyncio.create_task(self._scan(), name="inferq-batches")

    def wake(self) -> None:
        """A batch was created or cancelled: look now rather than at the next scan."""
        self._wake.set()

    async def stop(self) -> None:
        """Stop driving; the jobs of lines in flight keep running and the next holder follows them."""
        # The scan loop is asked to end rather than cancelled: a Redis command cancelled halfway leaves its
        # connection to be dropped uncleanly, and the scan is always between commands or asleep.
        self._stopping = True
        self._wake.set()
        if self._loop is not None:
            try:
                await asyncio.wait_for(self._loop, self.lease_seconds / 3)
            except TimeoutError:
                logger.warning("the batch scan did not stop in time (Redis slow?); cancelled it")
        # Only now: the scan may have started one more while it was asked to stop.
        runs = list(self._runs.values())
        for task in runs:
            task.cancel()
        await asyncio.gather(*runs, return_exceptions=True)

    async def _scan(self) -> None:
        while not self._stopping:
            try:
                for batch_id in await self.store.active():
                    if self._stopping:
                        return
                    if batch_id not in self._runs and await self.store.lease(
                        batch_id, self.holder, self.lease_seconds
                    ):
                        self._runs[batch_id] = asyncio.create_task(self._hold(batch_id), name=batch_id)
            except Exception:
                # Redis away for a moment: the next scan tries again.
                logger.exception("batch scan failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.lease_seconds / 3):
                    await self._wake.wait()
            self._wake.clear()
            if self._stopping:
                return

    async def _hold(self, batch_id: str) -> None:
        """Drive one batch while renewing its lease; stop driving at once if the lease is lost."""
        drive = asyncio.create_task(self._drive(batch_id))
        try:
            while not drive.done():
                await asyncio.wait([drive], timeout=self.lease_seconds / 3)
                if not drive.done() and not await self.store.lease(batch_id, self.holder, self.lease_seconds):
                    logger.warning("lost the lease of batch %s; another API process drives it now", batch_id)
                    drive.cancel()
            await drive
        except Exception:
            logger.exception("driving batch %s failed; it is picked up again at the next scan", batch_id)
            await asyncio.sleep(self.lease_seconds / 3)
        finally:
            drive.cancel()
            with contextlib.suppress(BaseException):
                await drive
            self._runs.pop(batch_id, None)
            with contextlib.suppress(Exception):
                await asyncio.shield(self.store.release(batch_id, self.holder))

    async def read_input(self, file_id: str, owner: str) -> list[InputLine]:
        """A batch input file's lines, each checked (nesting depth as for request bodies). Parsing a large
        file takes a while, so off the event loop."""
        return await asyncio.to_thread(parse, await self.files.read(file_id, owner), self.max_json_depth)

    async def _drive(self, batch_id: str) -> None:
        # This task's lines count to the key that created the batch (api/usage.py).
        requested_account.set(await self.store.account(batch_id))
        batch = await self.store.get(batch_id)
        if batch is None or batch.status in TERMINAL:
            await self.store.retire(batch_id)
            return
        if batch.status == "finalizing":
            # The last holder died while writing the files: every line has its result.
            await self._finalize(batch, None, [])
            return
        await self.store.move(batch_id, "in_progress", ["validating"])
        try:
            requests = await self.read_input(batch.input_file_id, await self.store.owner(batch_id))
        except errors.ApiError as exc:
            # The input file was deleted (or replaced) after the batch was accepted.
            await self._fail(batch, exc.code or "invalid_input_file", exc.message)
            return
        done = await self.store.done_lines(batch_id)
        stopped = await self._run_lines(batch, [(i, r) for i, r in enumerate(requests) if i not in done])
        await self._finalize(batch, stopped, requests)

    async def _run_lines(self, batch: Batch, pending: list[tuple[int, InputLine]]) -> str | None:
        """Run ``pending`` lines, at most ``max_in_flight`` at once. Returns why it stopped early
        ("cancelled" or "expired"), or None when every line has its result."""
        run = _Run(batch, self._options(batch))
        slots = asyncio.Semaphore(self.max_in_flight)
        running: dict[int, asyncio.Task[None]] = {}

        def release(index: int) -> None:
            running.pop(index, None)
            slots.release()

        stopped: str | None = None
        for index, line in pending:
            stopped = await self._acquire(slots, batch)
            if stopped:
                slots.release()
                break
            task = asyncio.create_task(self._line(run, index, line))
            running[index] = task
            task.add_done_callback(lambda _, i=index: release(i))  # type: ignore[misc]
        while running and not stopped:
            await asyncio.wait(list(running.values()), timeout=self.poll)
            stopped = await self._stop_reason(batch)
        if stopped:
            # The lines in flight end unanswered; cancelling their jobs makes workers drop or abort them.
            tasks = list(running.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for job_ids in run.named.values():
                for job_id in job_ids:
                    await self.dispatcher.store.cancel(job_id)
        return stopped

    async def _acquire(self, slots: asyncio.Semaphore, batch: Batch) -> str | None:
        """Wait for a free slot, checking every poll whether the batch should stop instead."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll):
                    await slots.acquire()
                    return await self._stop_reason(batch)
            if reason := await self._stop_reason(batch):
                return reason

    async def _stop_reason(self, batch: Batch) -> str | None:
        if await self.store.status(batch.id) == "cancelling":
            return "cancelled"
        if batch.expires_at is not None and time.time() >= batch.expires_at:
            return "expired"
        return None

    async def _line(self, run: _Run, index: int, line: InputLine) -> None:
        batch = run.batch
        base = lines.job_ids(batch.endpoint, batch.id, index)
        named = run.named.setdefault(index, [])

        def ids(k: int) -> str:
            named.append(base(k))
            return named[-1]

        model = str(line.request.body.get("model"))
        options = run.options
        if model in run.unserved:
            # This batch already waited the whole no-worker timeout for this model: look once, do not wait
            # again for every line.
            limits = replace(options.limits or self.dispatcher.limits, no_worker_timeout=0.0)
            options = replace(options, limits=limits)
        for attempt in range(1, _LINE_TRIES + 1):
            try:
                result = await lines.execute(
                    line.request, batch.endpoint, ids, self.dispatcher, self.catalog, options
                )
                break
            except Exception as exc:
                # Not the request's fault (that is an error response): Redis or this process had trouble.
                # The line's jobs are named, so a retry follows them rather than running them again.
                logger.exception("batch %s line %d: try %d failed", batch.id, line.number, attempt)
                if attempt == _LINE_TRIES:
                    result = lines.broken(line.request, f"The request could not be run: {exc}")
                    break
                await asyncio.sleep(self.poll * 2)
        if result.error_code == "no_worker_available":
            run.unserved.add(model)
        elif result.ok:
            run.unserved.discard(model)
        await self.store.record(batch.id, index, result)

    def _options(self, batch: Batch) -> RunOptions:
        left = (batch.expires_at or time.time() + 86400) - time.time()
        limits = Limits(max(left, 60.0), self.no_worker_timeout, self.poll)
        # The shared queue: a batch fills whatever capacity is free rather than being steered.
        return RunOptions(
            priority="batch",
            routing="queue",
            limits=limits,
            resume=True,
            cancel_on_exit=False,
            deadline=batch.expires_at,
        )

    async def _finalize(self, batch: Batch, stopped: str | None, requests: list[InputLine]) -> None:
        results = await self.store.results(batch.id)
        if stopped is None and len(results) < len(requests):
            # A result could not be written (Redis went away): the next holder runs those lines again.
            raise RuntimeError(f"{len(requests) - len(results)} lines of {batch.id} have no result")
        if stopped is None:
            await self.store.move(batch.id, "finalizing", _RUNNING)
        if stopped:
            why = {
                "cancelled": ("batch_cancelled", "The batch was cancelled before this request ran."),
                "expired": ("batch_expired", "The batch's completion window ended before this request ran."),
            }[stopped]
            for index, line in enumerate(requests):
                results.setdefault(index, lines.unrun(line.request, *why))
        ordered = [results[i] for i in sorted(results)]
        output = await self._file(batch, "output", [r for r in ordered if r.ok])
        error = await self._file(batch, "error", [r for r in ordered if not r.ok])
        final, allowed = _ENDINGS[stopped]
        await self.store.move(batch.id, final, allowed, output_file_id=output, error_file_id=error)

    async def _file(self, batch: Batch, kind: str, results: list[ResultLine]) -> str | None:
        if not results:
            return None
        data = "".join(r.model_dump_json() + "\n" for r in results).encode()
        # The batch's owner's, as its input was: the key that created the batch reads its results.
        owner = await self.store.owner(batch.id)
        created = await self.files.create_bytes(f"{batch.id}_{kind}.jsonl", "batch_output", data, owner)
        return created.id

    async def _fail(self, batch: Batch, code: str, message: str) -> None:
        found = BatchErrors(data=[BatchError(code=code, message=message, param="input_file_id")])
        await self.store.move(batch.id, "failed", _RUNNING, errors=found.model_dump_json())
