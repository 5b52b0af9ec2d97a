"""Hostile bodies, in-process against a real Redis: each class of input that used to reach a 500 (nesting
depth, a lone UTF-16 surrogate, size, a deep JSON schema, a deep batch line, 10,000 unknown fields) is a 4xx
in the protocol's own envelope, on every route that takes a JSON body.

A worker is announced in the registry (no process behind it), so that a request the limits let through
would be put on the queue: what is refused must be refused before any job exists.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api.adapters.responses_items import COMPACTION_PREFIX
from api.app import create_app
from api.protocol import base
from ops.redis_server import RedisServer
from queueing import keys, registry
from queueing.catalog import DEFAULT_CATALOG, Catalog
from queueing.settings import Settings
from tests.api.test_auth import all_routes

MODEL = "smollm2-135m"
DEPTH = 64
MAX_BODY = 1_000_000
JSON = {"content-type": "application/json"}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
MESSAGES = {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.fixture(scope="module")
def app(redis_server: RedisServer) -> FastAPI:
    settings = Settings(
        redis_url=redis_server.url,
        no_worker_timeout=0.3,
        heartbeat_interval=600,
        load_timeout=0.3,
        request_timeout=0.5,
        max_json_depth=DEPTH,
        max_body_bytes=MAX_BODY,
    )
    return create_app(settings, Catalog.load(DEFAULT_CATALOG))


@pytest.fixture(scope="module")
def http(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def fleet(redis_client: redis.Redis) -> redis.Redis:
    """A registered worker for the model, so the API would enqueue; the client to look for jobs with."""
    info = registry.WorkerInfo(
        name="ghost", host="h", pid=1, engine="scripted", models=[MODEL], concurrency=4
    )
    registry.announce(redis_client, info, ttl=600)
    return redis_client


def no_jobs(client: redis.Redis) -> None:
    assert client.keys(f"{keys.JOB_PREFIX}*") == []
    assert sum(client.llen(k) for k in keys.queue_list_keys(keys.model_queue(MODEL))) == 0


def json_routes(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path) of every HTTP route that may take a body, path parameters filled in."""
    return [(m, path) for m, path in all_routes(app) if m in ("POST", "PUT", "PATCH", "DELETE")]


def openai_error(resp: Any) -> dict[str, Any]:
    body = resp.json()
    assert set(body) == {"error"}, body
    return dict(body["error"])


def refusal(resp: Any, path: str) -> tuple[str, str | None, str | None]:
    """(message, param, code) of a 400 in the envelope ``path``'s protocol answers with."""
    assert resp.status_code == 400, (path, resp.status_code, resp.text[:300])
    if path.startswith("/v1/messages"):
        body = resp.json()
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error", body
        assert resp.headers["request-id"] == body["request_id"]
        return body["error"]["message"], None, None
    err = openai_error(resp)
    assert err["type"] == "invalid_request_error"
    return err["message"], err["param"], err["code"]


def test_every_json_route_refuses_a_body_nested_100000_deep(app: FastAPI, http: TestClient) -> None:
    routes = json_routes(app)
    assert ("POST", "/v1/responses/compact") in routes and ("POST", "/v1/messages/count_tokens") in routes
    assert any(p.startswith("/v1/system/") for _, p in routes), "management writes are swept too"
    for method, path in routes:
        r = http.request(method, path, content=b'{"model": "m", "x": ' + DEEP + b"}", headers=JSON)
        message, _, code = refusal(r, path)
        assert "100001 levels" in message and f"at most {DEPTH}" in message, (path, message)
        assert code in (None, "json_too_deep")


def nested(levels: int) -> Any:
    value: Any = 0
    for _ in range(levels):
        value = [value]
    return value


