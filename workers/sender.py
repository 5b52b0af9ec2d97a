"""The events of every stream a worker runs, sent by one thread in pipelined round trips.

A stream thread used to wait out a round trip to Redis for each of its deltas: with many streams, that
round trip (a syscall pair, a GIL hand-off, a reply) per delta, not the engine, set the worker's pace
(py-spy: 60% of the time the worker held the GIL was spent in it; bench/README.md). Now a stream thread
hands its event over and goes back to its engine, and one sender thread sends whatever every stream handed
over since its last round trip in one pipeline. A stream's deltas that queued up behind a round trip leave
as one delta (up to ``most`` tokens): the busier the path, the more tokens each event carries, which is
what keeps the cost per token down; an idle sender sends an event at once, so the first token does not wait.

One queue for all streams, in arrival order: a job's events leave in the order its thread handed them over.
An event gets its log id when it is sent, so deltas merged into one leave no gap in the job's ids.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from queueing import eventlog, events
from queueing.eventlog import Channel

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Item:
    channel: Channel
    # None: a marker that only waits for what was handed over before it.
    event: events.AnyEvent | None
    tokens: int
    done: threading.Event | None
    error: BaseException | None = None


@dataclass(slots=True)
class _Send:
    """One event as it goes out: an item, or several deltas of one stream merged."""

    channel: Channel
    event: events.AnyEvent | None
    tokens: int
    items: list[_Item] = field(default_factory=list)


class Sender:
    def __init__(
        self,
        client: redis.Redis,
        log_ttl_ms: int,
        most: int,
        unreachable: tuple[type[Exception], ...],
        found_away: Callable[[], None],
    ) -> None:
        self._r = client
        self._log_ttl_ms = log_ttl_ms
        self._most = most
        self._unreachable = unreachable
        self._found_away = found_away
        self._cond = threading.Condition()
        self._queue: list[_Item] = []
        # A bug (a script error) met under a stream's delta, which nobody waited for: raised in the stream's
        # thread at its next hand-over, as a synchronous send raised it.
        self._errors: dict[Channel, BaseException] = {}
        self._thread: threading.Thread | None = None

    def send(
        self, channel: Channel, event: events.AnyEvent | None, tokens: int = 0, wait: bool = True
    ) -> None:
        """Hand ``event`` over; with ``wait``, return once it was sent or dropped (Redis unreachable)."""
        item = _Item(channel, event, tokens, threading.Event() if wait else None)
        with self._cond:
            error = self._errors.pop(channel, None)
            if error is not None:
                raise error
            self._queue.append(item)
            if self._thread is None:
                # Started by the first event, not at construction: a worker forks before it runs jobs.
                self._thread = threading.Thread(target=self._run, name="inferq-sender", daemon=True)
                self._thread.start()
            self._cond.notify()
        if item.done is not None:
            item.done.wait()
            if item.error is not None:
                raise item.error

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                batch, self._queue = self._queue, []
            try:
                self._send(self._merged(batch))
            except BaseException as exc:  # the thread must outlive anything: waiters hear of it
                logger.exception("sending %d stream events failed", len(batch))
                self._ended(batch, exc)

    def _merged(self, batch: list[_Item]) -> list[_Send]:
        sends: list[_Send] = []
        # Per stream, its last delta in ``sends`` that the next one may join.
        open_delta: dict[Channel, _Send] = {}
        for item in batch:
            last = open_delta.get(item.channel)
            joins = last is not None and last.tokens + item.tokens <= self._most
            if isinstance(item.event, events.Delta) and joins:
                assert last is not None and isinstance(last.event, events.Delta)
                last.event = _joined(last.event, item.event)
                last.tokens += item.tokens
                last.items.append(item)
                continue
            send = _Send(item.channel, item.event, item.tokens, [item])
            sends.append(send)
            if isinstance(item.event, events.Delta):
                open_delta[item.channel] = send
            elif item.event is not None:
                open_delta.pop(item.channel, None)
        return sends

    def _send(self, sends: list[_Send]) -> None:
        out = [s for s in sends if s.event is not None]
        # Ids are taken once: a send retried below keeps its id.
        calls = [self._emit_args(s) for s in out]
        try:
            results = self._pipelined(calls)
            if any(isinstance(r, redis.exceptions.NoScriptError) for r in results):
                # Redis restarted since the script was loaded: every send of this round trip failed alike.
                self._r.script_load(eventlog.EMIT)
                results = self._pipelined(calls)
        except self._unreachable as exc:
            # Pub/sub is at-most-once and the API fills what it missed from the record: dropped, not
            # waited for.
            logger.warning("dropped %d stream events: Redis unreachable (%s)", len(out), exc)
            self._found_away()
            results = [None] * len(out)
        for send, result in zip(out, results, strict=True):
            if isinstance(result, Exception):
                self._ended(send.items, result)
        self._ended([item for s in sends for item in s.items], None)

    def _emit_args(self, send: _Send) -> tuple[str | int, ...]:
        """The arguments of the log-and-publish script for ``send``; takes its id."""
        channel = send.channel
        assert send.event is not None and channel.log is not None
        payload = events.encode(send.event)
        return (channel.log, channel.name, channel.next_id(), payload, eventlog.MAX_EVENTS, self._log_ttl_ms)

    def _pipelined(self, calls: list[tuple[str | int, ...]]) -> list[object]:
        if not calls:
            return []
        pipe = self._r.pipeline(transaction=False)
        for args in calls:
            pipe.evalsha(eventlog.EMIT_SHA, 2, *args)
        return list(pipe.execute(raise_on_error=False))

    def _ended(self, items: list[_Item], error: BaseException | None) -> None:
        for item in items:
            if item.done is None:
                if error is not None:
                    with self._cond:
                        self._errors[item.channel] = error
                continue
            if error is not None and item.error is None:
                item.error = error
            item.done.set()


def _joined(a: events.Delta, b: events.Delta) -> events.Delta:
    both = a.logprobs is not None or b.logprobs is not None
    logprobs = [*(a.logprobs or []), *(b.logprobs or [])] if both else None
    tokens = a.tokens + b.tokens
    return events.Delta(attempt=a.attempt, text=a.text + b.text, logprobs=logprobs, tokens=tokens)
