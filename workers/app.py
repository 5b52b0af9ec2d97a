"""The worker's Celery app. ``celery -A workers.app worker`` and ``inferq worker`` both start here.

Signals wire the inferq runtime into Celery's worker lifecycle: models load before consuming starts, the
queues consumed are those of the loaded models, and the worker joins the registry once it is ready.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import celeryd_after_setup, worker_ready, worker_shutdown, worker_shutting_down

from queueing import sentinel, tracing
from queueing.catalog import get_catalog
from queueing.celery_app import create_celery, worker_queue
from queueing.settings import get_settings
from workers import runtime

logger = logging.getLogger(__name__)

app = create_celery(get_settings(), get_catalog())
# Threads, not prefork: the model is loaded once in this process, and llama.cpp releases the GIL while it
# computes; forking a process that holds a loaded model is not safe.
app.conf.worker_pool = "threads"
app.conf.worker_concurrency = runtime.concurrency(get_settings(), get_catalog())
if get_settings().redis_url.startswith("redis://"):
    # The same Redis transport, minus a crash on a lost connection (workers/broker.py).
    app.conf.broker_transport = "workers.broker:Transport"
elif sentinel.parse(get_settings().redis_url) is not None:
    app.conf.broker_transport = "workers.broker:SentinelTransport"
app.conf.worker_consumer = "workers.broker:Consumer"


@celeryd_after_setup.connect
def _load_models(sender: str, instance: Any, **_: Any) -> None:
    # Threads, not forked children: set up once here, the processor's thread serves every job's spans.
    tracing.setup("inferq-worker")
    try:
        rt = runtime.start_runtime(get_settings(), get_catalog(), nodename=sender)
    except Exception as exc:
        # Celery logs and swallows exceptions from signal handlers; a worker without its models must not
        # start consuming (it would take every queue), so leave with SystemExit, which Celery lets through.
        logger.critical("cannot start the worker: %s", exc)
        raise SystemExit(1) from exc
    # Consume exactly this worker's own queue and the queues of the models loaded here, whatever -Q said.
    queues = instance.app.amqp.queues
    queues.select_add(worker_queue(rt.name))
    queues.select(rt.queues())


@worker_ready.connect
def _join_fleet(sender: Any, **_: Any) -> None:
    # The sender is Celery's consumer: models loaded later start their queues through it.
    runtime.start_heartbeat(app, runtime.get_runtime(), consumer=sender)


@worker_shutting_down.connect
def _drain(**_: Any) -> None:
    # SIGTERM or Ctrl-C (a warm shutdown): Celery waits for the running jobs; after the grace they move.
    runtime.drain_runtime(get_settings().worker_drain_grace)


@worker_shutdown.connect
def _leave_fleet(**_: Any) -> None:
    runtime.stop_runtime()
    # What the last jobs traced goes out before the process exits.
    tracing.shutdown()


import workers.control  # noqa: E402  (registers the remote-control commands)
import workers.tasks  # noqa: E402,F401  (registers the tasks on `app`)
