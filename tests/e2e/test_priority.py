"""Priority classes end to end (api/priority.py, workers/preempt.py): requests waiting for a one-slot worker
are served high first, then normal, then low, whichever came first; a running low-class stream gives its
slot to a high-class request and then continues where it stopped, nothing repeated or lost.

Scripted engine at a fixed speed: what is timed is the scheduling (API, Redis, Celery and worker are real)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from engines.scripted import WORDS
from tests.fleet import Fleet, one_slot_scripted_fleet

pytestmark = pytest.mark.e2e

SPEED = 50  # tokens per second


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with one_slot_scripted_fleet(tmp_path_factory.mktemp("priority"), "p-one", SPEED) as f:
        yield f


def ask(fleet: Fleet, max_tokens: int, headers: dict[str, str] | None = None, **body: Any) -> httpx.Response:
    payload = {"model": "scripted", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": max_tokens}
    return httpx.post(
        f"{fleet.base_url}/v1/chat/completions", json={**payload, **body}, headers=headers or {}, timeout=60
    )


def test_waiting_requests_are_served_by_class_not_by_arrival(fleet: Fleet) -> None:
    done: dict[str, float] = {}

    def run(name: str, max_tokens: int, headers: dict[str, str] | None = None, **body: Any) -> None:
        r = ask(fleet, max_tokens, headers, **body)
        assert r.status_code == 200, r.text
        done[name] = time.monotonic()

    # A normal request holds the only slot for about a second (it has sent tokens: it does not yield).
    blocker = threading.Thread(target=run, args=("blocker", SPEED))
    blocker.start()
    time.sleep(0.4)
    # Then, in this order: a low one (header), a normal one, a high one (OpenAI's service_tier).
    waiting = [
        threading.Thread(target=run, args=("low", 3, {"x-inferq-priority": "low"})),
        threading.Thread(target=run, args=("normal", 3)),
        threading.Thread(target=run, args=("high", 3), kwargs={"service_tier": "priority"}),
    ]
    for t in waiting:
        t.start()
        time.sleep(0.1)
    for t in (blocker, *waiting):
        t.join(60)
    assert sorted(done, key=done.__getitem__) == ["blocker", "high", "normal", "low"]


def test_a_running_low_stream_gives_its_slot_to_a_high_request_then_goes_on(fleet: Fleet) -> None:
    tokens = 100  # two seconds alone
    text: list[str] = []
    first_text = threading.Event()
    ended: dict[str, float] = {}

    def stream() -> None:
        body = {"model": "scripted", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": tokens}
        body["stream"] = True
        headers = {"x-inferq-priority": "low"}
        url = f"{fleet.base_url}/v1/chat/completions"
        with httpx.stream("POST", url, json=body, headers=headers, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    for choice in json.loads(line[6:])["choices"]:
                        if content := choice["delta"].get("content"):
                            text.append(content)
                            first_text.set()
        ended["low"] = time.monotonic()

    low = threading.Thread(target=stream)
    low.start()
    assert first_text.wait(30)
    time.sleep(0.3)
    asked = time.monotonic()
    high = ask(fleet, 3, {"x-inferq-priority": "high"})
    took = time.monotonic() - asked
    low.join(60)
    assert high.status_code == 200
    # Alone it would have waited for the low stream's rest (more than a second).
    assert took < 1.0, f"the high request took {took:.2f} s"
    assert ended["low"] > asked + took
    # The low stream went on from where it stopped: the script's words, each once.
    assert "".join(text) == "".join(" " + WORDS[i % len(WORDS)] for i in range(1, tokens + 1))


def stream_lines(
    fleet: Fleet, body: dict[str, Any], path: str = "/v1/chat/completions"
) -> tuple[int, list[str]]:
    with httpx.stream("POST", f"{fleet.base_url}{path}", json=body, timeout=60) as r:
        return r.status_code, [line for line in r.iter_lines() if line]


def test_a_waiting_stream_hears_its_queue_position_until_its_answer_starts(fleet: Fleet) -> None:
    """api/queue_position.py: after a second in the queue, SSE comments with the stream's position; then
    the stream itself, whole; a job that fails after that point ends the stream with the protocol's error
    event."""
    # A request holds the only slot for three seconds; another waits before ours.
    blocker = threading.Thread(target=ask, args=(fleet, 3 * SPEED))
    blocker.start()
    time.sleep(0.3)
    answers: list[httpx.Response] = []
    ahead = threading.Thread(target=lambda: answers.append(ask(fleet, 3)))
    ahead.start()
    time.sleep(0.2)
    body = {
        "model": "scripted",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 3,
        "stream": True,
    }
    status, lines = stream_lines(fleet, body)
    blocker.join(30)
    ahead.join(30)
    print(f"\nwaiting stream: {lines[:4]}")  # noqa: T201 (shown with -s)
    comments = [line for line in lines if line.startswith(":")]
    data = [line for line in lines if line.startswith("data: ")]
    assert status == 200
    assert comments and comments[0] == ": queue position 2", lines
    # The request that waited before it, not streamed, got its JSON answer as it would have without waiting.
    (answer,) = answers
    assert answer.headers["content-type"] == "application/json"
    assert answer.json()["object"] == "chat.completion"
    assert lines[: len(comments)] == comments, "every comment comes before the stream's first event"
    text = "".join(
        c["choices"][0]["delta"].get("content") or ""
        for c in (json.loads(line[6:]) for line in data[:-1])
        if c["choices"]
    )
    assert text == "".join(" " + WORDS[i % len(WORDS)] for i in range(1, 4)) and data[-1] == "data: [DONE]"

    # The same wait, and the job fails on the worker (its prompt exceeds the model's context): the status
    # went out already, so the error is the stream's error event, in Anthropic's shape on /v1/messages.
    blocker = threading.Thread(target=ask, args=(fleet, 2 * SPEED))
    blocker.start()
    time.sleep(0.3)
    too_long = {
        "model": "scripted",
        "max_tokens": 3,
        "stream": True,
        "messages": [{"role": "user", "content": "word " * 5000}],
    }
    status, lines = stream_lines(fleet, too_long, "/v1/messages")
    blocker.join(30)
    assert status == 200 and lines[0].startswith(": queue position"), lines
    assert lines[-2] == "event: error", lines
    error = json.loads(lines[-1][6:])
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error", error


def test_answers_report_the_tier_their_class_ran_in(fleet: Fleet) -> None:
    """OpenAI's ``service_tier`` in the answer: flex for the low class, priority for high, default otherwise,
    whether the class came from the body's tier or from the header, in chat (plain and streamed) and
    Responses, read through the official SDK."""
    sdk = openai.OpenAI(base_url=f"{fleet.base_url}/v1", api_key="none", max_retries=0)
    hi: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hi"}]
    chat = sdk.chat.completions.create
    assert chat(model="scripted", messages=hi, max_tokens=2).service_tier == "default"
    assert chat(model="scripted", messages=hi, max_tokens=2, service_tier="flex").service_tier == "flex"
    high = chat(model="scripted", messages=hi, max_tokens=2, extra_headers={"x-inferq-priority": "high"})
    assert high.service_tier == "priority"
    chunks = list(
        chat(
            model="scripted",
            messages=hi,
            max_tokens=2,
            stream=True,
            stream_options={"include_usage": True},
            service_tier="priority",
        )
    )
    assert len(chunks) > 2 and {c.service_tier for c in chunks} == {"priority"}
    response = sdk.responses.create(model="scripted", input="Hi", max_output_tokens=2, service_tier="flex")
    assert response.service_tier == "flex"
    assert sdk.responses.create(model="scripted", input="Hi", max_output_tokens=2).service_tier == "default"
