"""Fair shares in a real Redis: a key is over its share when it holds more than 1.5x an equal split of a
model's recent tokens among the keys that used it, counting what its requests in flight may use."""

from __future__ import annotations

import asyncio

import redis
import redis.asyncio as aredis

from api.fairness import FairShare, expected_tokens
from ops.redis_server import RedisServer
from queueing import keys
from queueing.jobs import ChatMessage, Job, Sampling


def held(client: redis.Redis, model: str, account: str) -> int:
    return sum(int(client.hget(k, account) or 0) for k in client.keys(f"{keys.SHARE_PREFIX}{model}:*"))


def test_a_key_queueing_ten_times_the_load_is_over_its_share_from_its_admissions(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    async def main() -> list[bool]:
        client = aredis.Redis.from_url(redis_server.url)
        share = FairShare(client, window=30)
        try:
            for light in ("a", "b", "c"):
                await share.spent("m", light, 100)
            await share.spent("other-model", "heavy", 10_000)
            # Ten requests admitted, none ended yet: the second is over (200 of 500 > 1.5 x 125).
            found = [await share.admit("m", "heavy", 100) for _ in range(10)]
            found += [await share.admit("m", k, 100) for k in ("a", "newcomer")]
            return found
        finally:
            await client.aclose()

    assert asyncio.run(main()) == [False] + [True] * 9 + [False, False]
    assert held(redis_client, "m", "heavy") == 1000
    (bucket, *_) = redis_client.keys(f"{keys.SHARE_PREFIX}m:*")
    assert 0 < redis_client.ttl(bucket) <= 30 + 2 * keys.SHARE_BUCKET_SECONDS


def test_near_even_keys_are_within_their_share_and_one_key_alone_is_never_over(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    async def main() -> list[bool]:
        client = aredis.Redis.from_url(redis_server.url)
        share = FairShare(client, window=30)
        try:
            solo = await share.admit("m", "solo", 4_000)
            await share.spent("m", "x", 3_000)
            await share.spent("m", "y", 2_000)
            # solo 4000 + 1, x 3000, y 2000: 1.5 x an equal split is 4500.5.
            return [solo, await share.admit("m", "solo", 1), await share.admit("m", "y", 1)]
        finally:
            await client.aclose()

    assert asyncio.run(main()) == [False, False, False]


def test_what_a_request_may_use_is_given_back_at_its_end_and_a_window_of_zero_turns_shares_off(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    async def main() -> tuple[bool, bool]:
        client = aredis.Redis.from_url(redis_server.url)
        share, off = FairShare(client, window=30), FairShare(client, window=0)
        try:
            await share.admit("m", "a", 500)
            await share.returned("m", "a", 500)
            await share.spent("m", "a", 42)
            # Given back more than a bucket holds (a request longer than the window): counted as none.
            await share.returned("m", "b", 1_000)
            await share.spent("m", "c", 10)
            c_alone = await share.admit("m", "c", 1)
            await off.spent("m", "a", 10_000)
            return c_alone, await off.admit("m", "a", 10_000)
        finally:
            await client.aclose()

    # a 42 and c 11 hold the window (b's -1000 counts as 0): c is within 1.5 x 26.5.
    assert asyncio.run(main()) == (False, False)
    assert held(redis_client, "m", "a") == 42


def test_a_job_may_use_its_prompt_estimate_and_its_max_tokens() -> None:
    chat = Job(
        model="m", messages=[ChatMessage(role="user", content="x" * 400)], sampling=Sampling(max_tokens=50)
    )
    assert expected_tokens(chat) == 150
    assert expected_tokens(Job(model="m", kind="embedding", inputs=[[1, 2, 3]])) == 3