def test_depth_limit_is_exact_and_ignores_brackets_inside_strings(http: TestClient) -> None:
    # An invalid top_p behind the nesting shows how far a body got: to validation, or not past the limits.
    tricky = '[[[[\\"{{{{' * 100  # brackets and an escaped quote inside a string are text, not nesting
    # The body object is the first level.
    at_limit = {**CHAT, "messages": [{"role": "user", "content": tricky}], "x": nested(DEPTH - 1), "top_p": 5}
    _, param, _ = refusal(http.post("/v1/chat/completions", json=at_limit), "/v1/chat/completions")
    assert param == "top_p"
    over = {**at_limit, "x": nested(DEPTH)}
    _, _, code = refusal(http.post("/v1/chat/completions", json=over), "/v1/chat/completions")
    assert code == "json_too_deep"


def test_every_json_route_refuses_a_lone_surrogate(app: FastAPI, http: TestClient) -> None:
    for method, path in json_routes(app):
        r = http.request(method, path, content=b'{"model": "m", "x": "a\\ud800b"}', headers=JSON)
        message, _, code = refusal(r, path)
        assert "surrogate" in message and "`x`" in message, (path, message)
        assert code in (None, "invalid_encoding")


@pytest.mark.parametrize(
    ("path", "body", "where"),
    [
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "\ud800"}]}, None),
        ("/v1/chat/completions", {**CHAT, "stop": ["ok", "\udfff"]}, "stop[1]"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi \udbff there"}, "prompt"),
        ("/v1/embeddings", {"model": MODEL, "input": ["fine", "\ud800"]}, "input[1]"),
        ("/v1/responses", {"model": MODEL, "input": "x\ud800"}, "input"),
        ("/v1/messages", {**MESSAGES, "messages": [{"role": "user", "content": "\ud800"}]}, None),
        ("/v1/messages", {**MESSAGES, "system": "\udc00"}, "system"),
    ],
)
def test_a_lone_surrogate_is_a_400_naming_the_field_and_no_job(
    http: TestClient, fleet: redis.Redis, path: str, body: dict[str, Any], where: str | None
) -> None:
    # ensure_ascii writes the lone surrogate as the escape a client would send.
    raw = json.dumps(body).encode()
    assert b"\\ud" in raw or b"\\udc" in raw
    message, param, code = refusal(http.post(path, content=raw, headers=JSON), path)
    where = where or "messages[0].content"
    assert f"`{where}`" in message
    if not path.startswith("/v1/messages"):
        assert (param, code) == (where, "invalid_encoding")
    no_jobs(fleet)


def test_surrogate_pairs_and_escaped_backslashes_are_text(http: TestClient) -> None:
    # "😀" as an escaped pair, and a literal backslash followed by "ud800": both valid, so validation is
    # reached (and refuses the invalid top_p).
    raw = (
        b'{"model": "%s", "messages": [{"role": "user", "content": "\\ud83d\\ude00 \\\\ud800"}], "top_p": 5}'
    )
    _, param, _ = refusal(http.post("/v1/chat/completions", content=raw % MODEL.encode(), headers=JSON), "")
    assert param == "top_p"


def test_raw_surrogate_bytes_are_not_utf8(http: TestClient) -> None:
    # json.loads decodes bytes with surrogatepass: the encoded surrogate ED A0 80 would become "\ud800".
    raw = b'{"model": "m", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}'
    for path in ("/v1/chat/completions", "/v1/messages"):
        message, _, code = refusal(http.post(path, content=raw, headers=JSON), path)
        assert "not UTF-8" in message and code in (None, "invalid_encoding")


