"""The routing strategies and failover, on three real worker processes whose scripted engine generates at
1x, 2x and 4x speed (routing is what is under test here, not the model)."""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis

from ops.redis_server import RedisServer, free_port
from queueing import keys
from queueing._codec import text
from tests.fleet import Fleet, write_catalog

pytestmark = pytest.mark.e2e


# name: (tokens per second, weight). Each worker runs two jobs at once.
WORKERS = {"r1": (20, 1), "r2": (40, 2), "r4": (80, 3)}
LIMIT = 2


def start_fleet(redis_url: str, tmp: Path) -> Fleet:
    catalog = tmp / "models.yaml"
    write_catalog(catalog)
    fleet = Fleet(redis_url, tmp, INFERQ_MODELS_FILE=str(catalog))
    fleet.start_api()
    for name, (speed, weight) in WORKERS.items():
        args = ["--engine", "scripted", "--concurrency", str(LIMIT), "--weight", str(weight)]
        env = {"INFERQ_SCRIPTED_TOKENS_PER_SECOND": str(speed)}
        fleet.start_worker(name, "scripted", wait=False, args=args, env=env)
    for name in WORKERS:
        fleet.wait_listed(name)
    return fleet


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    server = RedisServer()
    f = start_fleet(server.url, tmp_path_factory.mktemp("routing"))
    try:
        yield f
    finally:
        f.close()
        server.stop()


