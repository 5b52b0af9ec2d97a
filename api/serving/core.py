"""The serving core under every protocol: jobs in, neutral events or a neutral result out.

A protocol adapter (api/adapters/) turns its request into ``Work`` (the jobs to run and how to count their
usage), then either ``complete``s it (every job's ``Finished``) or ``start_stream``s it (each job's deltas
as they come, tagged with the job's index). Fan-out over several jobs, waiting for a worker, cancelling on
disconnect and usage are done here once; the adapter only renders the result in its wire shape.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from fastapi.responses import JSONResponse
from pydantic import BaseModel

from api import access_log, errors, priority
from api.jobrun import JobRun
from api.jobs import INTERACTIVE, Disconnected, Dispatcher, RunOptions
from api.protocol.base import ServiceTier
from api.serving import fanout, structured
from queueing import events
from queueing.catalog import ModelSpec
from queueing.jobs import Job, Sampling

WORKER_HEADER = "x-inferq-worker"


@dataclass(frozen=True)
class TokenUsage:
    prompt_tokens: int
    completion_tokens: int
    # Prompt tokens an engine took from its prefix cache.
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def usage(finished: Sequence[events.Finished], prompts: int = 1) -> TokenUsage:
    """Usage of fanned-out jobs: each prompt counts once however many choices it has (as OpenAI counts n)."""
    if not finished:
        return TokenUsage(0, 0)
    per_prompt = max(len(finished) // max(prompts, 1), 1)
    firsts = finished[::per_prompt]
    return TokenUsage(
        prompt_tokens=sum(f.prompt_tokens for f in firsts),
        completion_tokens=sum(f.completion_tokens for f in finished),
        cached_tokens=sum(f.cached_tokens for f in firsts),
    )


def workers_header(runs: Sequence[JobRun]) -> dict[str, str]:
    # run.worker, not the first Started: a re-queued job finishes on another worker.
    workers = ",".join(dict.fromkeys(run.worker or "" for run in runs))
    # Noted for the access log too: a queued stream's own response start (and so this header) never passes
    # the outer middleware (api/queue_position.py).
    access_log.note_workers(workers)
    return {WORKER_HEADER: workers}


@dataclass(frozen=True)
class Work:
    """What one request asks of the fleet: its jobs, and how many distinct prompts they hold (``n``
    choices of one prompt are ``n`` jobs of one prompt)."""

    jobs: list[Job]
    prompts: int = 1


@dataclass(frozen=True)
class Outcome:
    """A finished non-streamed request: every job's end, in job order, and the runs that served them."""

    work: Work
    finished: list[events.Finished]
    runs: list[JobRun]

    @property
    def usage(self) -> TokenUsage:
        return usage(self.finished, self.work.prompts)

    @property
    def headers(self) -> dict[str, str]:
        return workers_header(self.runs)


@dataclass(frozen=True)
class Serve:
    """Where and how one request runs: its model's catalog entry, the dispatcher, how to tell that the client
    left, and how its jobs run and are named (a batch line's differ from an interactive request's)."""

    spec: ModelSpec
    dispatcher: Dispatcher
    disconnected: Disconnected | None = None
    options: RunOptions = INTERACTIVE
    ids: fanout.JobIds | None = None

    async def complete(self, work: Work) -> Outcome:
        return await complete(self.dispatcher, work, self.disconnected, self.options)

    async def stream(self, work: Work) -> Stream:
        return await start_stream(self.dispatcher, work, self.disconnected, self.options)

    def service_tier(self) -> ServiceTier:
        """What OpenAI's answers report in ``service_tier``: the tier of the class the jobs queue in (in the
        request's context: its header, its body's tier, its key's cap)."""
        return priority.served_tier(priority.queued_in(self.options.priority))


def json_response(result: BaseModel, outcome: Outcome, headers: dict[str, str] | None = None) -> JSONResponse:
    """A non-streamed result, with the header that names the workers that served it."""
    return JSONResponse(result.model_dump(mode="json"), headers={**outcome.headers, **(headers or {})})


