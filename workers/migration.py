"""A stream that moves: its next attempt continues the text its earlier attempts sent.

When a streamed job's worker dies (its heartbeat lapses and a live worker re-queues the job) or is drained
(SIGTERM, after ``worker_drain_grace``), the job runs again as its next attempt. What the client already has
is in the job's event log (queueing/eventlog.py): the deltas of the earlier attempts, in order. The next
worker puts that text after the prompt (an assistant prefix for a chat, the raw continuation of a completion)
and generates the rest, ``max_tokens`` reduced by what was produced; its ``Started`` says how many characters
it continues, and the API goes on with the same stream (api/jobrun.py). Text-level, so it works from any
engine to any other.

Not continued, but started again (and the API ends the stream with ``worker_lost``, as before): a job that
moved ``stream_migration_limit`` times already, and one whose output a JSON schema constrains (its grammar
cannot resume mid-output).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import cast

import redis

from engines.base import Engine, GenerationRequest, TokenCounter
from queueing import events, keys
from queueing.eventlog import EventId
from queueing.jobs import Job


@dataclass(frozen=True)
class Continued:
    """The text an attempt continues, and how many tokens it counted for (in this engine's tokenizer)."""

    text: str = ""
    tokens: int = 0


NOTHING = Continued()


def sent_before(client: redis.Redis, job: Job) -> tuple[str, int]:
    """The text a stream's earlier attempts sent (their deltas in its log, in order), and how many of those
    attempts sent some: the moves the job made with text."""
    found = client.xrange(keys.job_events_key(job.id)) or []
    parts: list[str] = []
    moved: set[int] = set()
    for entry_id, fields in cast(list[tuple[bytes, dict[bytes, bytes]]], found):
        at = EventId.parse(entry_id)
        if at is None or at.attempt >= job.attempt:
            continue
        event = events.decode(fields[b"e"])
        if isinstance(event, events.Delta) and event.text:
            parts.append(event.text)
            moved.add(at.attempt)
    return "".join(parts), len(moved)


def continuing(
    request: GenerationRequest, engine: Engine, before: str, moves: int, limit: int
) -> tuple[GenerationRequest, Continued]:
    """``request`` made to continue ``before``, with what it continues; unchanged where it cannot."""
    if not before or moves > limit or request.json_schema is not None:
        return request, NOTHING
    with_text = dataclasses.replace(request, continuation=before)
    if isinstance(engine, TokenCounter):
        done = engine.count_tokens(with_text) - engine.count_tokens(request)
    else:
        done = len(before.split())
    # At least one token more: an answer that had reached its limit ends at its next step.
    rest = max(1, request.max_tokens - done)
    return dataclasses.replace(with_text, max_tokens=rest), Continued(before, done)