def ask(fleet: Fleet, routing: str | None, max_tokens: int = 1) -> httpx.Response:
    headers = {"x-inferq-routing": routing} if routing else {}
    body = {"model": "scripted", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}
    r = httpx.post(f"{fleet.base_url}/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    return r


def served_by(
    fleet: Fleet, routing: str | None, n: int, max_tokens: int = 1, parallel: int = 6
) -> Counter[str]:
    with ThreadPoolExecutor(parallel) as pool:
        responses = list(pool.map(lambda _: ask(fleet, routing, max_tokens), range(n)))
    return Counter(r.headers["x-inferq-worker"] for r in responses)


def test_workers_endpoint_shows_the_registry(fleet: Fleet) -> None:
    body = httpx.get(f"{fleet.base_url}/v1/system/workers").json()
    by_name = {w["name"]: w for w in body["data"]}
    assert set(by_name) == set(WORKERS)
    for name, (_, weight) in WORKERS.items():
        w = by_name[name]
        assert w["engine"] == "scripted"
        assert w["platform"] and w["host"]
        assert w["models"] == ["scripted"]
        assert w["model_states"]["scripted"]["state"] == "ready"
        assert (w["concurrency"], w["weight"], w["fresh"]) == (LIMIT, weight, True)


def test_round_robin_spreads_evenly(fleet: Fleet) -> None:
    counts = served_by(fleet, "round_robin", 30, parallel=1)
    assert set(counts) == set(WORKERS)
    assert all(9 <= c <= 11 for c in counts.values()), counts


def test_weighted_follows_the_weights(fleet: Fleet) -> None:
    counts = served_by(fleet, "weighted", 300)
    total = sum(w for _, w in WORKERS.values())
    for name, (_, weight) in WORKERS.items():
        expected = 300 * weight / total
        assert abs(counts[name] - expected) <= 0.1 * expected, counts


def test_least_connections_fills_free_slots_first(fleet: Fleet) -> None:
    # Six long requests at once into six slots: a worker at its limit never gets one while another has
    # room, so each worker gets exactly two (and the slowest, r1, needs 5 s for one: none is free again
    # before all six are placed).
    counts = served_by(fleet, "least_connections", 3 * LIMIT, max_tokens=100, parallel=3 * LIMIT)
    assert counts == {name: LIMIT for name in WORKERS}, counts


def held_by(r: redis.Redis, worker: str) -> tuple[int, int]:
    """How many jobs ``worker`` runs (claimed) and how many wait in its own queue for it."""
    return int(r.scard(keys.worker_jobs_key(worker))), int(r.scard(keys.worker_assigned_key(worker)))


def jobs_of(r: redis.Redis, worker: str) -> tuple[set[str], set[str]]:
    """The ids of the jobs ``worker`` runs and of those waiting in its own queue, from its job sets."""
    return (
        {text(m) for m in r.smembers(keys.worker_jobs_key(worker))},
        {text(m) for m in r.smembers(keys.worker_assigned_key(worker))},
    )


def record(r: redis.Redis, job: str) -> dict[str, str]:
    return {text(k): text(v) for k, v in r.hgetall(keys.job_key(job)).items()}


def records(fleet: Fleet, responses: list[httpx.Response]) -> list[dict[str, str]]:
    """The job record of each response (a chat completion's id is its job's id)."""
    with redis.Redis.from_url(fleet.redis_url) as r:
        return [record(r, resp.json()["id"]) for resp in responses]


def test_least_connections_overflow_waits_on_the_shared_queue(fleet: Fleet) -> None:
    # Six requests of 120 tokens fill the six slots (two per worker); two more, sent once all six run, are
    # beyond every limit: they wait on the model's shared queue, routed to nobody, and the first worker with
    # a free slot takes them. r4 (80 tokens/s) frees both of its slots after 1.5 s, r2 (40) after 3 s, r1
    # (20) after 6 s, so both go to r4 — exactly.
    # (The two are sent after the six run because a worker whose routed job has not reached it yet may take
    # a shared-queue job first: kombu's consumer rotates between its queues.)
    tokens, overflow = 120, 2
    with ThreadPoolExecutor(3 * LIMIT + overflow) as pool, redis.Redis.from_url(fleet.redis_url) as r:
        first = [pool.submit(ask, fleet, "least_connections", tokens) for _ in range(3 * LIMIT)]
        deadline = time.monotonic() + 10
        while [held_by(r, name) for name in WORKERS] != [(LIMIT, 0)] * len(WORKERS):
            assert time.monotonic() < deadline, [held_by(r, name) for name in WORKERS]
            time.sleep(0.01)
        late = [pool.submit(ask, fleet, "least_connections", tokens) for _ in range(overflow)]
        responses = [f.result(timeout=60) for f in [*first, *late]]
    counts = Counter(resp.headers["x-inferq-worker"] for resp in responses)
    fastest = max(WORKERS, key=lambda name: WORKERS[name][0])
    expected = {name: LIMIT + (overflow if name == fastest else 0) for name in WORKERS}
    assert counts == expected, counts
    assert all(resp.json()["usage"]["completion_tokens"] == tokens for resp in responses)
    # The six ran where routing sent them; the two were routed to no worker and ran on r4.
    for i, (resp, rec) in enumerate(zip(responses, records(fleet, responses), strict=True)):
        assert rec["worker"] == resp.headers["x-inferq-worker"], rec
        assert rec.get("routed_to") == (rec["worker"] if i < 3 * LIMIT else None), rec
        assert (rec["state"], rec["attempt"]) == ("done", "1"), rec


def test_fastest_response_prefers_the_fast_worker(fleet: Fleet) -> None:
    counts = served_by(fleet, "fastest_response", 40, max_tokens=4, parallel=1)
    assert counts["r4"] >= 2 * counts["r1"], counts


def test_random_reaches_every_worker(fleet: Fleet) -> None:
    counts = served_by(fleet, "random", 30)
    assert set(counts) == set(WORKERS), counts


def test_queue_mode_keeps_every_worker_busy(fleet: Fleet) -> None:
    counts = served_by(fleet, None, 12, max_tokens=20, parallel=12)
    assert set(counts) == set(WORKERS), counts


def test_metrics_show_requests_workers_and_queues(fleet: Fleet) -> None:
    ask(fleet, "round_robin", max_tokens=3)
    time.sleep(1.0)  # the worker's counters reach the registry with its next heartbeat
    text = httpx.get(f"{fleet.base_url}/metrics").text
    assert 'inferq_http_requests_total{route="/v1/chat/completions",status="200"}' in text
    tokens = {
        line.split('worker="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("inferq_worker_tokens_total{")
    }
    assert set(tokens) == set(WORKERS) and sum(tokens.values()) >= 3
    assert 'inferq_queue_depth{queue="inferq.model.scripted",priority="interactive"} 0' in text
    assert 'inferq_queue_depth{queue="inferq.model.scripted",priority="batch"} 0' in text
    assert 'inferq_model_loaded{worker="r1",model="scripted",state="ready"} 1' in text
    # The scaling signals: nothing left running or waiting, and the workers measured (a rate, so seconds).
    assert 'inferq_model_in_flight{model="scripted"} 0' in text
    assert 'inferq_model_queue_depth{model="scripted"} 0' in text
    assert 'inferq_token_backlog_seconds{model="scripted"} 0.0' in text


def test_unknown_routing_header_is_400(fleet: Fleet) -> None:
    body = {"model": "scripted", "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(
        f"{fleet.base_url}/v1/chat/completions",
        json=body,
        headers={"x-inferq-routing": "fastest"},
        timeout=10,
    )
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "x-inferq-routing"


def test_two_api_processes_share_one_round_robin(fleet: Fleet) -> None:
    port = free_port()
    second = fleet._spawn(["api", "--port", str(port)], "api2.log")
    try:
        urls = [fleet.base_url, f"http://127.0.0.1:{port}"]
        fleet._until(lambda: httpx.get(f"{urls[1]}/v1/system/health").status_code == 200, "second api")
        body = {"model": "scripted", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        headers = {"x-inferq-routing": "round_robin"}
        counts = Counter(
            httpx.post(f"{urls[i % 2]}/v1/chat/completions", json=body, headers=headers, timeout=60).headers[
                "x-inferq-worker"
            ]
            for i in range(30)
        )
    finally:
        second.terminate()
        second.wait(timeout=15)
    assert all(9 <= counts[name] <= 11 for name in WORKERS), counts


def test_killed_worker_leaves_and_its_jobs_complete_elsewhere(tmp_path: Path) -> None:
    server = RedisServer()
    fleet = start_fleet(server.url, tmp_path)
    r = redis.Redis.from_url(server.url)
    try:
        # Round-robin puts three of nine long jobs (3 s each on r1) on r1: two running, one waiting in its
        # own queue.
        with ThreadPoolExecutor(9) as pool:
            futures = [pool.submit(ask, fleet, "round_robin", 60) for _ in range(9)]
            deadline = time.monotonic() + 15
            running, waiting = jobs_of(r, "r1")
            # (The waiting job's message reaches r1's queue just after routing recorded it.)
            queued = keys.queue_list_keys(keys.worker_queue("r1"))
            while (len(running), len(waiting), sum(r.llen(k) for k in queued)) != (LIMIT, 1, 1):
                assert time.monotonic() < deadline, f"r1 never held its three jobs: {running}, {waiting}"
                time.sleep(0.02)
                running, waiting = jobs_of(r, "r1")
            # Before the kill: the records say so too (r1 runs two as attempt 1; one waits for it).
            for job in running:
                rec = record(r, job)
                assert (rec["state"], rec["worker"], rec["attempt"]) == ("running", "r1", "1"), rec
            for job in waiting:
                rec = record(r, job)
                assert (rec["state"], rec["routed_to"], rec["attempt"]) == ("queued", "r1", "1"), rec
            fleet.kill_worker("r1", signal.SIGKILL)
            killed_at = time.monotonic()
            gone = None
            while gone is None and time.monotonic() - killed_at < 5:
                names = [w["name"] for w in httpx.get(f"{fleet.base_url}/v1/system/workers").json()["data"]]
                gone = time.monotonic() - killed_at if "r1" not in names else None
                time.sleep(0.05)
            responses = [f.result(timeout=60) for f in futures]
        # Two heartbeat intervals (0.5 s each in test fleets), plus the time one poll takes.
        assert gone is not None and gone <= 1.0 + 0.3, gone
        assert all(r.headers["x-inferq-worker"] != "r1" for r in responses)
        # r1's three jobs are among the answered ones, each whole, done by its second attempt elsewhere.
        by_id = {resp.json()["id"]: resp for resp in responses}
        assert running | waiting <= set(by_id), (running, waiting, set(by_id))
        for job in running | waiting:
            rec = record(r, job)
            served = by_id[job].headers["x-inferq-worker"]
            assert (rec["state"], rec["attempt"], rec["worker"]) == ("done", "2", served), rec
            assert served in {"r2", "r4"}
            assert by_id[job].json()["usage"]["completion_tokens"] == 60
        after = served_by(fleet, "round_robin", 10, parallel=1)
        assert "r1" not in after and sum(after.values()) == 10
    finally:
        r.close()
        fleet.close()
        server.stop()
