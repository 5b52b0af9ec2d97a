"""The HTTP tier in-process against a real Redis, with no worker: validation, errors, health."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from fastapi.testclient import TestClient

from api.app import create_app
from ops.redis_server import RedisServer
from queueing.catalog import DEFAULT_CATALOG, Catalog
from queueing.settings import Settings

CHAT = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}]}


def settings(url: str) -> Settings:
    return Settings(redis_url=url, no_worker_timeout=0.3, heartbeat_interval=0.1)


@pytest.fixture
def http(redis_server: RedisServer, redis_client: redis.Redis) -> Iterator[TestClient]:
    with TestClient(create_app(settings(redis_server.url), Catalog.load(DEFAULT_CATALOG))) as c:
        yield c


def error(resp: object) -> dict[str, object]:
    body = resp.json()  # type: ignore[attr-defined]
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stream_options": {"include_usage": "maybe"}}, "stream_options.include_usage"),
        ({"model": None}, "model"),
    ],
)
def test_schema_violations_are_400_with_param(http: TestClient, patch: dict[str, object], param: str) -> None:
    r = http.post("/v1/chat/completions", json={**CHAT, **patch})
    assert r.status_code == 400
    err = error(r)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param


def test_missing_field_names_it(http: TestClient) -> None:
    r = http.post("/v1/chat/completions", json={"model": "smollm2-135m"})
    assert r.status_code == 400 and error(r)["param"] == "messages"


def test_body_that_is_not_an_object_is_400(http: TestClient) -> None:
    r = http.post("/v1/chat/completions", content=b"[1, 2]", headers={"content-type": "application/json"})
    assert r.status_code == 400


def test_unknown_model_404(http: TestClient) -> None:
    r = http.post("/v1/chat/completions", json={**CHAT, "model": "gpt-9"})
    assert r.status_code == 404 and error(r)["code"] == "model_not_found"
    assert http.get("/v1/models/gpt-9").status_code == 404


def test_no_live_worker_is_503_after_the_configured_wait(http: TestClient) -> None:
    r = http.post("/v1/chat/completions", json={**CHAT, "some_future_field": 1})  # unknown fields accepted
    assert r.status_code == 503
    err = error(r)
    assert err["code"] == "no_worker_available" and "0.3s" in str(err["message"])


def test_models_empty_without_workers(http: TestClient) -> None:
    assert http.get("/v1/models").json() == {"object": "list", "data": []}


def test_unknown_route_uses_the_envelope(http: TestClient) -> None:
    r = http.get("/v1/nope")
    assert r.status_code == 404 and error(r)["type"] == "invalid_request_error"


def test_health_is_503_when_redis_is_down(redis_client: redis.Redis) -> None:
    server = RedisServer()
    with TestClient(create_app(settings(server.url), Catalog.load(DEFAULT_CATALOG))) as c:
        ok = c.get("/v1/system/health")
        assert ok.status_code == 200 and ok.json()["status"] == "no_workers"
        server.stop()
        down = c.get("/v1/system/health")
        assert down.status_code == 503
        assert down.json()["redis"] is False
        chat = c.post("/v1/chat/completions", json=CHAT)
        assert chat.status_code == 503 and error(chat)["code"] == "redis_unavailable"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"model": "smollm2-135m", "prompt": []}, "prompt"),
        ("/v1/completions", {"model": "smollm2-135m", "prompt": ["ok", ""]}, "prompt"),
        ("/v1/completions", {"model": "smollm2-135m", "prompt": "x", "logprobs": 21}, "logprobs"),
        ("/v1/completions", {"model": "smollm2-135m", "prompt": "x", "suffix": "y"}, "suffix"),
        (
            "/v1/completions",
            {"model": "smollm2-135m", "prompt": "x", "echo": True, "logprobs": 1},
            "logprobs",
        ),
        ("/v1/embeddings", {"model": "smollm2-135m", "input": []}, "input"),
        (
            "/v1/embeddings",
            {"model": "smollm2-135m", "input": "x", "encoding_format": "hex"},
            "encoding_format",
        ),
        ("/v1/embeddings", {"model": "smollm2-135m", "input": "x", "dimensions": 8}, "dimensions"),
        ("/v1/chat/completions", {**CHAT, "tool_choice": "required"}, "tool_choice"),
        ("/v1/chat/completions", {**CHAT, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {**CHAT, "n": 17}, "n"),
        ("/v1/chat/completions", {**CHAT, "response_format": {"type": "yaml"}}, "response_format.type"),
        (
            "/v1/chat/completions",
            {**CHAT, "tools": [{"type": "function", "function": {"name": "a b"}}]},
            "tools[0].function.name",
        ),
    ],
)
def test_new_endpoints_validate_with_param(
    http: TestClient, path: str, body: dict[str, object], param: str
) -> None:
    r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    assert error(r)["param"] == param


def test_embeddings_need_a_model_flagged_for_them(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    catalog = Catalog.load(DEFAULT_CATALOG)
    plain = catalog.models["smollm2-135m"].model_copy(update={"embeddings": False})
    with TestClient(create_app(settings(redis_server.url), Catalog(models={"smollm2-135m": plain}))) as c:
        r = c.post("/v1/embeddings", json={"model": "smollm2-135m", "input": "x"})
    assert r.status_code == 400 and error(r)["code"] == "model_not_supported"
