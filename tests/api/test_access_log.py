"""The request id and the access log: in-process against a real Redis (no worker: the 503 path), and through
`inferq api` with a real scripted worker, where the line names the worker and a stream logs when it ends."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from api.app import create_app
from ops.redis_server import RedisServer
from queueing.catalog import DEFAULT_CATALOG, Catalog
from queueing.settings import Settings
from tests.fleet import Fleet, one_slot_scripted_fleet

CHAT = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}]}
ACCESS = "inferq.access"


def client(url: str, access_log: bool) -> TestClient:
    s = Settings(redis_url=url, no_worker_timeout=0.2, heartbeat_interval=0.1, access_log=access_log)
    return TestClient(create_app(s, Catalog.load(DEFAULT_CATALOG)))


@pytest.fixture
def http(redis_server: RedisServer, redis_client: redis.Redis) -> Iterator[TestClient]:
    with client(redis_server.url, access_log=True) as c:
        yield c


def access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == ACCESS]


def test_a_request_logs_one_line_with_its_id_model_status_and_duration(
    http: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", ACCESS)
    r = http.post("/v1/chat/completions?x=1", json=CHAT, headers={"x-request-id": "trace-42"})
    assert r.status_code == 503
    assert r.headers["x-request-id"] == "trace-42"
    [line] = access_lines(caplog)
    assert re.fullmatch(
        r'testclient:50000 - "POST /v1/chat/completions\?x=1 HTTP/1.1" 503 Service Unavailable '
        r"id=trace-42 model=smollm2-135m duration=\d+\.\d{3}s worker=-",
        line,
    ), line


def test_an_id_is_made_when_the_client_sent_none_or_an_unusable_one(
    http: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", ACCESS)
    plain = http.get("/v1/models")
    forged = http.get("/v1/models", headers={"x-request-id": 'a" 200 OK id=b'})
    ids = [plain.headers["x-request-id"], forged.headers["x-request-id"]]
    assert all(re.fullmatch(r"req_[0-9a-f]{32}", i) for i in ids) and ids[0] != ids[1]
    lines = access_lines(caplog)
    assert [f"id={i} model=- " in line for line, i in zip(lines, ids, strict=True)] == [True, True]
    assert all('"GET /v1/models HTTP/1.1" 200 OK' in line for line in lines)


def test_a_model_name_cannot_forge_a_log_line(http: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", ACCESS)
    forged = 'x\n127.0.0.1:1 - "GET / HTTP/1.1" 200 OK'
    r = http.post("/v1/chat/completions", json={**CHAT, "model": forged})
    assert r.status_code == 404
    [line] = access_lines(caplog)
    assert "\n" not in line and f"model={forged!r} " in line, line


def test_refused_requests_are_logged_too(
    redis_server: RedisServer, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", ACCESS)
    s = Settings(redis_url=redis_server.url, api_keys="k-1")
    with TestClient(create_app(s, Catalog.load(DEFAULT_CATALOG))) as c:
        r = c.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 401
    [line] = access_lines(caplog)
    assert " 401 Unauthorized id=" + r.headers["x-request-id"] + " " in line


def test_anthropic_request_id_is_the_same_id(http: TestClient) -> None:
    r = http.post(
        "/v1/messages",
        json={"model": "gpt-9", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
        headers={"x-request-id": "trace-7"},
    )
    assert r.status_code == 404
    assert r.headers["request-id"] == r.headers["x-request-id"] == "trace-7"
    assert r.json()["request_id"] == "trace-7"


def test_off_logs_nothing_yet_keeps_the_id(
    redis_server: RedisServer, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    with client(redis_server.url, access_log=False) as c:
        r = c.post("/v1/chat/completions", json=CHAT, headers={"x-request-id": "trace-9"})
    assert r.status_code == 503 and r.headers["x-request-id"] == "trace-9"
    assert access_lines(caplog) == []


def test_through_inferq_api_with_a_worker(tmp_path: Path) -> None:
    """The line names the worker, also for a stream that waited in the queue (whose own response start the
    queue-position layer dropped); a stream's line is written when it ended; uvicorn's own access log does
    not repeat it."""
    body = {"model": "scripted", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
    with (
        one_slot_scripted_fleet(tmp_path, "acc-w1", tokens_per_second=40) as f,
        ThreadPoolExecutor(1) as pool,
    ):
        # 100 tokens at 40 a second hold the one slot for 2.5 s: the stream waits behind them.
        first = pool.submit(
            httpx.post, f"{f.base_url}/v1/chat/completions", json={**body, "max_tokens": 100}, timeout=30
        )
        time.sleep(0.5)
        with httpx.stream(
            "POST", f"{f.base_url}/v1/chat/completions", json={**body, "stream": True}, timeout=30
        ) as stream:
            assert stream.status_code == 200
            sid = stream.headers["x-request-id"]
            lines = list(stream.iter_lines())
            assert any(line.startswith(": queue") for line in lines) and "data: [DONE]" in lines
        done = first.result()
        assert done.status_code == 200 and done.headers["x-inferq-worker"] == "acc-w1"
        deadline = time.monotonic() + 10
        while sid not in f.log("api") and time.monotonic() < deadline:
            time.sleep(0.05)
    logged = [line for line in f.log("api").splitlines() if '"POST /v1/chat/completions HTTP/1.1"' in line]
    assert len(logged) == 2, logged
    assert all(f" {ACCESS}: 127.0.0.1:" in line for line in logged)
    # The first ended first; the stream, logged when it ended, waited about 2 s for it, then took 0.5 s.
    for line, rid, least in zip(logged, [done.headers["x-request-id"], sid], [2.5, 2.0], strict=True):
        assert f" 200 OK id={rid} model=scripted " in line and line.endswith(" worker=acc-w1"), line
        seconds = float(re.findall(r"duration=(\d+\.\d+)s", line)[0])
        assert least <= seconds < 30, line


def test_api_processes_that_uvicorn_started_log_too(redis_server: RedisServer, tmp_path: Path) -> None:
    """`inferq api --workers 2`: uvicorn's processes get inferq's log handler (ops/cli.py); before, none of
    their inferq lines were written anywhere."""
    f = Fleet(redis_server.url, tmp_path)
    try:
        f.start_api("--workers", "2")
        for i in range(6):
            httpx.get(f"{f.base_url}/v1/models", headers={"x-request-id": f"many-{i}"})
        deadline = time.monotonic() + 10

        def logged() -> bool:
            # Both processes up (the first may have served all six while the second still started).
            log = f.log("api")
            started = set(re.findall(r"Started server process \[(\d+)\]", log))
            return all(f"id=many-{i} " in log for i in range(6)) and len(started) == 2

        while not logged() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(f" {ACCESS}: " in line for line in f.log("api").splitlines() if "id=many-" in line)
        assert sum("id=many-" in line for line in f.log("api").splitlines()) == 6
        assert len(set(re.findall(r"Started server process \[(\d+)\]", f.log("api")))) == 2
    finally:
        f.close()