async def complete(
    dispatcher: Dispatcher,
    work: Work,
    disconnected: Disconnected | None,
    options: RunOptions = INTERACTIVE,
) -> Outcome:
    try:
        finished, runs = await fanout.complete_all(dispatcher, work.jobs, disconnected, options)
    except errors.ApiError:
        await _ended(dispatcher, work, None, options)
        raise
    outcome = Outcome(work, finished, runs)
    await _ended(dispatcher, work, outcome.usage, options)
    return outcome


async def _ended(
    dispatcher: Dispatcher, work: Work, used: TokenUsage | None, options: RunOptions = INTERACTIVE
) -> None:
    """Count a request that ended (``used``: its usage, None when it failed) for its key's limits and in the
    usage ledger, and an interactive one for its key's fair share (api/fairness.py: batch lines fill idle
    capacity, which is no one's share). A token count (Anthropic's count_tokens) generates nothing and is not
    counted."""
    if not work.jobs or work.jobs[0].kind == "count":
        return
    u = used or TokenUsage(0, 0)
    await dispatcher.ended(
        work.jobs[0].model,
        u.prompt_tokens,
        u.cached_tokens,
        u.completion_tokens,
        used is not None,
        shared=options.priority != "batch",
    )


@dataclass
class Stream:
    """A started streamed request. ``events()`` yields ``(job index, Delta | Finished)`` until every job
    finished, and raises the first error; ``close()`` (idempotent) cancels what is still running."""

    work: Work
    runs: list[JobRun]
    stack: contextlib.AsyncExitStack
    dispatcher: Dispatcher
    finished: list[events.Finished | None] = field(default_factory=list)
    # Whether its end was counted (api/usage.py): once, when it ended or when it was closed unfinished.
    counted: bool = False
    # A resumed stream counts only when it ends: the request that started it counted the client leaving.
    resumed: bool = False

    def __post_init__(self) -> None:
        self.finished = [None] * len(self.runs)

    async def events(self) -> AsyncIterator[tuple[int, events.Delta | events.Finished]]:
        try:
            async for i, event in fanout.merged(self.runs):
                if isinstance(event, events.Finished):
                    self.finished[i] = event
                yield i, event
        except errors.ApiError:
            await self._count(None)
            raise
        await self._count(self.usage)

    async def _count(self, used: TokenUsage | None) -> None:
        if used is None and self.resumed:
            return
        if not self.counted:
            self.counted = True
            await _ended(self.dispatcher, self.work, used)

    @property
    def usage(self) -> TokenUsage:
        return usage([f for f in self.finished if f is not None], self.work.prompts)

    @property
    def headers(self) -> dict[str, str]:
        return workers_header(self.runs)

    async def close(self) -> None:
        # A stream closed before its end (its client left) counts as a request that failed.
        await self._count(None)
        await self.stack.aclose()


async def start_stream(
    dispatcher: Dispatcher,
    work: Work,
    disconnected: Disconnected | None,
    options: RunOptions = INTERACTIVE,
) -> Stream:
    """Enqueue the jobs and wait until each was accepted: errors until then are plain HTTP errors."""
    try:
        runs, stack = await fanout.start_streams(dispatcher, work.jobs, disconnected, options)
    except errors.ApiError:
        await _ended(dispatcher, work, None)
        raise
    # A resumed stream's request counts its end: the usage its client is told (the one that started it
    # counted as a request that failed, its client having left with no usage).
    return Stream(work, runs, stack, dispatcher, resumed=options.replay)


def chat_work(
    model: str,
    plan: structured.Plan,
    sampling: Sampling,
    *,
    n: int = 1,
    stream: bool = False,
    ids: fanout.JobIds | None = None,
) -> Work:
    """The jobs of one chat-like request (chat completions, responses, messages): one per choice."""
    jobs = [
        Job(
            model=model,
            messages=plan.messages,
            # Choice i of a seeded request is seeded seed+i: repeatable, yet the choices differ.
            sampling=sampling.model_copy(
                update={"seed": None if sampling.seed is None else sampling.seed + i}
            ),
            stream=stream,
        )
        for i in range(n)
    ]
    return Work(fanout.named(jobs, ids))
