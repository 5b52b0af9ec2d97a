"""Affinity routing through two real SmolLM2 llama.cpp workers (one thread each): a conversation stays on the
worker whose engine holds its history while the fleet is balanced, spills to the other when it is not, and
moves when its worker dies; the cache's counts show on /v1/system/workers and /metrics."""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from ops.redis_server import RedisServer
from tests.fleet import Fleet

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m"
WORKERS = ("a1", "a2")
# A system prompt of a few hundred tokens: several whole prefix blocks, a prefill that shows.
SYSTEM = "You are a helpful assistant for a library. Answer briefly and politely. " * 12


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, catalog_file: Path) -> Iterator[Fleet]:
    server = RedisServer()
    f = Fleet(
        server.url,
        tmp_path_factory.mktemp("affinity"),
        INFERQ_MODELS_FILE=str(catalog_file),
        INFERQ_ROUTING="affinity",
        INFERQ_LLAMACPP_THREADS="1",
    )
    try:
        f.start_api()
        for name in WORKERS:
            f.start_worker(name, MODEL, wait=False)
        for name in WORKERS:
            f.wait_listed(name)
        yield f
    finally:
        f.close()
        server.stop()


def ask(fleet: Fleet, messages: list[dict[str, str]], **extra: Any) -> httpx.Response:
    headers = extra.pop("headers", {})
    body = {"model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 0, **extra}
    r = httpx.post(f"{fleet.base_url}/v1/chat/completions", json=body, headers=headers, timeout=120)
    assert r.status_code == 200, r.text
    return r


def conversation(fleet: Fleet, turns: int, **extra: Any) -> list[httpx.Response]:
    """One conversation, turn after turn, each sending the whole history back."""
    messages = [{"role": "system", "content": SYSTEM}]
    replies = []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Question {turn}: which books are open today?"})
        r = ask(fleet, messages, **extra)
        replies.append(r)
        messages.append({"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]})
    return replies


def served(r: httpx.Response) -> str:
    return r.headers["x-inferq-worker"]


def cached(r: httpx.Response) -> int:
    return int(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])


def test_a_conversation_stays_on_its_worker_and_hits_its_cache(fleet: Fleet) -> None:
    # Two conversations in turn, by prefix alone and by an explicit session: each keeps its worker, and
    # every turn after the first finds its history in that worker's cache.
    by_prefix = conversation(fleet, 3)
    by_session = conversation(fleet, 3, prompt_cache_key="reader-42")
    for replies in (by_prefix, by_session):
        assert len({served(r) for r in replies}) == 1, [served(r) for r in replies]
        for r in replies[1:]:
            assert cached(r) > 100, r.json()["usage"]


def test_a_session_header_keeps_a_conversation_together(fleet: Fleet) -> None:
    # Each turn alone (no shared text), the session header is all that ties them.
    headers = {"x-session-id": "agent-7"}
    first = ask(fleet, [{"role": "user", "content": "Hello."}], headers=headers)
    for question in ("What time is it?", "Where are you?"):
        r = ask(fleet, [{"role": "user", "content": question}], headers=headers)
        assert served(r) == served(first)


def test_a_busy_worker_spills_the_conversation_to_the_idle_one(fleet: Fleet) -> None:
    first = ask(fleet, [{"role": "user", "content": "Count to ten."}], prompt_cache_key="burst")
    # Six turns of the session at once: the first three wait for its worker (one slot), the rest would make
    # it three jobs ahead of an idle worker, beyond the bound (more than 2, and more than twice as many).
    msgs = [{"role": "user", "content": "Count to ten."}]
    with ThreadPoolExecutor(6) as pool:
        replies = list(
            pool.map(lambda _: ask(fleet, msgs, prompt_cache_key="burst", max_tokens=24), range(6))
        )
    workers = [served(r) for r in replies]
    assert set(workers) == set(WORKERS), workers
    assert workers.count(served(first)) >= 3, workers


def test_the_workers_endpoint_and_metrics_show_each_cache(fleet: Fleet) -> None:
    data = httpx.get(f"{fleet.base_url}/v1/system/workers").json()["data"]
    caches = {w["name"]: w["prompt_cache"] for w in data}
    assert set(caches) == set(WORKERS)
    assert sum(c["hits"] for c in caches.values()) >= 4
    for c in caches.values():
        assert c["entries"] >= 1 and c["bytes"] > 0
        assert c["hit_rate"] is not None and 0 <= c["hit_rate"] <= 1
    assert all(w["ewma_prefill_tps"] for w in data)
    # Read after the endpoint: a heartbeat in between can only have added hits.
    text = httpx.get(f"{fleet.base_url}/metrics").text
    found = re.findall(r'inferq_worker_prompt_cache_hits_total\{worker="(a\d)"[^}]*\} ([0-9.]+)', text)
    hits = {name: int(float(v)) for name, v in found}
    assert set(hits) == set(WORKERS)
    assert all(hits[n] >= c["hits"] for n, c in caches.items()), (hits, caches)


def test_a_seeded_request_gives_the_same_text_with_or_without_a_cache_hit(fleet: Fleet) -> None:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name a colour."}]
    seeded = {"seed": 7, "temperature": 0.9, "max_tokens": 12, "prompt_cache_key": "seeded"}
    cold = ask(fleet, messages, **seeded)
    warm = ask(fleet, messages, **seeded)  # the same worker, whose cache holds this whole prompt now
    assert served(warm) == served(cold)
    assert warm.json()["choices"][0]["message"]["content"] == cold.json()["choices"][0]["message"]["content"]
    # A seeded request evaluates its whole prompt (README: Affinity routing): nothing comes from the cache.
    assert cached(warm) == 0


def test_a_conversation_moves_when_its_worker_dies(fleet: Fleet) -> None:
    first = conversation(fleet, 1, prompt_cache_key="moving")[0]
    fleet.kill_worker(served(first))
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Question 0: which books are open today?"},
        {"role": "assistant", "content": first.json()["choices"][0]["message"]["content"]},
        {"role": "user", "content": "And tomorrow?"},
    ]
    survivor = next(w for w in WORKERS if w != served(first))
    r = ask(fleet, messages, prompt_cache_key="moving")
    assert served(r) == survivor