def test_a_body_over_the_size_limit_is_413_in_each_envelope(http: TestClient) -> None:
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * MAX_BODY}]}
    r = http.post("/v1/chat/completions", json=big)
    assert r.status_code == 413 and openai_error(r)["code"] == "request_too_large"
    r = http.post("/v1/messages", json={**MESSAGES, "messages": big["messages"]})
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no content-length: counted as it arrives
        yield b'{"model": "m", "x": "'
        for _ in range(MAX_BODY // 65536 + 1):
            yield b"x" * 65536
        yield b'"}'

    r = http.post("/v1/chat/completions", content=chunks(), headers=JSON)
    assert r.status_code == 413


def deep_schema(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


SCHEMA = deep_schema(300)
FUNCTION = {"name": "f", "parameters": SCHEMA}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (
            "/v1/chat/completions",
            {
                **CHAT,
                "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}},
            },
        ),
        ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": FUNCTION}]}),
        (
            "/v1/responses",
            {
                "model": MODEL,
                "input": "hi",
                "text": {"format": {"type": "json_schema", "name": "x", "schema": SCHEMA}},
            },
        ),
        ("/v1/responses", {"model": MODEL, "input": "hi", "tools": [{"type": "function", **FUNCTION}]}),
        ("/v1/messages", {**MESSAGES, "tools": [{"name": "f", "input_schema": SCHEMA}]}),
    ],
)
def test_a_schema_nested_300_deep_is_refused_before_any_job(
    http: TestClient, fleet: redis.Redis, path: str, body: dict[str, Any]
) -> None:
    message, _, code = refusal(http.post(path, json=body), path)
    assert "levels of arrays and objects" in message and code in (None, "json_too_deep")
    no_jobs(fleet)


def batch_of(http: TestClient, line: bytes) -> Any:
    up = http.post(
        "/v1/files", files={"file": ("in.jsonl", line, "application/jsonl")}, data={"purpose": "batch"}
    )
    assert up.status_code == 200, up.text
    create = {
        "input_file_id": up.json()["id"],
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    return http.post("/v1/batches", json=create)


def batch_line(body: bytes) -> bytes:
    return b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": ' + body + b"}\n"


def test_a_batch_line_nested_100000_deep_is_a_bad_line(http: TestClient, fleet: redis.Redis) -> None:
    good = batch_line(json.dumps(CHAT).encode()).replace(b'"a"', b'"b"')
    r = batch_of(http, good + batch_line(b'{"model": "m", "x": ' + DEEP + b"}"))
    message, param, code = refusal(r, "/v1/batches")
    assert (param, code) == ("input_file_id", "invalid_batch_input")
    assert "1 invalid line(s): line 2 nests 100002 levels" in message
    no_jobs(fleet)


def test_a_batch_line_with_a_lone_surrogate_is_a_bad_line(http: TestClient, fleet: redis.Redis) -> None:
    body = json.dumps({**CHAT, "messages": [{"role": "user", "content": "\ud800"}]}).encode()
    message, param, _ = refusal(batch_of(http, batch_line(body)), "/v1/batches")
    assert (
        param == "input_file_id"
        and "line 1 holds a lone UTF-16 surrogate at `body.messages[0].content`" in message
    )
    no_jobs(fleet)


def test_hostile_websocket_messages_get_error_events_and_the_connection_lives(
    http: TestClient, fleet: redis.Redis
) -> None:
    create = {"type": "response.create", "model": MODEL, "input": "hi"}
    with http.websocket_connect("/v1/responses") as ws:
        ws.send_text('{"type": "response.create", "x": ' + DEEP.decode() + "}")
        deep = json.loads(ws.receive_text())
        ws.send_text(json.dumps({**create, "input": "\ud800"}))
        lone = json.loads(ws.receive_text())
        schema = {"format": {"type": "json_schema", "name": "x", "schema": SCHEMA}}
        ws.send_text(json.dumps({**create, "text": schema}))
        deep_schema_event = json.loads(ws.receive_text())
        ws.send_text(json.dumps({**create, "temperature": 9}))
        after = json.loads(ws.receive_text())
    assert deep["type"] == "error" and deep["status"] == 400 and deep["error"]["code"] == "json_too_deep"
    assert lone["status"] == 400 and lone["error"]["code"] == "invalid_encoding"
    assert lone["error"]["param"] == "input"
    assert deep_schema_event["status"] == 400 and deep_schema_event["error"]["code"] == "json_too_deep"
    assert after["status"] == 400 and after["error"]["param"] == "temperature"  # still served
    no_jobs(fleet)


