"""Anthropic's Messages protocol models against the official ``anthropic`` SDK (no server, no Redis): the
bodies the SDK sends parse, what inferq answers the SDK parses, and unsupported blocks and tools are refused
where they stand."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import httpx2
import pytest
from anthropic.types import Message as SDKMessage
from anthropic.types import MessageParam, RawMessageStreamEvent, ToolParam
from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic_core import ErrorDetails

from api.protocol.messages import (
    CountTokensRequest,
    CountTokensResponse,
    ErrorResponse,
    Message,
    MessagesRequest,
    TextBlock,
    TextBlockParam,
    ToolUseBlock,
    ToolUseBlockParam,
    Usage,
    anthropic_error_type,
    message_id,
    tool_use_id,
)
from api.protocol.messages_stream import (
    ContentBlockDeltaEvent,
    ContentBlockStartEvent,
    ContentBlockStopEvent,
    InputJSONDelta,
    MessageDelta,
    MessageDeltaEvent,
    MessageDeltaUsage,
    MessageStartEvent,
    MessageStopEvent,
    PingEvent,
    StreamEvent,
    TextDelta,
)

WEATHER: ToolParam = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
HI: list[MessageParam] = [{"role": "user", "content": "hi"}]


ANSWER = Message(
    content=[TextBlock(text="Let me look."), ToolUseBlock(name="get_weather", input={"city": "Oslo"})],
    model="smollm2",
    stop_reason="tool_use",
    usage=Usage(input_tokens=12, output_tokens=7),
)


class Recorder:
    """An SDK client whose HTTP goes to ``reply``; the request bodies it sent are kept in ``bodies``."""

    def __init__(self, reply: Callable[[httpx2.Request], httpx2.Response]) -> None:
        self.bodies: list[dict[str, Any]] = []

        def handle(request: httpx2.Request) -> httpx2.Response:
            self.bodies.append(json.loads(request.content))
            return reply(request)

        self.client = anthropic.Anthropic(
            api_key="sk-test",
            base_url="http://inferq.test",
            max_retries=0,
            http_client=httpx2.Client(transport=httpx2.MockTransport(handle)),
        )


def json_reply(model: BaseModel, status: int = 200) -> Callable[[httpx2.Request], httpx2.Response]:
    return lambda _: httpx2.Response(status, json=model.model_dump(mode="json"))


@pytest.fixture
def sdk() -> Iterator[Recorder]:
    rec = Recorder(json_reply(ANSWER))
    yield rec
    rec.client.close()


def sent(rec: Recorder, **kw: Any) -> MessagesRequest:
    rec.client.messages.create(model="smollm2", max_tokens=64, **kw)
    return MessagesRequest.model_validate(rec.bodies[-1])


# --- requests as the SDK sends them ---


def test_string_content_is_one_text_block(sdk: Recorder) -> None:
    req = sent(sdk, messages=[{"role": "user", "content": "Hello, Claude"}])
    assert req.model == "smollm2" and req.max_tokens == 64 and req.stream is False
    assert [(m.role, m.text()) for m in req.messages] == [("user", "Hello, Claude")]
    assert req.messages[0].content == [TextBlockParam(type="text", text="Hello, Claude")]
    assert req.system is None and req.system_text() == "" and req.tool_mode() == "none"


def test_block_content_and_cache_control(sdk: Recorder) -> None:
    blocks = [
        {"type": "text", "text": "<system-reminder>be brief</system-reminder>"},
        {"type": "text", "text": "What is 2+2?", "cache_control": {"type": "ephemeral", "ttl": "1h"}},
    ]
    req = sent(sdk, messages=[{"role": "user", "content": blocks}])
    content = req.messages[0].content
    assert len(content) == 2 and isinstance(content[1], TextBlockParam)
    assert content[1].cache_control == {"type": "ephemeral", "ttl": "1h"}
    assert req.messages[0].text() == "<system-reminder>be brief</system-reminder>\nWhat is 2+2?"


def test_system_as_string_and_as_blocks(sdk: Recorder) -> None:
    assert sent(sdk, messages=HI, system="You are terse.").system_text() == "You are terse."
    blocks = [
        {"type": "text", "text": "You are Claude Code."},
        {"type": "text", "text": "Use tools.", "cache_control": {"type": "ephemeral"}},
    ]
    req = sent(sdk, messages=HI, system=blocks)
    assert req.system_text() == "You are Claude Code.\nUse tools."
    assert req.system is not None and req.system[1].cache_control == {"type": "ephemeral"}


def test_sampling_fields_and_metadata(sdk: Recorder) -> None:
    # SDK 2.x dropped temperature, top_p and top_k from create(); older clients and Claude Code send them.
    req = sent(
        sdk,
        messages=HI,
        stop_sequences=["\n\nHuman:"],
        metadata={"user_id": "u-1"},
        extra_body={"temperature": 0.5, "top_p": 0.9, "top_k": 40},
    )
    assert (req.temperature, req.top_p, req.top_k) == (0.5, 0.9, 40)
    assert req.stop_sequences == ["\n\nHuman:"]
    assert req.metadata is not None and req.metadata.user_id == "u-1"


def test_tools_with_input_schema(sdk: Recorder) -> None:
    custom: ToolParam = {
        **WEATHER,
        "name": "get_time",
        "type": "custom",
        "cache_control": {"type": "ephemeral"},
    }
    req = sent(sdk, messages=HI, tools=[WEATHER, custom])
    assert req.tools is not None
    assert [(t.name, t.type) for t in req.tools] == [("get_weather", None), ("get_time", "custom")]
    assert req.tools[0].input_schema == WEATHER["input_schema"]
    assert req.tools[0].description == "The weather in a city"
    assert req.tool_mode() == "auto"


@pytest.mark.parametrize(
    ("choice", "mode"),
    [
        ({"type": "auto"}, "auto"),
        ({"type": "auto", "disable_parallel_tool_use": True}, "auto"),
        ({"type": "any"}, "required"),
        ({"type": "tool", "name": "get_weather"}, "required"),
        ({"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}, "required"),
        ({"type": "none"}, "none"),
    ],
)
def test_each_tool_choice(sdk: Recorder, choice: dict[str, Any], mode: str) -> None:
    req = sent(sdk, messages=HI, tools=[WEATHER], tool_choice=choice)
    assert req.tool_choice is not None
    assert req.tool_choice.model_dump(exclude_none=True) == choice
    assert req.tool_mode() == mode


def test_tool_use_and_tool_result_round_trip(sdk: Recorder) -> None:
    # The SDK's own Message (parsed from what inferq answered) goes back as the assistant turn.
    first = sdk.client.messages.create(model="smollm2", max_tokens=64, messages=HI, tools=[WEATHER])
    call = first.content[1]
    assert call.type == "tool_use"
    history = [
        *HI,
        first.to_param(),
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": call.id, "content": "-3 °C"},
                {
                    "type": "tool_result",
                    "tool_use_id": call.id,
                    "content": [{"type": "text", "text": "no such city"}],
                    "is_error": True,
                },
                {"type": "text", "text": "And tomorrow?"},
            ],
        },
    ]
    req = sent(sdk, messages=history, tools=[WEATHER])
    assistant, user = req.messages[1], req.messages[2]
    assert assistant.role == "assistant" and assistant.text() == "Let me look."
    assert assistant.tool_uses() == [
        ToolUseBlockParam(type="tool_use", id=call.id, name="get_weather", input={"city": "Oslo"})
    ]
    results = user.tool_results()
    assert [(r.tool_use_id, r.text(), r.is_error) for r in results] == [
        (call.id, "-3 °C", False),
        (call.id, "no such city", True),
    ]
    assert user.text() == "And tomorrow?"


def test_unknown_fields_from_claude_code_are_kept(sdk: Recorder) -> None:
    sdk.client.messages.create(
        model="smollm2",
        max_tokens=64,
        messages=HI,
        extra_body={
            "thinking": {"type": "enabled", "budget_tokens": 1024},
            "service_tier": "auto",
            "context_management": {"edits": []},
        },
    )
    req = MessagesRequest.model_validate(sdk.bodies[-1])
    assert req.model_extra is not None
    assert set(req.model_extra) == {"thinking", "service_tier", "context_management"}


def test_mid_conversation_system_message() -> None:
    req = MessagesRequest.model_validate(
        {"model": "m", "max_tokens": 8, "messages": [*HI, {"role": "system", "content": "Now in French."}]}
    )
    assert [(m.role, m.text()) for m in req.messages] == [("user", "hi"), ("system", "Now in French.")]


def test_count_tokens_request_and_response(sdk: Recorder) -> None:
    rec = Recorder(json_reply(CountTokensResponse(input_tokens=42)))
    counted = rec.client.messages.count_tokens(
        model="smollm2", messages=HI, system="terse", tools=[WEATHER], tool_choice={"type": "any"}
    )
    assert counted.input_tokens == 42
    req = CountTokensRequest.model_validate(rec.bodies[-1])
    assert req.system_text() == "terse" and req.tool_mode() == "required"
    assert "max_tokens" not in CountTokensRequest.model_fields
    rec.client.close()


# --- what inferq refuses, and where the error points ---


def refusal(body: dict[str, Any]) -> ErrorDetails:
    with pytest.raises(ValidationError) as info:
        MessagesRequest.model_validate({"model": "m", "max_tokens": 8, **body})
    return info.value.errors()[0]


IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
THINKING = {"type": "thinking", "thinking": "Hmm.", "signature": "sig"}


def test_image_block_is_refused_at_its_place() -> None:
    err = refusal(
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "what is this?"}, IMAGE]}]}
    )
    assert err["loc"] == ("messages", 0, "content", 1)
    assert err["type"] == "unsupported_content_block"
    assert err["msg"] == (
        "content block type 'image' is not supported here; supported types: 'text', 'tool_use', 'tool_result'"
    )


def test_thinking_block_is_refused_at_its_place() -> None:
    messages = [*HI, {"role": "assistant", "content": [THINKING, {"type": "text", "text": "Hello"}]}]
    err = refusal({"messages": messages})
    assert err["loc"] == ("messages", 1, "content", 0)
    assert "'thinking' is not supported" in err["msg"]


@pytest.mark.parametrize("kind", ["document", "redacted_thinking", "search_result", "server_tool_use"])
def test_other_block_types_are_refused(kind: str) -> None:
    err = refusal({"messages": [{"role": "user", "content": [{"type": kind}]}]})
    assert err["loc"] == ("messages", 0, "content", 0) and err["type"] == "unsupported_content_block"
    assert f"'{kind}'" in err["msg"]


def test_a_block_without_type_is_refused() -> None:
    err = refusal({"messages": [{"role": "user", "content": [{"text": "hi"}]}]})
    assert err["loc"] == ("messages", 0, "content", 0) and "needs a `type`" in err["msg"]


def test_an_image_inside_a_tool_result_is_refused() -> None:
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": [IMAGE]}
    err = refusal({"messages": [{"role": "user", "content": [result]}]})
    assert err["loc"] == ("messages", 0, "content", 0, "tool_result", "content", 0)
    assert err["msg"].endswith("supported types: 'text'")


def test_a_system_block_other_than_text_is_refused() -> None:
    err = refusal({"messages": HI, "system": [IMAGE]})
    assert err["loc"] == ("system", 0) and "'image'" in err["msg"]


@pytest.mark.parametrize(
    "tool",
    [
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 5},
        {"type": "bash_20250124", "name": "bash"},
        {"type": "text_editor_20250728", "name": "str_replace_based_edit_tool"},
    ],
)
def test_server_tools_are_refused(tool: dict[str, Any]) -> None:
    err = refusal({"messages": HI, "tools": [WEATHER, tool]})
    assert err["loc"] == ("tools", 1) and err["type"] == "unsupported_tool"
    assert err["msg"] == (
        f"tool type '{tool['type']}' is not supported: inferq runs client tools only "
        "(name, description, input_schema; type 'custom' or none), not server tools"
    )


def test_blocks_must_fit_the_role() -> None:
    call = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}
    err = refusal({"messages": [{"role": "user", "content": [call]}]})
    assert (
        err["loc"] == ("messages", 0)
        and "a user message cannot hold a tool_use block (content[0])" in err["msg"]
    )
    result = {"type": "tool_result", "tool_use_id": "toolu_1"}
    err = refusal({"messages": [*HI, {"role": "assistant", "content": [result]}]})
    assert err["loc"] == ("messages", 1) and "assistant message cannot hold a tool_result" in err["msg"]


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"messages": []}, ("messages",)),
        ({"messages": HI, "max_tokens": 0}, ("max_tokens",)),
        ({"messages": HI, "temperature": 1.5}, ("temperature",)),
        ({"messages": HI, "top_p": -0.1}, ("top_p",)),
        ({"messages": HI, "top_k": -1}, ("top_k",)),
        ({"messages": HI, "stop_sequences": [""]}, ("stop_sequences",)),
        ({"messages": [{"role": "tool", "content": "x"}]}, ("messages", 0, "role")),
        ({"messages": [{"role": "user", "content": 3}]}, ("messages", 0, "content")),
        ({"messages": HI, "tool_choice": {"type": "tool"}}, ("tool_choice",)),
        ({"messages": HI, "tools": [{"name": "x"}]}, ("tools", 0, "input_schema")),
    ],
)
def test_invalid_values(body: dict[str, Any], loc: tuple[str | int, ...]) -> None:
    assert refusal(body)["loc"] == loc


def test_max_tokens_is_required() -> None:
    with pytest.raises(ValidationError) as info:
        MessagesRequest.model_validate({"model": "m", "messages": HI})
    assert info.value.errors()[0]["loc"] == ("max_tokens",)


# --- what inferq answers, as the SDK reads it ---


def test_message_parses_as_the_sdks_message(sdk: Recorder) -> None:
    ours = ANSWER
    got = sdk.client.messages.create(model="smollm2", max_tokens=64, messages=HI)
    assert isinstance(got, SDKMessage)
    assert got.id == ours.id and got.id.startswith("msg_")
    assert (got.type, got.role, got.model) == ("message", "assistant", "smollm2")
    assert (got.stop_reason, got.stop_sequence) == ("tool_use", None)
    text, call = got.content
    assert text.type == "text" and text.text == "Let me look." and text.citations is None
    assert call.type == "tool_use" and call.name == "get_weather" and call.input == {"city": "Oslo"}
    assert call.id.startswith("toolu_")
    usage = got.usage
    assert (usage.input_tokens, usage.output_tokens) == (12, 7)
    assert (usage.cache_creation_input_tokens, usage.cache_read_input_tokens) == (0, 0)
    assert usage.service_tier == "standard"
    # Strict validation too, not only the SDK's lenient construction of responses.
    assert SDKMessage.model_validate(ours.model_dump(mode="json")).model_dump() == got.model_dump()


def test_ids() -> None:
    assert message_id().startswith("msg_") and len(message_id()) == 28 and message_id() != message_id()
    assert tool_use_id().startswith("toolu_") and len(tool_use_id()) == 30


def stream_events() -> list[BaseModel]:
    call = tool_use_id()
    return [
        MessageStartEvent.of(message_id(), "smollm2", input_tokens=12),
        ContentBlockStartEvent.text(0),
        PingEvent(),
        ContentBlockDeltaEvent(index=0, delta=TextDelta(text="Let me ")),
        ContentBlockDeltaEvent(index=0, delta=TextDelta(text="look.")),
        ContentBlockStopEvent(index=0),
        ContentBlockStartEvent.tool_use(1, call, "get_weather"),
        ContentBlockDeltaEvent(index=1, delta=InputJSONDelta(partial_json='{"city": ')),
        ContentBlockDeltaEvent(index=1, delta=InputJSONDelta(partial_json='"Oslo"}')),
        ContentBlockStopEvent(index=1),
        MessageDeltaEvent(
            delta=MessageDelta(stop_reason="tool_use"), usage=MessageDeltaUsage(output_tokens=9)
        ),
        MessageStopEvent(),
    ]


def sse(events: list[BaseModel]) -> Callable[[httpx2.Request], httpx2.Response]:
    frames = "".join(
        f"event: {e.model_dump()['type']}\ndata: {json.dumps(e.model_dump(mode='json'))}\n\n" for e in events
    )
    return lambda _: httpx2.Response(
        200, headers={"content-type": "text/event-stream"}, content=frames.encode()
    )


def test_every_stream_event_parses_as_the_sdks_event() -> None:
    sdk_event: TypeAdapter[Any] = TypeAdapter(RawMessageStreamEvent)
    ours: TypeAdapter[Any] = TypeAdapter(StreamEvent)
    for event in stream_events():
        if isinstance(event, PingEvent):
            continue  # not in the SDK's union: its stream drops pings before parsing
        data = event.model_dump(mode="json")
        parsed = sdk_event.validate_python(data)
        assert parsed.type == data["type"]
        assert parsed.model_dump(mode="json", exclude_none=True) == event.model_dump(
            mode="json", exclude_none=True
        )
        assert ours.validate_python(data) == event
    start = sdk_event.validate_python(stream_events()[0].model_dump(mode="json"))
    assert start.message.content == [] and start.message.stop_reason is None
    assert (start.message.usage.input_tokens, start.message.usage.output_tokens) == (12, 0)


def test_the_sdk_accumulates_the_stream_into_the_message() -> None:
    rec = Recorder(sse(stream_events()))
    with rec.client.messages.stream(model="smollm2", max_tokens=64, messages=HI) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert rec.bodies[-1]["stream"] is True
    assert "ping" not in kinds and kinds[0] == "message_start" and kinds[-1] == "message_stop"
    text, call = final.content
    assert text.type == "text" and text.text == "Let me look."
    assert call.type == "tool_use" and call.name == "get_weather" and call.input == {"city": "Oslo"}
    assert final.stop_reason == "tool_use"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (12, 9)
    rec.client.close()


def test_an_error_event_mid_stream_raises_in_the_sdk() -> None:
    _, error = ErrorResponse.for_status(503, "No worker serves smollm2.")
    rec = Recorder(sse([*stream_events()[:4], error]))
    stream = rec.client.messages.create(model="smollm2", max_tokens=64, messages=HI, stream=True)
    with pytest.raises(anthropic.APIStatusError) as info:
        list(stream)
    assert info.value.type == "overloaded_error" and info.value.api_message == "No worker serves smollm2."
    rec.client.close()


# --- errors ---


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (400, (400, "invalid_request_error")),
        (401, (401, "authentication_error")),
        (403, (403, "permission_error")),
        (404, (404, "not_found_error")),
        (413, (413, "request_too_large")),
        (422, (422, "invalid_request_error")),
        (429, (429, "rate_limit_error")),
        (499, (499, "invalid_request_error")),
        (500, (500, "api_error")),
        (502, (502, "api_error")),
        (503, (529, "overloaded_error")),
        (504, (504, "timeout_error")),
        (200, (500, "api_error")),
    ],
)
def test_error_status_mapping(ours: int, theirs: tuple[int, str]) -> None:
    assert anthropic_error_type(ours) == theirs


@pytest.mark.parametrize(
    ("ours", "exc"),
    [
        (400, anthropic.BadRequestError),
        (401, anthropic.AuthenticationError),
        (403, anthropic.PermissionDeniedError),
        (404, anthropic.NotFoundError),
        (429, anthropic.RateLimitError),
        (500, anthropic.InternalServerError),
        (503, anthropic.OverloadedError),
        (504, anthropic.GatewayTimeoutError),
    ],
)
def test_error_envelope_as_the_sdk_raises_it(ours: int, exc: type[anthropic.APIStatusError]) -> None:
    status, body = ErrorResponse.for_status(ours, "it went wrong", request_id="req_1")
    rec = Recorder(json_reply(body, status))
    with pytest.raises(exc) as info:
        rec.client.messages.create(model="smollm2", max_tokens=64, messages=HI)
    assert info.value.status_code == status and info.value.type == body.error.type
    assert info.value.api_message == "it went wrong"
    sdk_body = anthropic.types.ErrorResponse.model_validate(body.model_dump(mode="json"))
    assert (sdk_body.error.type, sdk_body.request_id) == (body.error.type, "req_1")
    rec.client.close()
