"""The heartbeat thread: keeps this worker in the registry, recovers the jobs of workers that died (and sends
again those a dead process queued but never sent), heals this worker's in-flight bookkeeping and unloads
models idle past their keep-alive."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis

from queueing import registry
from queueing.jobs import Job
from queueing.jobstore import JobStore
from queueing.recovery import reap_dead_workers, requeue_jobs_of, resend_unsent
from queueing.registry import WorkerInfo

logger = logging.getLogger(__name__)


class Heartbeat(threading.Thread):
    def __init__(
        self,
        client: redis.Redis,
        name: str,
        info: Callable[[], WorkerInfo],
        interval: float,
        ttl: float,
        enqueue: Callable[[Job], None],
        on_beat: Callable[[], object] = lambda: None,
    ) -> None:
        super().__init__(name="inferq-heartbeat", daemon=True)
        self._r = client
        self._name = name
        self._info = info
        self._interval = interval
        self._ttl = ttl
        self._enqueue = enqueue
        self._on_beat = on_beat
        self._store = JobStore(client)
        self._halt = threading.Event()
        self._wake = threading.Event()
        self._announced: float | None = None  # monotonic time of the last beat that reached Redis
        self._reap_after = 0.0

    def recover_previous_life(self) -> None:
        """A worker restarted under the same name (a supervisor, `inferq up`) looks alive to the reaper at
        once, so the jobs its killed predecessor held are re-queued here, before it announces itself."""
        requeue_jobs_of(self._store, self._name, self._enqueue)

    def beat(self) -> None:
        registry.announce(self._r, self._info(), self._ttl)
        now = time.monotonic()
        if self._announced is not None and now - self._announced > self._ttl:
            # This worker could not reach Redis for longer than a TTL (an outage, a freeze): neither could the
            # others, and the live ones announce again within an interval. Reaping now would take their
            # running jobs from them; wait one TTL first.
            self._reap_after = now + self._ttl
        self._announced = now
        if now >= self._reap_after:
            # A message the dead worker took just before it died is old enough to rescue a few beats after
            # the reap (recovery.rescue_unclaimed): the window lasts a few TTLs.
            reap_dead_workers(self._r, self._store, self._enqueue, rescue_window=max(10.0, 3 * self._ttl))
        resend_unsent(self._store, self._enqueue)
        self._store.heal_assigned(self._name)

    def beat_soon(self) -> None:
        """Announce now rather than at the next interval (a model was loaded or unloaded)."""
        self._wake.set()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self._on_beat()
                self.beat()
            except redis.RedisError as exc:
                # Redis may come back; the worker keeps serving what it has and beats again next time.
                logger.warning("heartbeat failed: %s", exc)
            except Exception:
                # Anything else (a broker error while re-queueing a dead worker's job) must not end this
                # thread: a worker that stops beating is declared dead by the rest of the fleet.
                logger.exception("heartbeat failed")
            self._wake.wait(self._interval)
            self._wake.clear()

    def stop(self) -> None:
        self._halt.set()
        self._wake.set()
        self.join(timeout=self._interval * 2)
        try:
            registry.deregister(self._r, self._name)
            # Deregistered, this worker is neither routed to (a pick needs a fresh heartbeat) nor reaped by
            # the others (it is no longer known): the jobs routed to its own queue, and any it still held,
            # go back to the shared queue now, or nobody would ever send them again.
            requeue_jobs_of(self._store, self._name, self._enqueue)
        except Exception as exc:  # a broker error too: the ledger leaves a failed send to the sweep
            logger.warning("could not deregister %s cleanly: %s", self._name, exc)
