"""Affinity routing against a real Redis: prefix chains, what workers record, and the pick's rules."""

from __future__ import annotations

import asyncio
import time

import redis
import redis.asyncio as aredis

from ops.redis_server import RedisServer
from queueing import keys, prefixes
from queueing.affinity import AffinityPicker, Balance, Choice, Prefix, Recorder, prefill_speeds
from queueing.jobs import ChatMessage, Job
from queueing.jobstore import AsyncJobStore
from queueing.registry import WorkerInfo, announce

# Long enough for several whole blocks.
SYSTEM = "You are a careful assistant. " * 40


def worker(
    name: str, concurrency: int = 1, prefill_tps: float | None = None, ttft: float | None = None
) -> WorkerInfo:
    return WorkerInfo(
        name=name, host="h", pid=1, engine="scripted", models=["m"], concurrency=concurrency,
        ewma_prefill_tps=prefill_tps, ewma_ttft=ttft, ewma_tpot=None if ttft is None else 0.05,
    )  # fmt: skip


def chat(*turns: str, session: str | None = None) -> Job:
    messages = [ChatMessage(role="system", content=SYSTEM)]
    for i, text in enumerate(turns):
        messages.append(ChatMessage(role="user" if i % 2 == 0 else "assistant", content=text))
    return Job(model="m", messages=messages, session=session)


def pick(url: str, job: Job, workers: list[WorkerInfo], max_tokens: int = 1) -> Choice | None:
    async def go() -> Choice | None:
        client = aredis.Redis.from_url(url)
        try:
            await AsyncJobStore(client, 60).create(job)
            picker = AffinityPicker(client, fresh_ms=5000, ttl=60, balance=Balance())
            return await picker.pick("m", job.id, workers, Prefix.of(job), max_tokens)
        finally:
            await client.aclose()

    return asyncio.run(go())


def busy(client: redis.Redis, name: str, jobs: int) -> None:
    client.delete(keys.worker_jobs_key(name))
    for i in range(jobs):
        client.sadd(keys.worker_jobs_key(name), f"busy-{name}-{i}")


def fleet(client: redis.Redis, *workers: WorkerInfo) -> list[WorkerInfo]:
    for w in workers:
        announce(client, w, ttl=10)
    return list(workers)


def test_a_longer_history_starts_with_the_shorter_ones_chain() -> None:
    first = prefixes.block_hashes(prefixes.job_text(chat("What is Redis?")))
    later = prefixes.block_hashes(prefixes.job_text(chat("What is Redis?", "A store.", "And Lua?" * 100)))
    assert len(first) >= 4 and len(later) > len(first)
    assert later[: len(first)] == first
    # Another system prompt: nothing in common from the first block on.
    other = Job(model="m", messages=[ChatMessage(role="system", content=SYSTEM.upper())])
    assert prefixes.block_hashes(prefixes.job_text(other))[0] != first[0]
    # The worker records the reply too: the next turn, which sends it back, matches past the previous prompt.
    with_reply = prefixes.block_hashes(prefixes.job_text(chat("What is Redis?"), reply="A store. " * 60))
    nxt = prefixes.block_hashes(prefixes.job_text(chat("What is Redis?", "A store. " * 60, "Thanks.")))
    assert len(with_reply) > len(first)
    assert nxt[: len(with_reply)] == with_reply


