"""Every API process sends again the jobs a dead process made queued but never sent (the unsent ledger of
queueing/recovery.py), so a stranded job is found even while no worker beats: it waits on its model's
queue for the next worker instead of until its request times out. The same pass cancels the streamed jobs
whose client left and did not resume within its reconnect grace (api/reconnect.py)."""

from __future__ import annotations

import asyncio
import logging

import redis
import redis.asyncio as aredis
from celery import Celery

from api.reconnect import ReconnectGrace
from api.tasks import cancel_and_wait
from queueing.celery_app import enqueue
from queueing.jobstore import AsyncJobStore
from queueing.recovery import RESEND_AFTER_SECONDS

logger = logging.getLogger(__name__)


class RequeueSweep:
    def __init__(
        self, client: aredis.Redis, celery: Celery, interval: float, age: float = RESEND_AFTER_SECONDS
    ) -> None:
        self._store = AsyncJobStore(client)
        self._leaving = ReconnectGrace(client, self._store)
        self._celery = celery
        self._interval = interval
        self._age = age
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="inferq-requeue-sweep")

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None

    async def sweep(self) -> list[str]:
        """One pass: the ids of the jobs sent again."""
        resent: list[str] = []
        for job in await self._store.unsent_due(self._age):
            logger.warning("job %s attempt %d was queued but never sent; sending it", job.id, job.attempt)
            # The dispatcher's send path (the model's shared queue); kombu's producer is synchronous, and a
            # background pass can afford the hop to a thread.
            await asyncio.to_thread(enqueue, self._celery, job)
            await self._store.sent(job)
            resent.append(job.id)
        # The streams whose client left and did not come back within its grace (api/resume.py).
        for job_id in await self._leaving.cancel_due():
            logger.info("job %s: its client did not come back; cancelled", job_id)
        return resent

    async def _loop(self) -> None:
        while True:
            try:
                await self.sweep()
            except redis.RedisError as exc:
                # Redis or the broker away: the entries stay listed and the next pass sends them. One line,
                # not a traceback a second, for as long as the outage lasts.
                logger.warning("re-queue sweep skipped: %r", exc)
            except Exception:
                logger.exception("re-queue sweep failed")
            await asyncio.sleep(self._interval)