def test_10000_unknown_fields_write_one_log_line_and_are_remembered_boundedly(
    http: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    base._seen_unknown.clear()
    caplog.set_level(logging.INFO, logger="api.protocol.base")

    def send(prefix: str) -> None:
        extra = {f"{prefix}{i}": i for i in range(10_000)}
        r = http.post("/v1/chat/completions", json={**CHAT, **extra, "top_p": 5})  # 400 after validation
        assert r.status_code == 400 and openai_error(r)["param"] == "top_p"

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "api.protocol.base"]

    send("a")
    assert len(lines()) <= 2, lines()[:3]
    assert "and 9995 more" in lines()[0]
    caplog.clear()
    send("a")  # the same names: logged once per name, so nothing new
    send("b")  # new names, but the set is full: nothing more, and the set does not grow
    assert lines() == []
    assert len(base._seen_unknown) == base._MAX_REMEMBERED


def test_unknown_fields_are_logged_once_per_name(http: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    base._seen_unknown.clear()
    caplog.set_level(logging.INFO, logger="api.protocol.base")
    for _ in range(3):
        r = http.post("/v1/chat/completions", json={**CHAT, "future_field": 1, "top_p": 5})
        assert r.status_code == 400
    logged = [r.getMessage() for r in caplog.records if r.name == "api.protocol.base"]
    assert logged == ["ChatCompletionRequest: ignoring unknown field 'future_field'"]


MANY = [{"role": "user", "content": "x"}] * 10_001
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {**CHAT, "messages": MANY}, "messages"),
        ("/v1/chat/completions", {**CHAT, "tools": [TOOL] * 129}, "tools"),
        ("/v1/chat/completions", {**CHAT, "stop": ["s"] * 5}, "stop"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": ["s"] * 5}, "stop"),
        ("/v1/embeddings", {"model": MODEL, "input": ["x"] * 2049}, "input"),
        ("/v1/responses", {"model": MODEL, "input": MANY}, "input"),
        ("/v1/responses/compact", {"model": MODEL, "input": MANY}, "input"),
        ("/v1/messages", {**MESSAGES, "messages": MANY}, "messages"),
        ("/v1/messages", {**MESSAGES, "stop_sequences": ["s"] * 65}, "stop_sequences"),
        ("/v1/messages/count_tokens", {"model": MODEL, "messages": MANY}, "messages"),
    ],
)
def test_counts_over_their_limit_are_a_400_and_no_job(
    http: TestClient, fleet: redis.Redis, path: str, body: dict[str, Any], param: str
) -> None:
    message, got, code = refusal(http.post(path, json=body), path)
    assert f"`{param}`" in message or got == param, message
    if not path.startswith("/v1/messages"):
        assert (got, code) == (param, "invalid_value")
    no_jobs(fleet)


def test_json_inside_strings_is_parsed_safely(http: TestClient, fleet: redis.Redis) -> None:
    """Strings the server itself parses as JSON (a compaction item, earlier tool-call arguments) may nest
    any depth: the body limit cannot see inside a string."""
    deep = DEEP.decode()
    encoded = [
        base64.b64encode(c.encode()).decode() for c in (COMPACTION_PREFIX + deep, COMPACTION_PREFIX + "[1]")
    ]
    # Not base64 at all: characters outside ASCII (a fuzzer found this one a 500), and bytes not UTF-8.
    for content in (*encoded, "\xff\u00e9\U0001f600", base64.b64encode(b"\xff\xfe").decode()):
        item = {"type": "compaction", "encrypted_content": content}
        r = http.post("/v1/responses", json={"model": MODEL, "input": [item]})
        _, param, code = refusal(r, "/v1/responses")
        assert (param, code) == ("input", "invalid_encrypted_content")
    no_jobs(fleet)
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": deep}}
    history = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c", "content": "r"},
    ]
    r = http.post("/v1/chat/completions", json={**CHAT, "messages": history, "tools": [TOOL]})
    # The arguments go to the model as the text they are: the job is queued (and the ghost never answers).
    assert r.status_code == 504, r.text[:300]
    assert len(fleet.keys(f"{keys.JOB_PREFIX}*")) == 1
