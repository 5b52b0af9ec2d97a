"""inferq_request_errors_total counts each error the API answers once, by its code and status: error
responses (routes, validation, the key check in middleware, Anthropic's envelope) and errors sent as events
in a stream that had started."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
from fastapi.testclient import TestClient

from api import errors
from api.app import create_app
from api.metrics import REGISTRY
from api.serving import sse
from ops.redis_server import RedisServer
from queueing.catalog import DEFAULT_CATALOG, Catalog
from queueing.settings import Settings

CHAT = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}]}


def count(code: str, status: int) -> float:
    found = REGISTRY.get_sample_value("inferq_request_errors_total", {"code": code, "status": str(status)})
    return found or 0.0


def total() -> float:
    return sum(
        s.value
        for metric in REGISTRY.collect()
        if metric.name == "inferq_request_errors"
        for s in metric.samples
        if s.name == "inferq_request_errors_total"
    )


def app(url: str, api_keys: str | None = None) -> TestClient:
    settings = Settings(redis_url=url, no_worker_timeout=0.3, api_keys=api_keys)
    return TestClient(create_app(settings, Catalog.load(DEFAULT_CATALOG)))


@pytest.fixture
def http(redis_server: RedisServer, redis_client: redis.Redis) -> Iterator[TestClient]:
    with app(redis_server.url) as c:
        yield c


@pytest.mark.parametrize(
    ("path", "body", "code", "status"),
    [
        ("/v1/chat/completions", {**CHAT, "model": "gpt-9"}, "model_not_found", 404),
        ("/v1/chat/completions", {**CHAT, "top_p": 1.5}, "invalid_value", 400),
        ("/v1/messages", {**CHAT, "model": "gpt-9", "max_tokens": 5}, "model_not_found", 404),
        ("/v1/chat/completions", CHAT, "no_worker_available", 503),
    ],
)
def test_an_error_response_counts_once_by_its_code(
    http: TestClient, path: str, body: dict[str, object], code: str, status: int
) -> None:
    before, before_total = count(code, status), total()
    assert http.post(path, json=body).status_code == status
    assert count(code, status) == before + 1 and total() == before_total + 1


def test_a_route_that_does_not_exist_counts_by_its_type(http: TestClient) -> None:
    before = count("invalid_request_error", 404)
    assert http.get("/v1/nope").status_code == 404
    assert count("invalid_request_error", 404) == before + 1


def test_successes_count_nothing(http: TestClient) -> None:
    before = total()
    assert http.get("/v1/models").status_code == 200 and http.get("/metrics").status_code == 200
    assert total() == before


def test_a_refusal_by_the_key_check_counts(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    with app(redis_server.url, api_keys="sk-1") as c:
        before = count("invalid_api_key", 401)
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 401
        assert count("invalid_api_key", 401) == before + 1


def test_an_error_in_a_started_stream_counts_once() -> None:
    async def frames() -> AsyncIterator[sse.Frame]:
        yield sse.Frame("first")
        raise errors.timed_out(2)

    async def close() -> None:
        return None

    async def main() -> list[str]:
        framing = sse.Framing(error=lambda exc: [sse.Frame(str(exc.code))], done=sse.DONE)
        return [str(e.data) async for e in sse._framed(frames(), framing, close)]

    before = count("timeout", 504)
    assert asyncio.run(main()) == ["first", "timeout", "[DONE]"]
    assert count("timeout", 504) == before + 1