def test_the_worker_holding_the_prefix_gets_the_next_turn(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    a, b = fleet(redis_client, worker("a"), worker("b"))
    Recorder(redis_client, "b", ttl=60).record(chat("Tell me about queues."), reply="Queues hold work.")
    choice = pick(redis_server.url, chat("Tell me about queues.", "Queues hold work.", "More."), [a, b])
    assert choice is not None and choice.worker == "b" and choice.reason == "cache"
    assert choice.matched_tokens > len(SYSTEM) // prefixes.CHARS_PER_TOKEN // 2
    # The pick is booked as b's in flight until b claims it.
    assert redis_client.scard(keys.worker_assigned_key("b")) == 1


def test_a_cold_prompt_goes_to_a_free_worker_or_the_shared_queue(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    a, b = fleet(redis_client, worker("a"), worker("b"))
    busy(redis_client, "a", 1)
    choice = pick(redis_server.url, chat("Something new."), [a, b])
    assert choice is not None and (choice.worker, choice.reason) == ("b", "cold")
    busy(redis_client, "b", 1)
    redis_client.delete(keys.worker_assigned_key("b"))
    # Every slot busy and nothing cached: whichever worker frees first takes it from the model's queue.
    assert pick(redis_server.url, chat("Something else."), [a, b]) is None


def test_a_session_sticks_to_its_worker_without_a_matching_prefix(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    a, b = fleet(redis_client, worker("a"), worker("b"))
    short = Job(model="m", messages=[ChatMessage(role="user", content="hi")], session="s1")
    Recorder(redis_client, "a", ttl=60).record(short, reply="hello")
    assert redis_client.get(keys.session_key("m", "s1")) == b"a"
    again = Job(model="m", messages=[ChatMessage(role="user", content="other")], session="s1")
    choice = pick(redis_server.url, again, [a, b])
    assert choice is not None and (choice.worker, choice.reason) == ("a", "cache")


def test_an_imbalanced_fleet_spills_to_the_least_loaded_worker(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    a, b = fleet(redis_client, worker("a"), worker("b"))
    Recorder(redis_client, "a", ttl=60).record(chat("Q"), reply="R")
    nxt = chat("Q", "R", "S")
    # Two ahead of an idle worker is within the default bound (more than 2 and more than twice): it waits.
    busy(redis_client, "a", 2)
    choice = pick(redis_server.url, nxt, [a, b])
    assert choice is not None and choice.worker == "a"
    redis_client.delete(keys.worker_assigned_key("a"))
    busy(redis_client, "a", 3)
    choice = pick(redis_server.url, chat("Q", "R", "S"), [a, b])
    assert choice is not None and (choice.worker, choice.reason) == ("b", "spill")
    # Loaded both: 3 against 2 is no imbalance.
    busy(redis_client, "b", 2)
    choice = pick(redis_server.url, chat("Q", "R", "S"), [a, b])
    assert choice is not None and choice.worker == "a"


def test_a_dead_or_forgotten_worker_loses_its_sessions(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    a, b = fleet(redis_client, worker("a"), worker("b"))
    Recorder(redis_client, "a", ttl=60).record(chat("Q", session="s"), reply="R")
    redis_client.zadd(keys.WORKERS_SEEN, {"a": 1})  # a stopped beating
    choice = pick(redis_server.url, chat("Q", "R", "S", session="s"), [a, b])
    assert choice is not None and (choice.worker, choice.reason) == ("b", "cold")
    # A record expires by its ttl.
    alone = Job(model="m", messages=[ChatMessage(role="user", content="Unrelated. " * 100)])
    Recorder(redis_client, "b", ttl=0.2).record(alone, reply="U")
    choice = pick(redis_server.url, alone, [a, b])
    assert choice is not None and (choice.worker, choice.reason) == ("b", "cache")
    time.sleep(0.3)
    redis_client.delete(keys.worker_assigned_key("b"))
    choice = pick(redis_server.url, alone, [a, b])
    assert choice is not None and choice.reason == "cold"


def test_a_miss_is_weighed_by_the_workers_prefill_speed(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    # a holds the system prompt and evaluates 100 tokens/s; b holds nothing at 100,000 tokens/s: the rest of
    # the prompt costs b less than a's remainder costs a.
    a, b = fleet(redis_client, worker("a", prefill_tps=100), worker("b", prefill_tps=100_000))
    Recorder(redis_client, "a", ttl=60).record(chat("Q"), reply=None)
    choice = pick(redis_server.url, chat("Q", "R" * 2000, "S"), [a, b])
    assert choice is not None and (choice.worker, choice.reason) == ("b", "cache")


def test_a_short_saving_does_not_wait_behind_a_busy_worker(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    # a holds the prompt but runs a job of ~5 s (0.1 s to the first token, 0.05 s a token for 100 tokens);
    # the prompt's ~300 tokens cost b ~0.3 s at 1,000 tokens/s: b is cheaper, though a holds the cache.
    a, b = fleet(
        redis_client, worker("a", prefill_tps=1000, ttft=0.1), worker("b", prefill_tps=1000, ttft=0.1)
    )
    Recorder(redis_client, "a", ttl=60).record(chat("Q"), reply=None)
    busy(redis_client, "a", 1)
    choice = pick(redis_server.url, chat("Q", "R", "S"), [a, b], max_tokens=100)
    assert choice is not None and (choice.worker, choice.reason) == ("b", "cache")
    # A slow prefill (10 tokens/s: ~30 s) is worth the wait.
    a, b = fleet(redis_client, worker("a", prefill_tps=10, ttft=0.1), worker("b", prefill_tps=10, ttft=0.1))
    redis_client.delete(keys.worker_assigned_key("b"))
    choice = pick(redis_server.url, chat("Q", "R", "S"), [a, b], max_tokens=100)
    assert choice is not None and choice.worker == "a"


def test_the_held_set_is_bounded(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    recorder = Recorder(redis_client, "a", ttl=60, keep=10)
    for i in range(5):
        text = f"conversation {i} " * 100  # 6 blocks of their own each
        recorder.record(Job(model="m", messages=[ChatMessage(role="user", content=text)]), reply=None)
    assert redis_client.zcard(keys.worker_prefixes_key("a")) == 10
    assert 0 < redis_client.pttl(keys.worker_prefixes_key("a")) <= 60_000


def test_unmeasured_workers_count_as_the_mean_of_the_measured() -> None:
    speeds = prefill_speeds([worker("a", prefill_tps=100), worker("b"), worker("c", prefill_tps=300)])
    assert speeds == [100, 200, 300]
    assert prefill_speeds([worker("a")]) == [100.0]
