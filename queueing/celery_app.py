"""The Celery app both tiers share: broker settings, the per-model queues, and enqueueing by task name."""

from __future__ import annotations

from celery import Celery
from kombu.entity import Exchange, Queue

from queueing import keys
from queueing.bands import message_priority
from queueing.catalog import Catalog
from queueing.jobs import Job
from queueing.sentinel import celery_broker
from queueing.settings import Settings


def create_celery(settings: Settings, catalog: Catalog) -> Celery:
    # A sentinel URL becomes kombu's sentinel transport, which finds the master after a failover.
    broker, sentinel_options = celery_broker(settings.redis_url)
    app = Celery("inferq", broker=broker, set_as_current=False)
    app.conf.update(
        # A job is acknowledged only when it finished, and a worker holds one message per free slot, so a
        # dead worker strands at most the jobs it was running (which the reaper re-queues).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            # Without a socket timeout a synchronous command (a send) waits forever on a Redis that froze
            # or vanished without closing the connection. A restart closes it: noticed at once.
            "socket_timeout": 5,
            "socket_connect_timeout": 2,
            # kombu's own check of the long-lived BRPOP and pub/sub connections (default 25 s): a consumer
            # on a half-open connection reconnects within about 1 + 2 * 10 s.
            "health_check_interval": 10,
            # Ten places in line per queue instead of kombu's four (queueing/bands.py).
            "priority_steps": list(keys.KOMBU_PRIORITY_STEPS),
            **sentinel_options,
        },
        # A worker keeps trying to reach Redis however long it is away (Celery's default gives up after
        # 100 tries and the worker exits), and a job running through an outage goes on: its result is
        # written once Redis is back (workers/runner.py).
        broker_connection_retry=True,
        broker_connection_max_retries=None,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # Queues are declared from the catalog; a typo'd queue name is an error, not a new queue.
        task_queues=[_direct(keys.model_queue(m)) for m in catalog.models],
        task_create_missing_queues=False,
        task_default_queue=keys.model_queue(next(iter(catalog.models))),
        # Results travel over pub/sub and the job record, never through a Celery result backend.
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        # Flower shows the fleet from the workers' events; a "task-sent" event from the API would cost every
        # request one more Redis round trip before it is queued.
        worker_send_task_events=True,
        task_send_sent_event=False,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    return app


def _direct(queue: str) -> Queue:
    # Every queue gets an exchange and routing key of its own: a Queue declared without them is bound to
    # Celery's default exchange and key, which all such queues share, so each message would reach them all.
    return Queue(queue, Exchange(queue, type="direct"), routing_key=queue)  # type: ignore[no-untyped-call]


def worker_queue(name: str) -> Queue:
    """A worker's own queue; not in task_queues, as workers come and go."""
    return _direct(keys.worker_queue(name))


def enqueue(app: Celery, job: Job, worker: str | None = None) -> None:
    """Send ``job`` to its model's shared queue, or to ``worker``'s own queue when routing picked one."""
    queue = worker_queue(worker) if worker else _direct(keys.model_queue(job.model))
    app.send_task(
        keys.GENERATE_TASK,
        args=[job.model_dump(mode="json")],
        queue=queue,
        task_id=f"{job.id}.{job.attempt}",
        # What Flower and task events show of the arguments: never the prompt, which anyone who can open
        # Flower's pages would otherwise read.
        argsrepr=f"[{job.kind} {job.model} {job.id} attempt {job.attempt}]",
        kwargsrepr="{}",
        priority=message_priority(job),
        retry=False,
    )
