"""Managed API keys across two real API processes on one Redis (api/keystore.py, api/ratelimit.py): created
and revoked by the admin, required from the first one on, their limits held across both processes with
OpenAI's headers, and what one key stores out of another's reach."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from ops.redis_server import RedisServer
from tests.fleet import Fleet, write_catalog

pytestmark = pytest.mark.e2e

ADMIN = "admin-secret"
# The limits count over windows this long (INFERQ_RATE_LIMIT_WINDOW): a test sees one reset in seconds.
WINDOW = 4.0
CHAT = {"model": "scripted", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}


@pytest.fixture(scope="module")
def fleets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Fleet, Fleet]]:
    server = RedisServer()
    tmp = tmp_path_factory.mktemp("keys")
    catalog = write_catalog(tmp / "models.yaml")
    env = {
        "INFERQ_MODELS_FILE": str(catalog),
        "INFERQ_ADMIN_KEY": ADMIN,
        "INFERQ_RATE_LIMIT_WINDOW": str(WINDOW),
    }
    (tmp / "a").mkdir()
    (tmp / "b").mkdir()
    # Both API processes share one files folder, as processes of one machine do.
    a = Fleet(server.url, tmp / "a", INFERQ_FILES_DIR=str(tmp / "files"), **env)
    b = Fleet(server.url, tmp / "b", INFERQ_FILES_DIR=str(tmp / "files"), **env)
    try:
        a.start_api()
        b.start_api()
        a.start_worker("k-scripted", "scripted", env={"INFERQ_SCRIPTED_TOKENS_PER_SECOND": "2000"})
        yield a, b
    finally:
        b.close()
        a.close()
        server.stop()


def admin(fleet: Fleet, method: str, path: str, key: str | None = ADMIN, **kwargs: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    url = f"{fleet.base_url}/v1/system/keys{path}"
    return httpx.request(method, url, headers=headers, timeout=30, **kwargs)


def create_key(fleet: Fleet, name: str, **limits: Any) -> dict[str, Any]:
    r = admin(fleet, "POST", "", json={"name": name, **limits})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def chat(fleet: Fleet, key: str | None, path: str = "/v1/chat/completions", **body: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{fleet.base_url}{path}", json={**CHAT, **body}, headers=headers, timeout=60)


def window_start() -> None:
    """Wait for a fresh limits window, so that a test's requests all fall in one."""
    time.sleep(WINDOW - time.time() % WINDOW + 0.05)


def test_the_admin_manages_keys_and_from_the_first_one_on_every_request_needs_one(
    fleets: tuple[Fleet, Fleet],
) -> None:
    a, b = fleets
    # No managed key yet, no INFERQ_API_KEYS: the API is open (only management needs the admin key).
    assert chat(b, None).status_code == 200
    assert admin(a, "POST", "", key=None, json={"name": "x"}).status_code == 401
    created = create_key(a, "first")
    assert created["key"].startswith("sk-inferq-") and created["id"].startswith("key_")
    time.sleep(0.6)  # what another process knew of the keys is at most this old
    for fleet in (a, b):
        assert chat(fleet, None).status_code == 401
        assert chat(fleet, created["key"]).status_code == 200
        # A managed key is not the admin's: it neither lists nor creates keys.
        for method in ("GET", "POST"):
            r = httpx.request(
                method,
                f"{fleet.base_url}/v1/system/keys",
                json={"name": "y"},
                headers={"Authorization": f"Bearer {created['key']}"},
                timeout=30,
            )
            assert r.status_code == 403
    listed = admin(b, "GET", "").json()["data"]
    mine = next(k for k in listed if k["id"] == created["id"])
    assert mine["name"] == "first" and "key" not in mine and "digest" not in mine


