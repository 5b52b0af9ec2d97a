"""Background responses: driven by whichever API process holds their lease, their events logged in Redis.

The process that accepts a background response drives it: it streams the job, logs every event (so any
process can replay them from any sequence number) and stores each new state. It renews a lease while it
does; when it dies the lease lapses, and another API process takes the response over: it follows the same
job to its end (the job kept running on its worker), logs the text the dead process had not logged yet,
and ends the response, so the log a client replays has nothing repeated and nothing missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

from api import errors
from api.adapters import responses
from api.adapters.responses_stream import Writer, events_of
from api.deps import model_spec
from api.jobs import Dispatcher, RunOptions
from api.leases import Leases
from api.protocol.responses import ResponseObject, ResponsesRequest
from api.protocol.responses_events import ResponseStreamEvent
from api.responses.store import ResponseStore, StoredResponse
from api.serving import core, output, structured
from api.tasks import cancel_and_wait
from queueing import events, keys
from queueing.catalog import Catalog

logger = logging.getLogger(__name__)

ENDED = frozenset({"completed", "incomplete", "failed", "cancelled"})
# A background job outlives the request that created it, and the process that drove it: only the cancel
# route cancels it. A new holder follows the job it finds rather than submitting another.
DRIVE = RunOptions(cancel_on_exit=False)
FOLLOW = RunOptions(cancel_on_exit=False, resume=True)


@dataclass
class BackgroundResponses:
    dispatcher: Dispatcher
    store: ResponseStore
    catalog: Catalog
    client: Any
    lease_seconds: float = 6.0
    holder: str = field(default_factory=lambda: uuid.uuid4().hex)
    _driving: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    _scan: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        self._leases = Leases(self.client)

    def start(self) -> None:
        self._scan = asyncio.create_task(self._scan_loop(), name="inferq-background-responses")

    async def close(self) -> None:
        """Stop driving (the process is stopping); the jobs run on and another process takes over."""
        tasks = [t for t in (self._scan, *self._driving.values()) if t is not None]
        await asyncio.gather(*(cancel_and_wait(task) for task in tasks), return_exceptions=True)

    async def begin(self, prepared: responses.Prepared, owner: str) -> ResponseObject:
        """Store a new background response as queued, log its first events and start driving it."""
        stored = StoredResponse(
            owner=owner,
            response=prepared.skeleton,
            context=prepared.context,
            job_id=prepared.id,
            request=prepared.body.model_dump(mode="json", by_alias=True, exclude_unset=True),
        )
        await self.store.save(stored)
        writer = Writer(prepared.skeleton)
        for e in writer.start():
            await self._log(prepared.id, e)
        await self._leases.take(keys.response_lease_key(prepared.id), self.holder, self.lease_seconds)
        await self.client.sadd(keys.RESPONSES_BACKGROUND, prepared.id)
        self._hold(prepared.id, self._drive(prepared, stored, writer))
        return prepared.skeleton

    def cancel_local(self, response_id: str) -> None:
        task = self._driving.get(response_id)
        if task is not None:
            task.cancel()

    # --- holding: the lease, cancellation, the end ---

    def _hold(self, response_id: str, work: Any) -> None:
        task = asyncio.create_task(self._holding(response_id, work), name=f"inferq-response-{response_id}")
        self._driving[response_id] = task

    async def _holding(self, response_id: str, work: Any) -> None:
        key = keys.response_lease_key(response_id)
        job = asyncio.create_task(work)
        try:
            while not job.done():
                await asyncio.wait({job}, timeout=self.lease_seconds / 3)
                if job.done():
                    break
                status = await self._status(response_id)
                if status is None or status == "cancelled":
                    job.cancel()
                elif not await self._leases.take(key, self.holder, self.lease_seconds):
                    logger.warning(
                        "lost the lease of response %s; another API process drives it", response_id
                    )
                    job.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await job
            if await self._status(response_id) in (*ENDED, None):
                await self.client.srem(keys.RESPONSES_BACKGROUND, response_id)
        except Exception:
            logger.exception("driving background response %s failed; another scan picks it up", response_id)
        finally:
            job.cancel()
            self._driving.pop(response_id, None)
            with contextlib.suppress(Exception):
                await asyncio.shield(self._leases.release(key, self.holder))

    async def _status(self, response_id: str) -> str | None:
        stored = await self.store.peek(response_id)
        return None if stored is None else stored.response.status

    async def _scan_loop(self) -> None:
        """Take over background responses whose holder stopped renewing its lease."""
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            try:
                for raw in await self.client.smembers(keys.RESPONSES_BACKGROUND):
                    response_id = raw.decode() if isinstance(raw, bytes) else str(raw)
                    if response_id in self._driving:
                        continue
                    key = keys.response_lease_key(response_id)
                    if await self._leases.take(key, self.holder, self.lease_seconds):
                        self._hold(response_id, self._take_over(response_id))
            except Exception:
                # Redis away for a moment: the next scan tries again.
                logger.exception("background response scan failed")

    # --- driving ---

    async def _log(self, response_id: str, e: ResponseStreamEvent) -> None:
        await self.store.append(response_id, e.sequence_number, e.model_dump(mode="json"))

    async def _save(self, stored: StoredResponse, response: ResponseObject) -> None:
        # A cancel may have landed meanwhile: a cancelled response stays cancelled.
        await self.store.save_unless_cancelled(stored.model_copy(update={"response": response}))

    async def _drive(self, prepared: responses.Prepared, stored: StoredResponse, writer: Writer) -> None:
        try:
            stream = await core.start_stream(self.dispatcher, prepared.work, None, DRIVE)
        except errors.ApiError as exc:
            for e in writer.failed(errors.counted(exc)):
                await self._log(prepared.id, e)
        else:
            try:
                async for e in events_of(prepared, stream, writer):
                    await self._log(prepared.id, e)
                    if e.type == "response.in_progress":
                        await self._save(stored, writer.response)
            finally:
                await stream.close()
        if writer.final is not None:
            await self._save(stored, writer.final)

    async def _take_over(self, response_id: str) -> None:
        stored = await self.store.peek(response_id)
        if stored is None or stored.response.status in ENDED or stored.request is None:
            await self.client.srem(keys.RESPONSES_BACKGROUND, response_id)
            return
        logger.info("taking over background response %s", response_id)
        body = ResponsesRequest.model_validate(stored.request)
        spec = model_spec(self.catalog, body.model)
        prepared = responses.prepare(
            body, spec, None, lambda _: response_id, stream=True, context=stored.context
        )
        writer = Writer.restore(stored.response, await self.store.events_after(response_id, -1))
        try:
            outcome = await core.complete(self.dispatcher, prepared.work, None, FOLLOW)
            record = await self.dispatcher.store.get(response_id)
            finished = outcome.finished[0].model_copy(update={"text": record.text if record else ""})
            pieces = rest_of(prepared.plan, writer.emitted, finished)
            out: list[ResponseStreamEvent] = [] if writer.in_progress_sent else writer.in_progress()
            for p in pieces:
                out += writer.piece(p)
        except errors.ApiError as exc:
            out = writer.failed(errors.counted(exc))
        for e in out:
            await self._log(response_id, e)
        if writer.final is not None:
            await self._save(stored, writer.final)


def rest_of(plan: structured.Plan, emitted: str, finished: events.Finished) -> list[output.Piece]:
    """The pieces of a finished job that a dead holder had not logged: the choice is brought to where the
    log stands (its pieces dropped), then given the rest of the text and the end."""
    choice = output.ChoiceStream(plan)
    text = finished.text or ""
    if emitted and text.startswith(emitted):
        choice.delta(events.Delta(attempt=finished.attempt, text=emitted))
        text = text[len(emitted) :]
    pieces = choice.delta(events.Delta(attempt=finished.attempt, text=text)) if text else []
    return [*pieces, *choice.finished(finished.model_copy(update={"text": None}))]
