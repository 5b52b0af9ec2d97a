"""Recovering the jobs of workers that died without finishing them, and of senders that died before sending.

A worker killed mid-job leaves its message unacknowledged, and kombu's Redis transport would only redeliver
it after the visibility timeout (hours). Instead, every live worker looks for names in the registry whose
heartbeat expired and re-queues their running jobs as a new attempt; a late broker redelivery of the old
attempt is then dropped at claim time.

Making a job queued and sending its message are two steps. The first (one Lua script) also lists the job in
the unsent ledger (``keys.JOBS_UNSENT``) and the sender takes it off once the message is out, so a process
that dies in between leaves an entry behind: every live worker (each heartbeat) and every API process
(api/requeue_sweep.py) sends such entries again. A message sent twice runs once: the claim of the second
delivery finds the job running (or ended) and drops it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis

from queueing import keys, registry, tracing
from queueing.faults import fault
from queueing.jobs import Job
from queueing.jobstore import JobStore

logger = logging.getLogger(__name__)

# Seconds an unsent entry waits before a sweep sends it again. A healthy sender takes it off within
# milliseconds (one LPUSH), so past this its sender is dead or stuck; short, so that a stranded job waits only
# a few seconds more, well inside any request timeout. A send slower than this (Redis answering slowly) only
# costs a duplicate message, which the claim drops.
RESEND_AFTER_SECONDS = 3.0


def requeue_jobs_of(store: JobStore, name: str, enqueue: Callable[[Job], None]) -> list[str]:
    """Re-queue the jobs a dead worker was running or had waiting in its own queue, each as its next
    attempt on the model's shared queue, which every live worker with the model consumes."""
    requeued: list[str] = []
    taken = [(i, store.requeue) for i in store.running_on(name)]
    taken += [(i, store.requeue_routed) for i in store.assigned_to(name)]
    for job_id, take in taken:
        job = take(job_id, name)
        if job is not None:
            logger.warning("worker %s died; re-queued job %s as attempt %d", name, job.id, job.attempt)
            fault("requeue_before_send")
            enqueue(job)
            store.sent(job)
            requeued.append(job.id)
            _traced_failover(job, name)
    store.forget_worker(name)
    return requeued


def _traced_failover(job: Job, dead: str) -> None:
    # In the request's trace (the job carries its context): the moment its next attempt was queued.
    at = tracing.now_ns()
    what: tracing.Attributes = {
        "inferq.job_id": job.id,
        "inferq.reason": "worker died",
        "inferq.worker.lost": dead,
        "inferq.attempt": job.attempt,
    }
    tracing.record("failover", at, at, job.trace_context, what)


def reap_dead_workers(
    client: redis.Redis,
    store: JobStore,
    enqueue: Callable[[Job], None],
    lock_seconds: float = 30.0,
    rescue_window: float = 10.0,
) -> list[str]:
    """Re-queue the running jobs of every dead worker; returns the ids of the jobs re-queued. Then, for
    ``rescue_window`` seconds after a worker was reaped, every call also rescues what a worker took off a
    shared queue and died with before claiming it (rescue_unclaimed)."""
    requeued: list[str] = []
    for name in registry.known_workers(client):
        if registry.is_alive(client, name):
            continue
        # One reaper per dead worker, whichever live worker gets here first.
        if not client.set(keys.reap_lock_key(name), "1", nx=True, px=int(lock_seconds * 1000)):
            continue
        requeued += requeue_jobs_of(store, name, enqueue)
        client.srem(keys.WORKERS_SET, name)
        client.set(keys.RESCUE_DUE, name, px=int(rescue_window * 1000))
    if client.exists(keys.RESCUE_DUE):
        requeued += rescue_unclaimed(store, enqueue)
    return requeued


def rescue_unclaimed(
    store: JobStore, enqueue: Callable[[Job], None], age: float = RESEND_AFTER_SECONDS
) -> list[str]:
    """A worker killed between taking a message off its model's shared queue and claiming the job holds it
    in no job set: the message waits unacknowledged (kombu redelivers it only after the visibility timeout,
    hours) and the job stays queued for ever. A live worker claims what it takes within milliseconds, so a
    message taken ``age`` ago whose job is still unclaimed at that attempt is such a one. Not looked for on
    every beat: it reads every running job's message; only for a while after a worker died."""
    rescued: list[str] = []
    for job in store.rescue_unclaimed(time.time() - age):
        logger.warning(
            "job %s was taken off its queue but never claimed; re-queued as attempt %d", job.id, job.attempt
        )
        enqueue(job)
        store.sent(job)
        rescued.append(job.id)
    return rescued


def resend_unsent(
    store: JobStore, enqueue: Callable[[Job], None], age: float = RESEND_AFTER_SECONDS
) -> list[str]:
    """Send again the queued jobs whose sender died before sending them; returns their ids."""
    resent: list[str] = []
    for job in store.unsent_due(age):
        logger.warning("job %s attempt %d was queued but never sent; sending it", job.id, job.attempt)
        enqueue(job)
        store.sent(job)
        resent.append(job.id)
    return resent
