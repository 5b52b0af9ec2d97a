"""The heartbeat thread: keeps this worker in the registry and recovers the jobs of workers that died."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import redis

from queueing import registry
from queueing.jobs import Job
from queueing.jobstore import JobStore
from queueing.recovery import reap_dead_workers, requeue_jobs_of
from queueing.registry import WorkerInfo

logger = logging.getLogger(__name__)


class Heartbeat(threading.Thread):
    def __init__(
        self,
        client: redis.Redis,
        info: WorkerInfo,
        interval: float,
        ttl: float,
        enqueue: Callable[[Job], None],
    ) -> None:
        super().__init__(name="inferq-heartbeat", daemon=True)
        self._r = client
        self._info = info
        self._interval = interval
        self._ttl = ttl
        self._enqueue = enqueue
        self._store = JobStore(client)
        self._halt = threading.Event()

    def recover_previous_life(self) -> None:
        """A worker restarted under the same name (a supervisor, `inferq up`) looks alive to the reaper at
        once, so the jobs its killed predecessor held are re-queued here, before it announces itself."""
        requeue_jobs_of(self._store, self._info.name, self._enqueue)

    def beat(self) -> None:
        registry.announce(self._r, self._info, self._ttl)
        reap_dead_workers(self._r, self._store, self._enqueue)

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.beat()
            except redis.RedisError as exc:
                # Redis may come back; the worker keeps serving what it has and beats again next time.
                logger.warning("heartbeat failed: %s", exc)
            except Exception:
                # Anything else (a broker error while re-queueing a dead worker's job) must not end this
                # thread: a worker that stops beating is declared dead by the rest of the fleet.
                logger.exception("heartbeat failed")
            self._halt.wait(self._interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=self._interval * 2)
        try:
            registry.deregister(self._r, self._info.name)
        except redis.RedisError as exc:
            logger.warning("could not deregister %s: %s", self._info.name, exc)
