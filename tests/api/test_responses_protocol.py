"""The Responses protocol models (no server, no Redis): what inferq answers validates against the pinned
Open Responses schema and parses as the official ``openai`` SDK's types; the bodies the SDK sends parse;
unsupported items, content parts and tools are refused."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx2
import jsonschema
import openai
import pytest
from openai.types.responses import Response as SDKResponse
from openai.types.responses import ResponseStreamEvent as SDKStreamEvent
from pydantic import BaseModel, TypeAdapter, ValidationError

from api.protocol.responses import (
    CompactionItem,
    CompactRequest,
    CompactResponse,
    DeletedResponse,
    FunctionCallInput,
    FunctionCallItem,
    FunctionCallOutputInput,
    FunctionToolChoice,
    IncompleteDetails,
    InputItemList,
    InputMessage,
    InputTextContent,
    LogProb,
    OutputMessage,
    OutputText,
    ResponseCreateMessage,
    ResponseError,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
    StoredItem,
    TextFormatJsonSchema,
    TopLogProb,
    function_call_id,
    message_id,
    response_id,
)
from api.protocol.responses_events import (
    ContentPartAddedEvent,
    ContentPartDoneEvent,
    ErrorEvent,
    ErrorPayload,
    FunctionCallArgumentsDeltaEvent,
    FunctionCallArgumentsDoneEvent,
    OutputItemAddedEvent,
    OutputItemDoneEvent,
    OutputTextDeltaEvent,
    OutputTextDoneEvent,
    ResponseCompletedEvent,
    ResponseCreatedEvent,
    ResponseFailedEvent,
    ResponseIncompleteEvent,
    ResponseInProgressEvent,
    ResponseQueuedEvent,
    WebSocketErrorBody,
    WebSocketErrorEvent,
)
from tests.conformance.openresponses import (
    event_schemas,
    validate_compact,
    validate_event,
    validate_response,
    validate_ws_error,
)

WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
USAGE = ResponseUsage(input_tokens=12, output_tokens=5, total_tokens=17)
MESSAGE = OutputMessage(content=[OutputText(text="Hello there.")])
CALL = FunctionCallItem(call_id="call_abc", name="get_weather", arguments='{"city": "Oslo"}')


def answer(*output: OutputMessage | FunctionCallItem, **fields: Any) -> ResponseObject:
    defaults: dict[str, Any] = {"model": "smollm2", "status": "completed", "completed_at": 1741476778}
    return ResponseObject.model_validate({**defaults, "output": list(output), "usage": USAGE, **fields})


# --- the response object against the schema and the SDK ---


def test_ids_have_their_prefixes() -> None:
    assert response_id().startswith("resp_") and message_id().startswith("msg_")
    assert function_call_id().startswith("fc_")
    assert response_id() != response_id()


def test_a_message_response_is_valid() -> None:
    data = answer(MESSAGE).model_dump(mode="json")
    validate_response(data)
    assert data["output"][0]["content"][0] == {
        "type": "output_text",
        "text": "Hello there.",
        "annotations": [],
        "logprobs": [],
    }
    sdk = SDKResponse.model_validate(data)
    assert sdk.output_text == "Hello there."
    assert sdk.usage is not None and sdk.usage.input_tokens_details.cached_tokens == 0


def test_a_function_call_response_is_valid() -> None:
    request = ResponsesRequest.model_validate(
        {
            "model": "smollm2",
            "input": "weather in Oslo?",
            "tools": [
                {"type": "function", "name": "get_weather", "parameters": WEATHER_SCHEMA, "strict": True}
            ],
            "tool_choice": {"type": "function", "name": "get_weather"},
            "text": {"format": {"type": "json_schema", "name": "weather", "schema": WEATHER_SCHEMA}},
            "temperature": 0.2,
            "metadata": {"trace": "t1"},
        }
    )
    obj = ResponseObject.from_request(request, status="completed", output=[CALL], usage=USAGE)
    data = obj.model_dump(mode="json")
    validate_response(data)
    assert data["output"][0]["id"].startswith("fc_")
    assert data["tools"][0] == {
        "type": "function",
        "name": "get_weather",
        "description": None,
        "parameters": WEATHER_SCHEMA,
        "strict": True,
    }
    assert data["tool_choice"] == {"type": "function", "name": "get_weather"}
    # The pinned schema types the echoed json_schema format's `schema` as null.
    assert data["text"]["format"] == {
        "type": "json_schema",
        "name": "weather",
        "description": None,
        "schema": None,
        "strict": False,
    }
    assert (data["temperature"], data["top_p"], data["metadata"]) == (0.2, 1.0, {"trace": "t1"})
    # The SDK's own type wants the schema object there; it parses responses without validating, so only the
    # rest is checked strictly.
    sdk = SDKResponse.model_validate({**data, "text": {"format": {"type": "text"}}})
    assert sdk.output[0].type == "function_call" and sdk.output[0].arguments == '{"city": "Oslo"}'


def test_failed_and_incomplete_responses_are_valid() -> None:
    failed = answer(status="failed", error=ResponseError(code="server_error", message="engine crashed"))
    incomplete = answer(
        OutputMessage(status="incomplete", content=[OutputText(text="Hel")]),
        status="incomplete",
        incomplete_details=IncompleteDetails(reason="max_output_tokens"),
    )
    for obj in (failed, incomplete, ResponseObject(model="smollm2", status="queued")):
        validate_response(obj.model_dump(mode="json"))


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("top_p",), None),
        (("service_tier",), None),
        (("output", 0, "content", 0, "annotations"), None),
        (("output", 0, "content", 0, "logprobs"), None),
        (("usage", "input_tokens_details"), None),
        (("tool_choice",), "sometimes"),
    ],
)
def test_the_validator_refuses_what_the_schema_refuses(path: tuple[str | int, ...], value: Any) -> None:
    data = answer(MESSAGE).model_dump(mode="json")
    target: Any = data
    for key in path[:-1]:
        target = target[key]
    if value is None and path[-1] in ("input_tokens_details",):
        del target[path[-1]]
    else:
        target[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError, match="not a valid ResponseResource"):
        validate_response(data)


def test_logprobs_dump_as_the_schema_wants() -> None:
    top = TopLogProb(token="Hi", logprob=-0.1, bytes=[72, 105])
    part = OutputText(
        text="Hi", logprobs=[LogProb(token="Hi", logprob=-0.1, bytes=[72, 105], top_logprobs=[top])]
    )
    validate_response(answer(OutputMessage(content=[part])).model_dump(mode="json"))


# --- streaming events ---


def stream_events() -> list[BaseModel]:
    snapshot = ResponseObject(model="smollm2", status="in_progress")
    done = answer(MESSAGE, CALL)
    empty = MESSAGE.model_copy(update={"status": "in_progress", "content": []})
    item = MESSAGE.id
    return [
        ResponseCreatedEvent(sequence_number=0, response=snapshot),
        ResponseQueuedEvent(sequence_number=1, response=snapshot.model_copy(update={"status": "queued"})),
        ResponseInProgressEvent(sequence_number=2, response=snapshot),
        OutputItemAddedEvent(sequence_number=3, output_index=0, item=empty),
        ContentPartAddedEvent(
            sequence_number=4, item_id=item, output_index=0, content_index=0, part=OutputText(text="")
        ),
        OutputTextDeltaEvent(sequence_number=5, item_id=item, output_index=0, content_index=0, delta="Hello"),
        OutputTextDoneEvent(
            sequence_number=6, item_id=item, output_index=0, content_index=0, text="Hello there."
        ),
        ContentPartDoneEvent(
            sequence_number=7, item_id=item, output_index=0, content_index=0, part=MESSAGE.content[0]
        ),
        OutputItemDoneEvent(sequence_number=8, output_index=0, item=MESSAGE),
        OutputItemAddedEvent(
            sequence_number=9,
            output_index=1,
            item=CALL.model_copy(update={"status": "in_progress", "arguments": ""}),
        ),
        FunctionCallArgumentsDeltaEvent(sequence_number=10, item_id=CALL.id, output_index=1, delta='{"city"'),
        FunctionCallArgumentsDoneEvent(
            sequence_number=11, item_id=CALL.id, output_index=1, arguments=CALL.arguments
        ),
        OutputItemDoneEvent(sequence_number=12, output_index=1, item=CALL),
        ResponseCompletedEvent(sequence_number=13, response=done),
        ResponseIncompleteEvent(
            sequence_number=14, response=done.model_copy(update={"status": "incomplete"})
        ),
        ResponseFailedEvent(
            sequence_number=15,
            response=done.model_copy(
                update={"status": "failed", "error": ResponseError(code="server_error", message="boom")}
            ),
        ),
        ErrorEvent(sequence_number=16, error=ErrorPayload(type="server_error", message="boom")),
    ]


def test_every_event_model_is_valid_and_covers_the_brief() -> None:
    events = [e.model_dump(mode="json") for e in stream_events()]
    for event in events:
        validate_event(event)
    wanted = {
        "response.created", "response.queued", "response.in_progress", "response.completed",
        "response.incomplete", "response.failed", "response.output_item.added", "response.output_item.done",
        "response.content_part.added", "response.content_part.done", "response.output_text.delta",
        "response.output_text.done", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "error",
    }  # fmt: skip
    assert {e["type"] for e in events} == wanted
    assert wanted <= event_schemas().keys()
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


def test_events_parse_as_the_sdks_events() -> None:
    sdk_event: TypeAdapter[Any] = TypeAdapter(SDKStreamEvent)
    for event in stream_events():
        if isinstance(event, ErrorEvent):
            continue  # the SDK's error event is flat; its stream raises APIError on a nested `error` instead
        data = event.model_dump(mode="json")
        assert sdk_event.validate_python(data).type == data["type"]


def test_the_event_validator_refuses_bad_events() -> None:
    with pytest.raises(AssertionError, match="unknown streaming event type"):
        validate_event({"type": "response.output_text.typo", "sequence_number": 0})
    delta = stream_events()[5].model_dump(mode="json")
    del delta["item_id"]
    with pytest.raises(jsonschema.ValidationError, match="item_id"):
        validate_event(delta)
    error = ErrorEvent(sequence_number=0, error=ErrorPayload(type="server_error", message="x")).model_dump()
    assert error["error"] == {"type": "server_error", "code": None, "message": "x", "param": None}
    with pytest.raises(jsonschema.ValidationError):
        validate_event({**error, "error": {"message": "x"}})


# --- other endpoints' bodies ---


def test_compaction_input_items_and_delete() -> None:
    items: list[StoredItem] = [
        InputMessage(role="user", content="hi").to_item(),
        InputMessage(role="assistant", content=[{"type": "output_text", "text": "hello"}]).to_item(),
        FunctionCallInput(call_id="call_1", name="f", arguments="{}").to_item(),
        FunctionCallOutputInput(call_id="call_1", output=[InputTextContent(text="sunny")]).to_item(),
        CompactionItem(encrypted_content="b3BhcXVl"),
    ]
    compact = CompactResponse(output=items, usage=USAGE).model_dump(mode="json")
    validate_compact(compact)
    assert compact["object"] == "response.compaction"
    assert [i["type"] for i in compact["output"]] == [
        "message",
        "message",
        "function_call",
        "function_call_output",
        "compaction",
    ]
    assert compact["output"][3]["output"] == "sunny" and compact["output"][4]["id"].startswith("cmp_")
    listing = InputItemList(data=items, first_id=items[0].id, last_id=items[-1].id, has_more=False)
    assert listing.model_dump(mode="json")["object"] == "list"
    assert DeletedResponse(id="resp_1").model_dump() == {
        "id": "resp_1",
        "object": "response",
        "deleted": True,
    }
    assert CompactRequest.model_validate({"model": "smollm2", "input": "hi"}).input == "hi"
    again = CompactRequest.model_validate(
        {
            "model": "smollm2",
            "input": [compact["output"][0], {"type": "compaction", "encrypted_content": "x"}],
        }
    )
    assert isinstance(again.input, list)
    assert [i.to_item().type for i in again.input] == ["message", "compaction"]


def test_websocket_messages() -> None:
    error = WebSocketErrorEvent(
        status=400, error=WebSocketErrorBody(type="invalid_request_error", code="x", message="y")
    )
    validate_ws_error(error.model_dump(mode="json"))
    with pytest.raises(jsonschema.ValidationError):
        validate_ws_error({"type": "error", "status": 400, "error": {"message": "no code"}})
    message = ResponseCreateMessage.model_validate(
        {"type": "response.create", "model": "smollm2", "input": "hi"}
    )
    assert message.input == "hi" and not message.stream
    with pytest.raises(ValidationError, match="stream must not be sent"):
        ResponseCreateMessage.model_validate({"type": "response.create", "model": "m", "stream": True})
    with pytest.raises(ValidationError):
        ResponseCreateMessage.model_validate({"model": "m"})


# --- requests as the official SDK sends them ---


class Recorder:
    """An SDK client whose HTTP goes to ``reply``; the request bodies it sent are kept in ``bodies``."""

    def __init__(self, reply: Callable[[httpx2.Request], httpx2.Response]) -> None:
        self.bodies: list[dict[str, Any]] = []

        def handle(request: httpx2.Request) -> httpx2.Response:
            self.bodies.append(json.loads(request.content))
            return reply(request)

        self.client = openai.OpenAI(
            api_key="sk-test",
            base_url="http://inferq.test/v1",
            max_retries=0,
            http_client=httpx2.Client(transport=httpx2.MockTransport(handle)),
        )


@pytest.fixture
def sdk() -> Iterator[Recorder]:
    reply = answer(OutputMessage(content=[OutputText(text='{"city": "Oslo"}')])).model_dump(mode="json")
    rec = Recorder(lambda _: httpx2.Response(200, json=reply))
    yield rec
    rec.client.close()


def sent(rec: Recorder, **kw: Any) -> ResponsesRequest:
    rec.client.responses.create(model="smollm2", **kw)
    return ResponsesRequest.model_validate(rec.bodies[-1])


def test_string_input(sdk: Recorder) -> None:
    req = sent(sdk, input="hi", instructions="be brief", max_output_tokens=32, store=False)
    assert req.input == "hi" and req.instructions == "be brief"
    assert (req.max_output_tokens, req.store, req.stream, req.truncation) == (32, False, False, "disabled")


def test_easy_messages_and_input_text_parts(sdk: Recorder) -> None:
    req = sent(
        sdk,
        input=[
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "and "}, {"type": "input_text", "text": "you?"}],
            },
        ],
    )
    assert isinstance(req.input, list) and all(isinstance(i, InputMessage) for i in req.input)
    assert [(i.role, i.text()) for i in req.input if isinstance(i, InputMessage)] == [
        ("developer", "be brief"),
        ("user", "hi"),
        ("assistant", "hello"),
        ("user", "and you?"),
    ]


def test_function_call_round_trip(sdk: Recorder) -> None:
    req = sent(
        sdk,
        input=[
            {"role": "user", "content": "weather in Oslo?"},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
            {
                "type": "function_call_output",
                "call_id": "call_2",
                "output": [{"type": "input_text", "text": "rain"}],
            },
        ],
        tools=[{"type": "function", "name": "get_weather", "parameters": WEATHER_SCHEMA, "strict": True}],
        tool_choice="required",
        parallel_tool_calls=False,
    )
    assert isinstance(req.input, list)
    call, out1, out2 = req.input[1:]
    assert isinstance(call, FunctionCallInput) and call.name == "get_weather"
    assert isinstance(out1, FunctionCallOutputInput) and out1.text() == "sunny"
    assert isinstance(out2, FunctionCallOutputInput) and out2.text() == "rain"
    assert req.tools is not None and req.tools[0].parameters == WEATHER_SCHEMA and req.tools[0].strict is True
    assert (req.tool_choice, req.parallel_tool_calls) == ("required", False)
    named = sent(sdk, input="hi", tool_choice={"type": "function", "name": "get_weather"})
    assert named.tool_choice == FunctionToolChoice(type="function", name="get_weather")


def test_json_schema_text_format(sdk: Recorder) -> None:
    fmt = {"type": "json_schema", "name": "weather", "schema": WEATHER_SCHEMA, "strict": True}
    req = sent(sdk, input="hi", text={"format": fmt, "verbosity": "low"})
    assert req.text is not None and isinstance(req.text.format, TextFormatJsonSchema)
    assert req.text.format.schema_ == WEATHER_SCHEMA and req.text.format.strict is True
    assert req.text.format.model_dump()["schema"] == WEATHER_SCHEMA

    class Weather(BaseModel):
        city: str

    parsed = sdk.client.responses.parse(model="smollm2", input="hi", text_format=Weather)
    assert parsed.output_parsed == Weather(city="Oslo")
    req = ResponsesRequest.model_validate(sdk.bodies[-1])
    assert req.text is not None and isinstance(req.text.format, TextFormatJsonSchema)
    assert req.text.format.name == "Weather" and req.text.format.schema_["properties"]["city"]


def test_streaming_and_sampling_fields_parse(sdk: Recorder) -> None:
    req = ResponsesRequest.model_validate(
        {
            "model": "smollm2",
            "input": "hi",
            "stream": True,
            "stream_options": {"include_obfuscation": False},
            "temperature": 0.5,
            "top_p": 0.9,
            "top_logprobs": 3,
            "reasoning": {"effort": "low"},
            "include": ["message.output_text.logprobs"],
            "conversation": "conv_1",
            "prompt": {"id": "pmpt_1"},
            "previous_response_id": "resp_1",
            "background": True,
            "metadata": {"k": "v"},
        }
    )
    assert req.stream and req.stream_options is not None and not req.stream_options.include_obfuscation
    assert req.reasoning is not None and req.reasoning.effort == "low"


# --- refusals ---


def refusal(body: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as info:
        ResponsesRequest.model_validate({"model": "smollm2", **body})
    return str(info.value)


def test_unknown_item_type_is_refused() -> None:
    message = refusal({"input": [{"type": "web_search_call", "id": "ws_1", "status": "completed"}]})
    assert "'message', 'function_call', 'function_call_output' or 'compaction'" in message
    assert "input item type must be" in refusal({"input": [{"type": "item_reference", "id": "msg_1"}]})


def test_input_image_part_is_refused() -> None:
    image = {"type": "input_image", "image_url": "https://example.com/cat.png", "detail": "auto"}
    message = refusal(
        {"input": [{"role": "user", "content": [{"type": "input_text", "text": "what?"}, image]}]}
    )
    assert "input_image" in message and "'input_text', 'output_text'" in message


def test_web_search_tool_is_refused() -> None:
    message = refusal({"input": "hi", "tools": [{"type": "web_search"}]})
    assert "tools.0.type" in message and "'function'" in message


@pytest.mark.parametrize(
    "body",
    [
        {"input": "hi", "metadata": {f"k{i}": "v" for i in range(17)}},
        {"input": "hi", "metadata": {"k" * 65: "v"}},
        {"input": "hi", "metadata": {"k": "v" * 513}},
        {"input": "hi", "temperature": 2.5},
        {"input": "hi", "top_p": 1.5},
        {"input": "hi", "top_logprobs": 21},
        {"input": "hi", "max_output_tokens": 0},
        {"input": "hi", "truncation": "sometimes"},
        {"input": "hi", "tools": [{"type": "function", "function": {"name": "nested_like_chat"}}]},
        {"input": [{"role": "tool", "content": "chat's tool role"}]},
        {"input": [{"type": "function_call", "call_id": "", "name": "f", "arguments": "{}"}]},
    ],
)
def test_out_of_range_fields_are_refused(body: dict[str, Any]) -> None:
    refusal(body)