def test_requests_per_minute_hold_across_both_processes_with_headers_that_count_down_and_reset(
    fleets: tuple[Fleet, Fleet],
) -> None:
    a, b = fleets
    key = create_key(a, "rpm", rpm=5)["key"]
    window_start()
    answers = [chat((a, b)[i % 2], key) for i in range(8)]
    statuses = [r.status_code for r in answers]
    print(f"\nrpm 5, 8 requests alternating two API processes: {statuses}")  # noqa: T201 (shown with -s)
    assert statuses == [200] * 5 + [429] * 3
    assert [r.headers["x-ratelimit-remaining-requests"] for r in answers[:5]] == ["4", "3", "2", "1", "0"]
    assert {r.headers["x-ratelimit-limit-requests"] for r in answers} == {"5"}
    refused = answers[5]
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.json()["error"]["type"] == "requests"
    assert 1 <= int(refused.headers["retry-after"]) <= WINDOW
    assert refused.headers["x-ratelimit-reset-requests"].endswith("s")
    # Anthropic's clients get Anthropic's envelope.
    message = {"model": "scripted", "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}]}
    r = httpx.post(f"{b.base_url}/v1/messages", json=message, headers={"x-api-key": key}, timeout=30)
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    # ... and Anthropic's headers: the window's end as an RFC 3339 time, not OpenAI's time left.
    assert r.headers["anthropic-ratelimit-requests-limit"] == "5"
    assert r.headers["anthropic-ratelimit-requests-remaining"] == "0"
    reset = datetime.strptime(r.headers["anthropic-ratelimit-requests-reset"], "%Y-%m-%dT%H:%M:%SZ")
    assert 0 < reset.replace(tzinfo=UTC).timestamp() - time.time() <= WINDOW + 1
    assert "x-ratelimit-limit-requests" not in r.headers and 1 <= int(r.headers["retry-after"]) <= WINDOW
    # A read does not count, and shows where the key stands.
    models = httpx.get(f"{a.base_url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert models.status_code == 200 and models.headers["x-ratelimit-remaining-requests"] == "0"
    # Obeying Retry-After gets the next request in, with the count started over.
    time.sleep(int(refused.headers["retry-after"]))
    again = chat(b, key)
    assert again.status_code == 200 and again.headers["x-ratelimit-remaining-requests"] == "4"


def test_tokens_per_minute_hold_across_both_processes_to_within_one_request(
    fleets: tuple[Fleet, Fleet],
) -> None:
    a, b = fleets
    tpm = 60
    key = create_key(a, "tpm", tpm=tpm)["key"]
    window_start()
    used: list[int] = []
    refused = None
    for i in range(20):
        r = chat((a, b)[i % 2], key, max_tokens=8)
        if r.status_code == 429:
            refused = r
            break
        assert r.status_code == 200
        used.append(r.json()["usage"]["total_tokens"])
        assert int(r.headers["x-ratelimit-limit-tokens"]) == tpm
    assert refused is not None, f"never refused after {sum(used)} tokens"
    assert refused.json()["error"]["type"] == "tokens"
    # Refused once the window's tokens were spent, and not before: over by less than the last request.
    print(f"\ntpm {tpm}: {len(used)} admitted using {used} = {sum(used)} tokens, then 429")  # noqa: T201
    assert sum(used[:-1]) < tpm <= sum(used)
    # The headers count down what was used.
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"


def test_a_revoked_key_is_refused_within_a_second_on_every_process(fleets: tuple[Fleet, Fleet]) -> None:
    a, b = fleets
    created = create_key(a, "short-lived")
    key = created["key"]
    assert chat(a, key).status_code == 200 and chat(b, key).status_code == 200  # both know it now
    assert admin(b, "DELETE", f"/{created['id']}").json() == {
        "id": created["id"],
        "object": "api_key.deleted",
        "deleted": True,
    }
    revoked = time.monotonic()
    refused_after: dict[str, float] = {}
    while len(refused_after) < 2 and time.monotonic() - revoked < 5:
        for name, fleet in (("a", a), ("b", b)):
            if name not in refused_after:
                r = httpx.get(f"{fleet.base_url}/v1/models", headers={"Authorization": f"Bearer {key}"})
                if r.status_code == 401:
                    refused_after[name] = time.monotonic() - revoked
    took = ", ".join(f"{k} {v:.3f} s" for k, v in sorted(refused_after.items()))
    print(f"\nrevoked key refused after: {took}")  # noqa: T201 (the figures, shown with -s)
    assert set(refused_after) == {"a", "b"} and max(refused_after.values()) < 1.0, refused_after
    assert admin(a, "DELETE", f"/{created['id']}").status_code == 404


def test_a_key_limited_to_some_models_sees_and_calls_only_those(fleets: tuple[Fleet, Fleet]) -> None:
    a, _ = fleets
    key = create_key(a, "narrow", models=["other"])["key"]
    r = chat(a, key)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    listed = httpx.get(f"{a.base_url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert [m["id"] for m in listed.json()["data"]] == []
    # Nor through a batch, whose lines run later.
    narrow = openai.OpenAI(base_url=f"{a.base_url}/v1", api_key=key, max_retries=0)
    line = {"custom_id": "1", "method": "POST", "url": "/v1/chat/completions", "body": CHAT}
    file = narrow.files.create(file=("in.jsonl", io.BytesIO(json.dumps(line).encode())), purpose="batch")
    with pytest.raises(openai.NotFoundError):
        narrow.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")


def test_a_key_cannot_read_another_keys_responses_files_or_batches(
    fleets: tuple[Fleet, Fleet], tmp_path: Path
) -> None:
    a, b = fleets
    one = openai.OpenAI(base_url=f"{a.base_url}/v1", api_key=create_key(a, "one")["key"], max_retries=0)
    two = openai.OpenAI(base_url=f"{b.base_url}/v1", api_key=create_key(a, "two")["key"], max_retries=0)
    response = one.responses.create(model="scripted", input="Hi", max_output_tokens=3)
    line = {"custom_id": "1", "method": "POST", "url": "/v1/chat/completions", "body": CHAT}
    file = one.files.create(file=("in.jsonl", io.BytesIO(json.dumps(line).encode())), purpose="batch")
    batch = one.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    # The owner reads all three, on either process.
    owner_on_b = openai.OpenAI(base_url=f"{b.base_url}/v1", api_key=one.api_key, max_retries=0)
    assert owner_on_b.responses.retrieve(response.id).id == response.id
    assert owner_on_b.files.retrieve(file.id).id == file.id
    assert owner_on_b.batches.retrieve(batch.id).id == batch.id
    # The other key is told they do not exist, and does not see them listed.
    for read in (
        lambda: two.responses.retrieve(response.id),
        lambda: two.files.retrieve(file.id),
        lambda: two.files.content(file.id),
        lambda: two.files.delete(file.id),
        lambda: two.batches.retrieve(batch.id),
        lambda: two.batches.cancel(batch.id),
    ):
        with pytest.raises(openai.NotFoundError):
            read()
    assert file.id not in [f.id for f in two.files.list()]
    assert batch.id not in [x.id for x in two.batches.list()]
    # The batch's results are its creator's.
    deadline = time.monotonic() + 60
    while (done := one.batches.retrieve(batch.id)).status != "completed":
        assert time.monotonic() < deadline, done.status
        time.sleep(0.2)
    assert done.output_file_id is not None
    assert json.loads(one.files.content(done.output_file_id).text)["custom_id"] == "1"
    with pytest.raises(openai.NotFoundError):
        two.files.content(done.output_file_id)


def sse_data(r: httpx.Response) -> list[dict[str, Any]]:
    return [
        json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:") and "[DONE]" not in line
    ]


def test_the_usage_ledger_adds_up_to_the_usage_the_clients_were_told(fleets: tuple[Fleet, Fleet]) -> None:
    """Chat (n=2, streamed), completions, responses (streamed), messages and a batch, on both processes: the
    ledger's totals for the key are the sums of the usage each client received."""
    a, b = fleets
    created = create_key(a, "ledger\tteam")  # a name may hold what the ledger's fields are split on
    auth = {"Authorization": f"Bearer {created['key']}"}
    told = {"requests": 0, "prompt_tokens": 0, "cached_tokens": 0, "completion_tokens": 0}

    def add(prompt: int, completion: int, cached: int = 0) -> None:
        told["requests"] += 1
        told["prompt_tokens"] += prompt
        told["completion_tokens"] += completion
        told["cached_tokens"] += cached

    def post(fleet: Fleet, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = httpx.post(f"{fleet.base_url}{path}", json=body, headers=auth, timeout=60)
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out

    def chat_usage(u: dict[str, Any]) -> None:
        add(
            u["prompt_tokens"],
            u["completion_tokens"],
            (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
        )

    chat_usage(post(a, "/v1/chat/completions", {**CHAT, "n": 2})["usage"])
    chat_usage(post(b, "/v1/completions", {"model": "scripted", "prompt": "Once", "max_tokens": 4})["usage"])
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{b.base_url}/v1/chat/completions", json=body, headers=auth, timeout=60) as r:
        chat_usage(sse_data(r)[-1]["usage"])
    for streamed in (False, True):
        body = {"model": "scripted", "input": "Hi", "max_output_tokens": 5, "stream": streamed}
        if streamed:
            with httpx.stream("POST", f"{a.base_url}/v1/responses", json=body, headers=auth, timeout=60) as r:
                u = sse_data(r)[-1]["response"]["usage"]
        else:
            u = post(a, "/v1/responses", body)["usage"]
        add(u["input_tokens"], u["output_tokens"], u["input_tokens_details"]["cached_tokens"])
    message = {"model": "scripted", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}
    u = post(b, "/v1/messages", message)["usage"]
    cache_read = u.get("cache_read_input_tokens") or 0
    add(u["input_tokens"] + cache_read, u["output_tokens"], cache_read)

    one = openai.OpenAI(base_url=f"{a.base_url}/v1", api_key=created["key"], max_retries=0)
    lines = [
        {"custom_id": str(i), "method": "POST", "url": "/v1/chat/completions", "body": CHAT} for i in range(2)
    ]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    file = one.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    batch = one.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 60
    while (done := one.batches.retrieve(batch.id)).status != "completed":
        assert time.monotonic() < deadline, done.status
        time.sleep(0.2)
    assert done.output_file_id is not None
    for line in one.files.content(done.output_file_id).text.splitlines():
        chat_usage(json.loads(line)["response"]["body"]["usage"])

    r = httpx.get(f"{b.base_url}/v1/system/usage", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
    rows = [row for row in r.json()["data"] if row["key_id"] == created["id"]]
    assert [(row["key_name"], row["model"]) for row in rows] == [("ledger\tteam", "scripted")]
    ledger = {k: rows[0][k] for k in told}
    assert ledger == told and rows[0]["errors"] == 0
    # Prometheus counts by the key's name, never the key.
    scraped = httpx.get(f"{a.base_url}/metrics", timeout=30).text + httpx.get(f"{b.base_url}/metrics").text
    assert 'inferq_key_requests_total{key="ledger\tteam",model="scripted",outcome="ok"}' in scraped
    assert 'inferq_key_tokens_total{key="ledger\tteam",kind="completion",model="scripted"}' in scraped
    assert created["key"] not in scraped


def test_revoking_every_key_does_not_open_the_api_again(fleets: tuple[Fleet, Fleet]) -> None:
    a, b = fleets
    for k in admin(a, "GET", "").json()["data"]:
        assert admin(a, "DELETE", f"/{k['id']}").status_code == 200
    assert admin(b, "GET", "").json()["data"] == []
    time.sleep(0.6)  # past what either process knew of the keys
    assert chat(a, None).status_code == 401 and chat(b, None).status_code == 401
