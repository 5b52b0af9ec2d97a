"""Fault injection, for tests only: ``INFERQ_FAULT=<name>`` makes the process kill itself (SIGKILL, as
``kill -9`` would) at the point named ``<name>``, so that an end-to-end test can crash it between two steps
deterministically instead of racing a kill against them. Unset in production, where ``fault`` does nothing.

Points: ``requeue_before_send`` (queueing/recovery.py: a dead worker's job was made queued as its next
attempt, its message not sent yet); ``before_claim`` (workers/tasks.py: a worker took a job's message off
the queue and has not claimed the job yet).
"""

from __future__ import annotations

import logging
import os
import signal

logger = logging.getLogger(__name__)

# Read once: a point on a hot path costs one string comparison.
_ACTIVE = os.environ.get("INFERQ_FAULT", "")


def fault(name: str) -> None:
    """Die here if ``INFERQ_FAULT`` names this point."""
    if name and name == _ACTIVE:
        # The log line is how a test tells the injected crash from any other death.
        logger.critical("INFERQ_FAULT=%s: killing this process (pid %d)", name, os.getpid())
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)
