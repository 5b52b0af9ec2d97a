"""Following a job's events (api/jobrun.py) from a subscription's queue: deltas that are ready together
are taken as one where the run merges them, and one by one where it must not (a resumable stream)."""

from __future__ import annotations

from typing import Any

from queueing import events
from queueing.jobs import ChatMessage, Job, Sampling
from tests.api._runs import followed

JOB = Job(
    model="m", messages=[ChatMessage(role="user", content="hi")], sampling=Sampling(max_tokens=8), stream=True
)
LOGPROB = events.TokenLogprob(token="x", logprob=-0.5, top=[])


def taken(merge: bool, queued: list[events.AnyEvent]) -> list[events.Event]:
    return followed(JOB, queued, merge_deltas=merge)


def delta(text: str, logprobs: Any = None) -> events.Delta:
    return events.Delta(attempt=1, text=text, logprobs=logprobs)


STARTED = events.Started(attempt=1, worker="w", prompt_tokens=2)
FINISHED = events.Finished(attempt=1, finish_reason="length", prompt_tokens=2, completion_tokens=4)


def test_deltas_ready_together_are_taken_as_one_up_to_the_next_other_event() -> None:
    got = taken(True, [STARTED, delta("a", [LOGPROB]), delta("b"), delta("c", [LOGPROB]), FINISHED])
    merged = events.Delta(attempt=1, text="abc", logprobs=[LOGPROB, LOGPROB], tokens=3)
    assert got == [STARTED, merged, FINISHED]


def test_a_run_that_must_not_merge_takes_every_delta_on_its_own() -> None:
    queued: list[events.AnyEvent] = [STARTED, delta("a"), delta("b"), FINISHED]
    assert taken(False, queued) == queued
