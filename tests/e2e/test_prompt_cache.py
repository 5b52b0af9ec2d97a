"""A conversation's next turn reuses the engine's KV state, and every protocol reports it where it puts
it: ``usage.prompt_tokens_details.cached_tokens`` (chat, completions),
``usage.input_tokens_details.cached_tokens`` (responses), ``usage.cache_read_input_tokens`` (messages). The
shared fleet: one real SmolLM2 worker, so both turns run on the same ``Llama``."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.fleet import Fleet

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m"
FIRST = "Name three colours of the rainbow."
SECOND = "And two more?"


def _post(fleet: Fleet, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(f"{fleet.base_url}{path}", json={"model": MODEL, **body}, timeout=60)
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


def test_chat_second_turn_reports_cached_prompt_tokens(fleet: Fleet) -> None:
    turn1 = [{"role": "user", "content": FIRST}]
    one = _post(fleet, "/v1/chat/completions", {"messages": turn1, "max_tokens": 8, "temperature": 0})
    answer = one["choices"][0]["message"]["content"]
    turn2 = [*turn1, {"role": "assistant", "content": answer}, {"role": "user", "content": SECOND}]
    two = _post(fleet, "/v1/chat/completions", {"messages": turn2, "max_tokens": 4, "temperature": 0})
    cached = two["usage"]["prompt_tokens_details"]["cached_tokens"]
    # At least the first turn's prompt; never the whole of the second one (its new message is evaluated).
    assert one["usage"]["prompt_tokens"] - 2 <= cached < two["usage"]["prompt_tokens"], two["usage"]


def test_completions_continuation_reports_cached_prompt_tokens(fleet: Fleet) -> None:
    prompt = "The rainbow has seven colours: red, orange,"
    one = _post(fleet, "/v1/completions", {"prompt": prompt, "max_tokens": 6, "temperature": 0})
    longer = prompt + one["choices"][0]["text"] + " Then"
    two = _post(fleet, "/v1/completions", {"prompt": longer, "max_tokens": 4, "temperature": 0})
    cached = two["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert one["usage"]["prompt_tokens"] - 2 <= cached < two["usage"]["prompt_tokens"], two["usage"]


def test_responses_second_turn_reports_cached_input_tokens(fleet: Fleet) -> None:
    one = _post(fleet, "/v1/responses", {"input": FIRST, "max_output_tokens": 16, "temperature": 0})
    two = _post(
        fleet,
        "/v1/responses",
        {"previous_response_id": one["id"], "input": SECOND, "max_output_tokens": 16, "temperature": 0},
    )
    cached = two["usage"]["input_tokens_details"]["cached_tokens"]
    assert one["usage"]["input_tokens"] - 2 <= cached < two["usage"]["input_tokens"], two["usage"]


def test_messages_second_turn_reports_cache_read_input_tokens(fleet: Fleet) -> None:
    turn1 = [{"role": "user", "content": FIRST}]
    one = _post(fleet, "/v1/messages", {"messages": turn1, "max_tokens": 8, "temperature": 0})
    answer = "".join(b["text"] for b in one["content"] if b["type"] == "text")
    turn2 = [*turn1, {"role": "assistant", "content": answer}, {"role": "user", "content": SECOND}]
    two = _post(fleet, "/v1/messages", {"messages": turn2, "max_tokens": 4, "temperature": 0})
    usage = two["usage"]
    # Anthropic counts input_tokens as the tokens after the last cache breakpoint: not the cached ones.
    assert usage["cache_read_input_tokens"] > 0, usage
    first_prompt = one["usage"]["input_tokens"] + one["usage"]["cache_read_input_tokens"]
    assert usage["cache_read_input_tokens"] >= first_prompt - 2, (one["usage"], usage)
    assert usage["input_tokens"] > 0, usage


def test_a_streamed_chat_turn_reports_cached_tokens_in_its_usage_chunk(fleet: Fleet) -> None:
    turn1 = [{"role": "user", "content": FIRST}]
    body = {"model": MODEL, "messages": turn1, "max_tokens": 4, "temperature": 0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    usage: dict[str, Any] | None = None
    for _ in range(2):  # the second time the whole prompt but its last token is in the KV state
        with httpx.stream("POST", f"{fleet.base_url}/v1/chat/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {") and '"usage":{' in line.replace(" ", ""):
                    usage = httpx.Response(200, content=line[6:]).json()["usage"]
    assert usage is not None
    assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"] - 1, usage
