"""Whether this worker still makes progress: the liveness check beyond "the heartbeat thread runs".

The heartbeat thread beats as long as the process lives, also when every job slot is stuck (an engine wedged
in its lock, a C call that never returns), and a worker that looks healthy keeps being sent work it will
never do. So every generation reports each output its engine gives, and a model is *stalled* when it has
running generations and none of them got an output for longer than the stall bound: the worker then stops
taking that model's work and says so in its registry info, until one of them moves again or ends.

The check is per model, not per job: a job waiting for a busy engine's lock while another job of the same
engine streams is queueing, not stalling. Loading a model (in this process, while others serve) makes no
job progress, so it never counts: while a load runs nothing is stalled, and the clock restarts after it.
Embedding and counting jobs are one engine call each, with nothing to report in between: not watched.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Progress:
    """One running generation; ``tick()`` on every output (a plain attribute store, no lock)."""

    __slots__ = ("_clock", "last", "model")

    def __init__(self, model: str, clock: Callable[[], float]) -> None:
        self.model = model
        self._clock = clock
        self.last = clock()

    def tick(self) -> None:
        self.last = self._clock()


class Liveness:
    def __init__(self, stall_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.stall_seconds = stall_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._running: set[Progress] = set()
        self._loading = 0

    def started(self, model: str) -> Progress:
        p = Progress(model, self._clock)
        with self._lock:
            self._running.add(p)
        return p

    def ended(self, progress: Progress) -> None:
        with self._lock:
            self._running.discard(progress)

    def load_started(self) -> None:
        with self._lock:
            self._loading += 1

    def load_ended(self) -> None:
        with self._lock:
            self._loading = max(0, self._loading - 1)
            # The load's time is not the jobs' fault: their wait starts again from here.
            now = self._clock()
            for p in self._running:
                p.last = max(p.last, now)

    def stalled(self) -> list[str]:
        """Models with running generations none of which got an output within the stall bound."""
        with self._lock:
            if self._loading:
                return []
            latest: dict[str, float] = {}
            for p in self._running:
                latest[p.model] = max(latest.get(p.model, p.last), p.last)
        horizon = self._clock() - self.stall_seconds
        return sorted(m for m, last in latest.items() if last < horizon)
