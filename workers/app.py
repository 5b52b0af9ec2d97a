"""The worker's Celery app. ``celery -A workers.app worker`` and ``inferq worker`` both start here.

Signals wire the inferq runtime into Celery's worker lifecycle: models load before consuming starts, the
queues consumed are those of the loaded models, and the worker joins the registry once it is ready.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import celeryd_after_setup, worker_ready, worker_shutdown

from queueing.catalog import get_catalog
from queueing.celery_app import create_celery
from queueing.settings import get_settings
from workers import runtime

logger = logging.getLogger(__name__)

app = create_celery(get_settings(), get_catalog())
# Threads, not prefork: the model is loaded once in this process, and llama.cpp releases the GIL while it
# computes; forking a process that holds a loaded model is not safe.
app.conf.worker_pool = "threads"
app.conf.worker_concurrency = get_settings().worker_concurrency


@celeryd_after_setup.connect
def _load_models(sender: str, instance: Any, **_: Any) -> None:
    try:
        rt = runtime.start_runtime(get_settings(), get_catalog(), nodename=sender)
    except Exception as exc:
        # Celery logs and swallows exceptions from signal handlers; a worker without its models must not
        # start consuming (it would take every queue), so leave with SystemExit, which Celery lets through.
        logger.critical("cannot start the worker: %s", exc)
        raise SystemExit(1) from exc
    # Consume exactly the queues of the models loaded here, whatever -Q said.
    instance.app.amqp.queues.select(rt.queues())


@worker_ready.connect
def _join_fleet(**_: Any) -> None:
    runtime.start_heartbeat(app, get_settings(), runtime.get_runtime())


@worker_shutdown.connect
def _leave_fleet(**_: Any) -> None:
    runtime.stop_runtime()


import workers.tasks  # noqa: E402,F401  (registers the tasks on `app`)
