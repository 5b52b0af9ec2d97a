"""The Celery app Flower watches (`celery -A ops.flower_app flower`, started by ops/stack.py): the fleet's own
broker settings, so Flower follows a sentinel failover as the workers do (queueing/sentinel.py)."""

from __future__ import annotations

from queueing.catalog import get_catalog
from queueing.celery_app import create_celery
from queueing.settings import get_settings

app = create_celery(get_settings(), get_catalog())
