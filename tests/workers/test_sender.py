"""The worker's one sender of stream events, against a real Redis: order and ids per stream, deltas merged
behind a round trip (bounded), waiting sends, errors, a Redis that lost its scripts or is unreachable."""

from __future__ import annotations

import threading
from typing import Any, cast

import redis

from ops.redis_server import RedisServer
from queueing import events, keys
from queueing.eventlog import Channel
from workers.sender import Sender

UNREACHABLE = (redis.ConnectionError, redis.TimeoutError)


class HeldPipelines(redis.Redis):
    """A real client whose pipelines wait for ``release`` before they run, and can be made to fail."""

    def __init__(self, url: str) -> None:
        super().__init__(connection_pool=redis.ConnectionPool.from_url(url))
        self.release = threading.Event()
        self.release.set()
        self.held = threading.Event()
        # Raised by the next round trip (by every one while ``fail_always``).
        self.fail: Exception | None = None
        self.fail_always = False
        self.rounds = 0

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        outer = self
        pipe = super().pipeline(transaction, shard_hint)
        run = pipe.execute

        def execute(raise_on_error: bool = True) -> Any:
            outer.rounds += 1
            outer.held.set()
            outer.release.wait(10)
            if outer.fail is not None:
                fail, outer.fail = outer.fail, outer.fail if outer.fail_always else None
                raise fail
            return run(raise_on_error)

        pipe.execute = execute  # type: ignore[method-assign]
        return pipe


def sender_on(client: redis.Redis, most: int = 64) -> tuple[Sender, list[int]]:
    away: list[int] = []
    return Sender(client, 60_000, most, UNREACHABLE, lambda: away.append(1)), away


def logged(client: redis.Redis, job: str) -> list[tuple[str, events.Event]]:
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(keys.job_events_key(job)))
    return [(i.decode(), events.decode(f[b"e"])) for i, f in entries]


def delta(text: str) -> events.Delta:
    return events.Delta(attempt=1, text=text)


def test_deltas_queued_behind_a_round_trip_leave_merged_in_order_with_consecutive_ids(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    client = HeldPipelines(redis_server.url)
    sender, _ = sender_on(client, most=4)
    a, b = Channel("a", 1, logged=True), Channel("b", 1, logged=True)
    client.release.clear()
    sender.send(a, events.Started(attempt=1, worker="w", prompt_tokens=3), wait=False)
    assert client.held.wait(5)  # the first event went out at once; its round trip is held
    for i in range(10):
        sender.send(a, delta(f"a{i} "), tokens=1, wait=False)
        sender.send(b, delta(f"b{i} "), tokens=1, wait=False)
    client.release.set()
    sender.send(a, events.Finished(attempt=1, finish_reason="stop", prompt_tokens=3, completion_tokens=10))
    sender.send(b, None)

    got = logged(redis_client, "a")
    assert [i for i, _ in got] == [f"1-{n}" for n in range(1, len(got) + 1)]
    assert isinstance(got[0][1], events.Started) and isinstance(got[-1][1], events.Finished)
    texts = [e.text for _, e in got if isinstance(e, events.Delta)]
    assert "".join(texts) == "".join(f"a{i} " for i in range(10))
    # Ten deltas queued behind one round trip, at most four tokens to an event: three events.
    assert [t.count(" ") for t in texts] == [4, 4, 2]
    assert "".join(e.text for _, e in logged(redis_client, "b") if isinstance(e, events.Delta)) == "".join(
        f"b{i} " for i in range(10)
    )


def test_a_waiting_send_returns_once_it_and_what_came_before_are_logged(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    sender, _ = sender_on(redis_client)
    c = Channel("w", 1, logged=True)
    for i in range(50):
        sender.send(c, delta(f"{i},"), tokens=1, wait=False)
    sender.send(c, None)
    text = "".join(e.text for _, e in logged(redis_client, "w") if isinstance(e, events.Delta))
    assert text == "".join(f"{i}," for i in range(50))


def test_a_script_error_under_a_delta_is_raised_at_the_streams_next_hand_over(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    client = HeldPipelines(redis_server.url)
    sender, away = sender_on(client)
    c, other = Channel("e", 1, logged=True), Channel("o", 1, logged=True)
    client.fail = redis.ResponseError("boom")
    client.release.clear()
    sender.send(c, delta("x"), tokens=1, wait=False)
    assert client.held.wait(5)
    client.release.set()
    sender.send(other, None)  # a later round trip: the failed one is over
    try:
        sender.send(c, delta("y"), tokens=1, wait=False)
    except redis.ResponseError as exc:
        assert str(exc) == "boom"
    else:
        raise AssertionError("the delta's error was not raised")
    assert not away
    sender.send(c, delta("z"), tokens=1)  # the stream's error was raised once; it goes on
    assert [e.text for _, e in logged(redis_client, "e") if isinstance(e, events.Delta)] == ["z"]


def test_an_unreachable_redis_drops_the_events_and_waiters_go_on(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    client = HeldPipelines(redis_server.url)
    sender, away = sender_on(client)
    c = Channel("u", 1, logged=True)
    client.fail, client.fail_always = redis.ConnectionError("gone"), True
    sender.send(c, delta("lost"), tokens=1, wait=False)
    failed = events.Failed(attempt=1, code="internal_error", message="m")
    sender.send(c, failed)  # returns: dropped, not raised
    assert away
    client.fail = None
    sender.send(c, delta("kept"), tokens=1)
    kept = [(i, e.text) for i, e in logged(redis_client, "u") if isinstance(e, events.Delta)]
    assert kept == [("1-3", "kept")]


def test_a_redis_that_lost_its_scripts_gets_the_events_all_the_same(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    sender, _ = sender_on(redis_client)
    c = Channel("s", 1, logged=True)
    sender.send(c, delta("a"), tokens=1)
    redis_client.script_flush()
    sender.send(c, delta("b"), tokens=1)
    assert [(i, e.text) for i, e in logged(redis_client, "s") if isinstance(e, events.Delta)] == [
        ("1-1", "a"),
        ("1-2", "b"),
    ]
