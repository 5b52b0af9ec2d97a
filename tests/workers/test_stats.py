"""The worker's own measurements that the registry publishes and fastest_response routing reads."""

from __future__ import annotations

import pytest

from workers.stats import WorkerStats


def test_counts_in_flight_and_outcomes() -> None:
    s = WorkerStats()
    s.job_started()
    s.job_started()
    assert s.snapshot().in_flight == 2
    s.job_finished(ok=True, tokens=10, decode_seconds=0.9)
    s.job_finished(ok=False)
    snap = s.snapshot()
    assert (snap.in_flight, snap.completed, snap.failed, snap.tokens) == (0, 1, 1, 10)


def test_ewmas_follow_samples() -> None:
    s = WorkerStats(alpha=0.5)
    s.job_started()
    s.first_token(0.2)
    s.job_finished(ok=True, tokens=11, decode_seconds=1.0)  # 10 decode steps: 0.1 s each
    s.job_started()
    s.first_token(0.4)
    s.job_finished(ok=True, tokens=11, decode_seconds=3.0)
    snap = s.snapshot()
    assert snap.ewma_ttft == pytest.approx(0.3)
    assert snap.ewma_tpot == pytest.approx(0.2)


def test_single_token_and_failed_jobs_are_not_speed_samples() -> None:
    s = WorkerStats()
    s.job_started()
    s.job_finished(ok=True, tokens=1, decode_seconds=0.5)
    s.job_started()
    s.job_finished(ok=False, tokens=0, decode_seconds=2.0)
    assert s.snapshot().ewma_tpot is None
