"""What a worker measures about its own jobs: in-flight count, totals, and EWMAs of its speed.

The registry publishes a snapshot with every heartbeat; ``fastest_response`` routing reads the EWMAs,
``affinity`` routing the prefill speed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

# Prompt tokens evaluated at least, for a time to first token to count as a prefill speed sample.
MIN_PREFILL_SAMPLE = 32


@dataclass(frozen=True)
class StatsSnapshot:
    in_flight: int
    completed: int
    failed: int
    tokens: int
    ewma_ttft: float | None
    ewma_tpot: float | None
    ewma_prefill_tps: float | None = None
    # Generations whose prompt an engine took partly from its prefix cache (hits) or not at all (misses),
    # and their prompt tokens: all of them, and those taken from the cache.
    cache_hits: int = 0
    cache_misses: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0


class WorkerStats:
    """Thread-safe counters fed by the job runner (one call per job event, never per token)."""

    def __init__(self, alpha: float = 0.3) -> None:
        self._alpha = alpha
        self._lock = threading.Lock()
        self._in_flight = 0
        self._completed = 0
        self._failed = 0
        self._tokens = 0
        self._ttft: float | None = None
        self._tpot: float | None = None
        self._prefill: float | None = None
        self._hits = 0
        self._misses = 0
        self._prompt_tokens = 0
        self._cached_tokens = 0

    def _ewma(self, old: float | None, sample: float) -> float:
        return sample if old is None else old + self._alpha * (sample - old)

    def job_started(self) -> None:
        with self._lock:
            self._in_flight += 1

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self._ttft = self._ewma(self._ttft, seconds)

    def prompt_evaluated(self, prompt_tokens: int, cached_tokens: int, seconds: float) -> None:
        """A generation's first token came ``seconds`` after its start, with ``cached_tokens`` of its
        ``prompt_tokens`` taken from the engine's cache: the cache's counts and the prefill speed that
        affinity routing weighs a miss by."""
        evaluated = prompt_tokens - cached_tokens
        with self._lock:
            self._prompt_tokens += prompt_tokens
            self._cached_tokens += cached_tokens
            if cached_tokens > 0:
                self._hits += 1
            else:
                self._misses += 1
            # A short evaluation is mostly fixed cost (scheduling, the first decode step): no prefill sample.
            if evaluated >= MIN_PREFILL_SAMPLE and seconds > 0:
                self._prefill = self._ewma(self._prefill, evaluated / seconds)

    def job_finished(self, ok: bool, tokens: int = 0, decode_seconds: float = 0.0) -> None:
        with self._lock:
            self._in_flight -= 1
            self._tokens += tokens
            if ok:
                self._completed += 1
            else:
                self._failed += 1
            # One token says nothing about the decode rate (it is all prefill), so it is not a sample.
            if ok and tokens > 1 and decode_seconds > 0:
                self._tpot = self._ewma(self._tpot, decode_seconds / (tokens - 1))

    def job_yielded(self) -> None:
        """A batch line gave its slot up; it counts when its next attempt ends."""
        with self._lock:
            self._in_flight -= 1

    def snapshot(self) -> StatsSnapshot:
        with self._lock:
            return StatsSnapshot(
                self._in_flight,
                self._completed,
                self._failed,
                self._tokens,
                self._ttft,
                self._tpot,
                self._prefill,
                self._hits,
                self._misses,
                self._prompt_tokens,
                self._cached_tokens,
            )
