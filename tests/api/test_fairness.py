"""Fair shares in a real Redis: a key is over its share when what it used of a model lately, or what its
requests in flight hold, is more than 1.5x an equal split among the keys that used or hold it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import redis
import redis.asyncio as aredis

from api.fairness import FairShare, expected_tokens
from ops.redis_server import RedisServer
from queueing import keys
from queueing.jobs import ChatMessage, Job, Sampling, Share

# Slots enough that no key here is over its split of them, but in the test that is about them.
SLOTS = 64


def used(client: redis.Redis, model: str, account: str) -> int:
    buckets = [
        k for k in client.keys(f"{keys.SHARE_PREFIX}{model}:*") if k != keys.share_held_key(model).encode()
    ]
    return sum(int(client.hget(k, account) or 0) for k in buckets)


def with_share(url: str, body: Callable[[FairShare], Awaitable[object]], window: float = 30) -> object:
    async def main() -> object:
        client = aredis.Redis.from_url(url)
        try:
            return await body(FairShare(client, window=window))
        finally:
            await client.aclose()

    return asyncio.run(main())


def test_a_key_that_queues_ten_requests_at_once_is_over_its_share_from_its_second(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    async def body(share: FairShare) -> list[Share]:
        for light in ("a", "b", "c"):
            await share.spent("m", light, 100)
        await share.spent("other-model", "heavy", 10_000)
        found = [await share.admit("m", "heavy", 100, f"h{i}", SLOTS, "interactive") for i in range(10)]
        # The light keys, one request each in flight, and a newcomer are within theirs.
        found += [await share.admit("m", k, 100, k, SLOTS, "interactive") for k in ("a", "b", "newcomer")]
        return found

    # One request in flight is never over by what it holds; two of two hundred held is.
    assert with_share(redis_server.url, body) == ["within"] + ["over"] * 9 + ["within"] * 3
    assert redis_client.zcard(keys.share_held_key("m")) == 13
    assert 0 < redis_client.pttl(keys.share_held_key("m")) <= 3600 * 1000


def test_what_keys_used_decides_once_their_requests_ended(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    async def body(share: FairShare) -> list[Share]:
        for i in range(10):
            await share.admit("m", "heavy", 100, f"h{i}", SLOTS, "interactive")
            await share.release("m", "heavy", 100, f"h{i}", "interactive")
            await share.spent("m", "heavy", 100)
        for light in ("a", "b", "c"):
            await share.spent("m", light, 100)
        # heavy used 1000 of 1300 against 1.5 x 325; nothing is held any more.
        return [await share.admit("m", k, 1, k, SLOTS, "interactive") for k in ("heavy", "a")]

    assert with_share(redis_server.url, body) == ["over", "within"]
    assert used(redis_client, "m", "heavy") == 1000
    assert redis_client.zcard(keys.share_held_key("m")) == 2


def test_near_even_keys_and_a_key_alone_are_within_their_share(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    async def body(share: FairShare) -> list[Share]:
        solo = [await share.admit("m", "solo", 4_000, f"s{i}", SLOTS, "interactive") for i in range(3)]
        await share.spent("m", "x", 3_000)
        await share.spent("m", "y", 2_000)
        for i in range(3):
            await share.release("m", "solo", 4_000, f"s{i}", "interactive")
        await share.spent("m", "solo", 4_000)
        # solo 4000, x 3000, y 2000 used: 1.5 x an equal split is 4500.
        return [
            *solo,
            await share.admit("m", "solo", 1, "s", SLOTS, "interactive"),
            await share.admit("m", "y", 1, "y", SLOTS, "interactive"),
        ]

    assert with_share(redis_server.url, body) == ["within"] * 5


def test_a_key_with_more_requests_than_its_split_of_the_slots_is_queued_even_alone(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    async def body(share: FairShare) -> list[Share]:
        # One worker of two slots; the heavy key comes alone, then a newcomer.
        alone = [await share.admit("m", "heavy", 10, f"h{i}", 2, "interactive") for i in range(4)]
        return [
            *alone,
            await share.admit("m", "new", 10, "n0", 2, "interactive"),
            await share.admit("m", "new", 10, "n1", 2, "interactive"),
        ]

    # The third and fourth wait behind the heavy key's own; the newcomer's first is within its split of one
    # slot, its second is not.
    assert with_share(redis_server.url, body) == ["within", "within", "queued", "queued", "within", "queued"]


def test_the_slots_are_split_among_the_keys_of_a_class(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    async def body(share: FairShare) -> list[Share]:
        for i in range(5):
            await share.admit("m", "bulk", 10, f"b{i}", 2, "low")
        # Two high requests of another key on two slots: the low backlog is not theirs to split with.
        return [await share.admit("m", "urgent", 10, f"u{i}", 2, "high") for i in range(3)]

    assert with_share(redis_server.url, body) == ["within", "within", "queued"]


def test_a_window_of_zero_turns_shares_off(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    async def body(share: FairShare) -> list[Share]:
        await share.spent("m", "a", 10_000)
        return [await share.admit("m", "a", 10_000, f"r{i}", SLOTS, "interactive") for i in range(3)]

    assert with_share(redis_server.url, body, window=0) == ["within"] * 3
    assert redis_client.keys(f"{keys.SHARE_PREFIX}*") == []


def test_a_job_may_use_its_prompt_estimate_and_its_max_tokens() -> None:
    chat = Job(
        model="m", messages=[ChatMessage(role="user", content="x" * 400)], sampling=Sampling(max_tokens=50)
    )
    assert expected_tokens(chat) == 150
    assert expected_tokens(Job(model="m", kind="embedding", inputs=[[1, 2, 3]])) == 3
