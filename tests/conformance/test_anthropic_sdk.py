"""The Messages API through the official ``anthropic`` SDK against the conformance fleet (real API with
keys, real worker, real model): messages, streams, tools, token counts, stop sequences and errors."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import jsonschema
import pytest
from anthropic.types import Message, MessageParam, ToolParam

from tests.conformance.conftest import MODEL, USER_KEY
from tests.fleet import Fleet

pytestmark = pytest.mark.e2e

UNSERVED = "smollm2-unserved"
HELLO: list[MessageParam] = [{"role": "user", "content": "Say hello."}]
# Greedy decoding, so that what the tiny model says is the same each run. SDK 2.x has no `temperature`
# argument any more; clients still send it.
GREEDY = {"temperature": 0.0}
WEATHER: ToolParam = {
    "name": "get_weather",
    "description": "The current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {
            # A closed set keeps the arguments a few tokens long, within the test's max_tokens.
            "city": {"type": "string", "enum": ["Paris", "Oslo", "Tokyo"]},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "unit"],
    },
}


@pytest.fixture
def client(conformance_fleet: Fleet) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(
        base_url=conformance_fleet.base_url, api_key=USER_KEY, max_retries=0, timeout=120
    ) as c:
        yield c


def text_of(message: Message) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


def test_create_a_message(client: anthropic.Anthropic) -> None:
    message = client.messages.create(model=MODEL, max_tokens=16, messages=HELLO)
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert message.model == MODEL and message.stop_reason in ("end_turn", "max_tokens")
    assert [b.type for b in message.content] == ["text"] and text_of(message).strip()
    usage = message.usage
    assert usage.input_tokens > 0 and 0 < usage.output_tokens <= 16
    # Read from the prefix cache: whatever an earlier request of the shared fleet left there (the default
    # system prompt is common to all); nothing is ever written to a cache the client pays for.
    assert usage.cache_creation_input_tokens == 0 and isinstance(usage.cache_read_input_tokens, int)
    assert message.stop_sequence is None
    assert (message._request_id or "").startswith("req_")


def test_stream_a_message(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model=MODEL, max_tokens=16, messages=HELLO) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text.strip() and text == text_of(final)
    assert final.id.startswith("msg_") and final.stop_reason in ("end_turn", "max_tokens")
    assert final.usage.input_tokens > 0 and 0 < final.usage.output_tokens <= 16


def test_stream_events_in_order(client: anthropic.Anthropic) -> None:
    stream = client.messages.create(model=MODEL, max_tokens=8, messages=HELLO, stream=True)
    kinds = [event.type for event in stream]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds[1] == "content_block_start" and kinds[-3] == "content_block_stop"
    assert set(kinds[2:-3]) == {"content_block_delta"}


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
def test_tool_use_then_tool_result(client: anthropic.Anthropic, stream: bool) -> None:
    ask: list[MessageParam] = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]
    kw: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 24,
        "messages": ask,
        "tools": [WEATHER],
        "tool_choice": {"type": "tool", "name": "get_weather"},
    }
    if stream:
        with client.messages.stream(**kw) as s:
            first = s.get_final_message()
    else:
        first = client.messages.create(**kw)
    assert first.stop_reason == "tool_use"
    (call,) = first.content
    assert call.type == "tool_use" and call.name == "get_weather" and call.id.startswith("toolu_")
    jsonschema.validate(call.input, WEATHER["input_schema"])
    history: list[MessageParam] = [
        *ask,
        first.to_param(),
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "18 °C and sunny"}],
        },
    ]
    # `none`: the answer after the result is text, whatever the tiny model would rather do.
    answer = client.messages.create(
        model=MODEL, max_tokens=24, messages=history, tools=[WEATHER], tool_choice={"type": "none"}
    )
    assert [b.type for b in answer.content] == ["text"] and text_of(answer).strip()
    assert answer.stop_reason in ("end_turn", "max_tokens")


def test_count_tokens(client: anthropic.Anthropic) -> None:
    short = client.messages.count_tokens(model=MODEL, messages=HELLO).input_tokens
    longer = client.messages.count_tokens(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hello, then tell me about the history of the harbour."}],
    ).input_tokens
    with_tools = client.messages.count_tokens(model=MODEL, messages=HELLO, tools=[WEATHER]).input_tokens
    assert isinstance(short, int) and 0 < short < longer
    # The tools are rendered into the prompt, so they count.
    assert with_tools > short
    # What count_tokens says is what a message then reports.
    message = client.messages.create(model=MODEL, max_tokens=1, messages=HELLO)
    # Anthropic's input_tokens leaves out what was read from the cache: the prompt is their sum.
    assert message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0) == short


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
def test_stop_sequence_is_reported(client: anthropic.Anthropic, stream: bool) -> None:
    kw: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 24,
        "messages": [{"role": "user", "content": "Count from 1 to 10, separated by commas."}],
        "extra_body": GREEDY,
    }
    unstopped = text_of(client.messages.create(**kw))
    # The check rests on what the model says; if a new model stops saying "3", the test must be re-aimed.
    assert "3" in unstopped, unstopped
    if stream:
        with client.messages.stream(stop_sequences=["3", "nowhere"], **kw) as s:
            streamed = "".join(s.text_stream)
            message = s.get_final_message()
        assert streamed == text_of(message)
    else:
        message = client.messages.create(stop_sequences=["3", "nowhere"], **kw)
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "3")
    text = text_of(message)
    assert "3" not in text and unstopped.startswith(text)


# --- errors, in Anthropic's shape, as the SDK raises them ---


def _error(exc: anthropic.APIStatusError) -> dict[str, Any]:
    body = exc.response.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    assert exc.request_id is not None and exc.request_id.startswith("req_")
    assert body["request_id"] == exc.request_id
    return dict(body["error"])


def test_missing_max_tokens_is_a_400(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        client.post("/v1/messages", cast_to=Message, body={"model": MODEL, "messages": HELLO})
    error = _error(info.value)
    assert error["type"] == "invalid_request_error" and "max_tokens" in error["message"]


def test_an_image_block_is_a_400(client: anthropic.Anthropic) -> None:
    image: MessageParam = {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is this?"},
            {
                "type": "image",
                "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
            },
        ],
    }
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model=MODEL, max_tokens=8, messages=[image])
    error = _error(info.value)
    assert error["type"] == "invalid_request_error" and "'image' is not supported" in error["message"]


def _keyed(fleet: Fleet, key: str, header: str) -> anthropic.Anthropic:
    if header == "authorization":
        return anthropic.Anthropic(base_url=fleet.base_url, api_key=key, max_retries=0)
    # Anthropic's own header; SDK 2.x sends its api_key as a bearer token, so it is set by hand here.
    return anthropic.Anthropic(
        base_url=fleet.base_url, api_key=None, default_headers={"x-api-key": key}, max_retries=0
    )


@pytest.mark.parametrize("header", ["x-api-key", "authorization"])
def test_a_bad_key_is_a_401(conformance_fleet: Fleet, monkeypatch: pytest.MonkeyPatch, header: str) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    with _keyed(conformance_fleet, "wrong", header) as anon:
        with pytest.raises(anthropic.AuthenticationError) as info:
            anon.messages.create(model=MODEL, max_tokens=4, messages=HELLO)
        assert header in info.value.request.headers
        assert _error(info.value)["type"] == "authentication_error"
        assert "wrong" not in info.value.response.text
        with pytest.raises(anthropic.AuthenticationError):
            anon.messages.count_tokens(model=MODEL, messages=HELLO)
    with _keyed(conformance_fleet, USER_KEY, header) as keyed:
        assert keyed.messages.count_tokens(model=MODEL, messages=HELLO).input_tokens > 0


@pytest.mark.parametrize("count", [False, True], ids=["messages", "count_tokens"])
def test_an_unknown_model_is_a_404(client: anthropic.Anthropic, count: bool) -> None:
    with pytest.raises(anthropic.NotFoundError) as info:
        if count:
            client.messages.count_tokens(model="no-such-model", messages=HELLO)
        else:
            client.messages.create(model="no-such-model", max_tokens=4, messages=HELLO)
    error = _error(info.value)
    assert error["type"] == "not_found_error" and "no-such-model" in error["message"]


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
def test_a_model_no_worker_serves_is_overloaded(client: anthropic.Anthropic, stream: bool) -> None:
    # In the catalog, but no worker runs its engine: after INFERQ_NO_WORKER_TIMEOUT (2 s), a 529.
    with pytest.raises(anthropic.OverloadedError) as info:
        if stream:
            with client.messages.stream(model=UNSERVED, max_tokens=4, messages=HELLO) as s:
                s.get_final_message()
        else:
            client.messages.create(model=UNSERVED, max_tokens=4, messages=HELLO)
    assert info.value.status_code == 529
    error = _error(info.value)
    assert error["type"] == "overloaded_error" and UNSERVED in error["message"]
