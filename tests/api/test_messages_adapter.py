"""The Messages adapter without Redis or a worker: requests as conversations and sampling, results as
Anthropic's message, and the stream as events that the official ``anthropic`` SDK reads back."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anthropic
import httpx2
import pytest
from anthropic.types import RawMessageStreamEvent
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel, TypeAdapter

from api import errors
from api.adapters import messages
from api.protocol.messages import CountTokensRequest, MessagesRequest
from api.serving import core, sse, structured
from api.serving.conversation import Call, Named, Turn
from queueing import events
from queueing.catalog import ModelSpec

SPEC = ModelSpec.model_validate(
    {
        "id": "smollm2",
        "defaults": {"temperature": 0.7, "top_p": 0.9},
        "sources": {"llamacpp": {"path": "/nonexistent"}},
    }
)
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
HI = [{"role": "user", "content": "hi"}]


def request(**body: Any) -> MessagesRequest:
    return MessagesRequest.model_validate({"model": "smollm2", "max_tokens": 16, "messages": HI, **body})


# --- the request as a conversation ---


def test_history_with_tool_use_and_tool_result() -> None:
    body = request(
        system=[{"type": "text", "text": "You are terse."}, {"type": "text", "text": "Use tools."}],
        tools=[WEATHER],
        messages=[
            {"role": "user", "content": "Weather in Oslo and Rome?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}},
                    {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Rome"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "-3 °C"},
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_2",
                        "content": [{"type": "text", "text": "no such city"}],
                        "is_error": True,
                    },
                    {"type": "text", "text": "And tomorrow?"},
                ],
            },
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_3", "content": "ok"}]},
            {"role": "system", "content": "Now in French."},
        ],
    )
    conv = messages.conversation(body)
    assert conv.turns == [
        Turn("system", "You are terse.\nUse tools."),
        Turn("user", "Weather in Oslo and Rome?"),
        Turn(
            "assistant",
            "Let me look.",
            [Call("get_weather", '{"city": "Oslo"}'), Call("get_weather", '{"city": "Rome"}')],
        ),
        Turn("tool", "-3 °C"),
        Turn("tool", "Error: no such city"),
        Turn("user", "And tomorrow?"),
        Turn("tool", "ok"),
        Turn("system", "Now in French."),
    ]
    assert [(t.name, t.description, t.parameters) for t in conv.tools] == [
        ("get_weather", "The weather in a city", WEATHER["input_schema"])
    ]
    assert conv.tool_choice is None and conv.tool_choice_param == "tool_choice"
    # The earlier calls reach the model as text, in the format it is asked to call in.
    plan = structured.plan(conv)
    assert plan.mode == "auto"
    assistant = plan.messages[2]
    assert assistant.role == "assistant" and '"arguments": {"city": "Rome"}' in assistant.content


def test_no_system_no_system_turn() -> None:
    assert messages.conversation(request()).turns == [Turn("user", "hi")]


@pytest.mark.parametrize(
    ("choice", "ours", "mode"),
    [
        (None, None, "auto"),
        ({"type": "auto"}, "auto", "auto"),
        ({"type": "any"}, "required", "required"),
        ({"type": "tool", "name": "get_weather"}, Named("get_weather"), "named"),
        ({"type": "none"}, "none", "text"),
    ],
)
def test_tool_choice(choice: dict[str, Any] | None, ours: Any, mode: str) -> None:
    conv = messages.conversation(request(tools=[WEATHER], tool_choice=choice))
    assert conv.tool_choice == ours
    assert structured.plan(conv).mode == mode


@pytest.mark.parametrize("choice", [{"type": "any"}, {"type": "tool", "name": "get_weather"}])
def test_a_forced_tool_needs_tools(choice: dict[str, Any]) -> None:
    with pytest.raises(errors.ApiError) as info:
        messages.conversation(request(tool_choice=choice))
    assert info.value.status == 400 and info.value.param == "tool_choice"
    assert f"`{choice['type']}` needs `tools`" in info.value.message


def test_a_named_tool_must_be_one_of_the_tools() -> None:
    with pytest.raises(errors.ApiError) as info:
        structured.plan(
            messages.conversation(request(tools=[WEATHER], tool_choice={"type": "tool", "name": "x"}))
        )
    assert info.value.status == 400 and info.value.param == "tool_choice"


def test_sampling_takes_the_models_defaults_for_what_is_unset() -> None:
    body = request()
    s = messages.sampling(body, SPEC, structured.plan(messages.conversation(body)))
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.stop, s.json_schema) == (
        16,
        0.7,
        0.9,
        0,
        [],
        None,
    )


def test_sampling_from_the_request() -> None:
    body = request(
        temperature=0.0,
        top_p=0.5,
        top_k=40,
        stop_sequences=["3", "\n\nHuman:", "END", "x", "y"],
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"},
    )
    plan, work = messages.work(body, SPEC)
    (job,) = work.jobs
    s = job.sampling
    assert (s.temperature, s.top_p, s.top_k) == (0.0, 0.5, 40)
    # Anthropic sets no limit of four as OpenAI does.
    assert s.stop == ["3", "\n\nHuman:", "END", "x", "y"]
    # The named tool's schema constrains the output.
    assert s.json_schema == WEATHER["input_schema"] == plan.json_schema
    assert job.id.startswith("msg_") and job.messages == plan.messages and job.stream is False


def test_count_tokens_counts_the_prompt_with_its_tools() -> None:
    body = CountTokensRequest.model_validate({"model": "smollm2", "messages": HI, "tools": [WEATHER]})
    plan = structured.plan(messages.conversation(body))
    # The tools are part of what the model reads, so they are part of what is counted.
    assert plan.messages[0].role == "system" and "get_weather" in plan.messages[0].content


# --- the non-streamed message ---


def finished(
    text: str | None,
    reason: str = "stop",
    stop_sequence: str | None = None,
    completion: int = 5,
    cached: int = 0,
) -> events.Finished:
    return events.Finished.model_validate(
        {
            "attempt": 1,
            "finish_reason": reason,
            "prompt_tokens": 12,
            "completion_tokens": completion,
            "cached_tokens": cached,
            "text": text,
            "stop_sequence": stop_sequence,
        }
    )


def answer(body: MessagesRequest, end: events.Finished) -> dict[str, Any]:
    plan, work = messages.work(body, SPEC)
    outcome = core.Outcome(work, [end], [])
    message = messages.message(body, plan, work.jobs[0].id, outcome)
    assert message.id == work.jobs[0].id
    data = message.model_dump(mode="json")
    # What the SDK parses strictly, too.
    anthropic.types.Message.model_validate(data)
    return data


def test_a_text_answer() -> None:
    data = answer(request(), finished("Hello!", cached=4))
    assert data["content"] == [{"type": "text", "text": "Hello!", "citations": None}]
    assert (data["stop_reason"], data["stop_sequence"]) == ("end_turn", None)
    assert data["usage"] == {
        "input_tokens": 8,
        "output_tokens": 5,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 4,
        "service_tier": "standard",
    }


@pytest.mark.parametrize(
    ("end", "stop"),
    [
        (finished("1, 2, ", stop_sequence="3"), ("stop_sequence", "3")),
        (finished("1, 2, 3", reason="length"), ("max_tokens", None)),
        (finished("1, 2", reason="cancelled"), ("end_turn", None)),
    ],
)
def test_stop_reasons(end: events.Finished, stop: tuple[str, str | None]) -> None:
    data = answer(request(stop_sequences=["3"]), end)
    assert (data["stop_reason"], data["stop_sequence"]) == stop


def test_no_output_is_no_content() -> None:
    assert answer(request(), finished("", completion=0))["content"] == []


def test_a_named_tool_call_is_a_tool_use_block() -> None:
    body = request(tools=[WEATHER], tool_choice={"type": "tool", "name": "get_weather"})
    data = answer(body, finished(' {"city": "Oslo"} '))
    (block,) = data["content"]
    assert block["type"] == "tool_use" and block["id"].startswith("toolu_")
    assert (block["name"], block["input"]) == ("get_weather", {"city": "Oslo"})
    assert data["stop_reason"] == "tool_use"


def test_an_auto_tool_call_is_a_tool_use_block() -> None:
    data = answer(
        request(tools=[WEATHER]), finished('{"name": "get_weather", "arguments": {"city": "Rome"}}')
    )
    assert [(b["type"], b["input"]) for b in data["content"]] == [("tool_use", {"city": "Rome"})]
    assert data["stop_reason"] == "tool_use"


@pytest.mark.parametrize(
    ("text", "reason", "stop"), [('{"city": "Os', "length", "max_tokens"), ("[1]", "stop", "end_turn")]
)
def test_arguments_that_are_not_an_object_fall_back_to_text(text: str, reason: str, stop: str) -> None:
    body = request(tools=[WEATHER], tool_choice={"type": "tool", "name": "get_weather"})
    data = answer(body, finished(text, reason=reason))
    assert data["content"] == [{"type": "text", "text": text, "citations": None}]
    assert data["stop_reason"] == stop


# --- the stream ---


def delta(text: str) -> events.Delta:
    return events.Delta(attempt=1, text=text)


def render(body: MessagesRequest, stream: list[events.Delta | events.Finished]) -> list[BaseModel]:
    plan, work = messages.work(body, SPEC)
    renderer = messages.MessageStream(plan, work.jobs[0].id, body.model)
    out = renderer.start(input_tokens=12)
    for event in stream:
        out.extend(renderer.feed(event))
    return out


def as_sse(frames: list[sse.Frame]) -> bytes:
    return "".join(f"event: {f.event}\ndata: {f.data}\n\n" for f in frames).encode()


def sdk_over(content: bytes) -> anthropic.Anthropic:
    """An SDK client whose every request is answered with ``content`` as an event stream."""

    def handle(_: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=content)

    return anthropic.Anthropic(
        api_key="sk-test",
        base_url="http://inferq.test",
        max_retries=0,
        http_client=httpx2.Client(transport=httpx2.MockTransport(handle)),
    )


Final = Callable[[list[BaseModel]], tuple[str, anthropic.types.Message]]


@pytest.fixture
def final() -> Iterator[Final]:
    clients: list[anthropic.Anthropic] = []

    def read(events_: list[BaseModel]) -> tuple[str, anthropic.types.Message]:
        frames = [messages.frame(e) for e in events_]
        sdk_event: TypeAdapter[Any] = TypeAdapter(RawMessageStreamEvent)
        for f in frames:
            assert f.event == json.loads(f.data)["type"]
            if f.event != "ping":
                sdk_event.validate_json(f.data)  # every event parses strictly as the SDK's own
        client = sdk_over(as_sse(frames))
        clients.append(client)
        with client.messages.stream(model="smollm2", max_tokens=16, messages=HI) as stream:  # type: ignore[arg-type]
            text = "".join(stream.text_stream)
            return text, stream.get_final_message()

    yield read
    for c in clients:
        c.close()


def kinds(out: list[BaseModel]) -> list[str]:
    return [str(e.model_dump()["type"]) for e in out]


def test_a_text_stream(final: Final) -> None:
    out = render(request(), [delta("Hel"), delta(""), delta("lo!"), finished(None, completion=3)])
    assert kinds(out) == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = out[0].model_dump(mode="json")
    assert start["message"]["content"] == [] and start["message"]["stop_reason"] is None
    assert start["message"]["usage"]["input_tokens"] == 12 and start["message"]["id"].startswith("msg_")
    text, message = final(out)
    assert text == "Hello!" and [b.type for b in message.content] == ["text"]
    assert message.content[0].text == "Hello!"  # type: ignore[union-attr]
    assert (message.stop_reason, message.usage.input_tokens, message.usage.output_tokens) == (
        "end_turn",
        12,
        3,
    )


def test_a_stopped_stream_names_its_stop_sequence(final: Final) -> None:
    out = render(request(stop_sequences=["3"]), [delta("1, 2, "), finished(None, stop_sequence="3")])
    _, message = final(out)
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "3")


def test_an_empty_stream_is_well_formed(final: Final) -> None:
    out = render(request(), [finished(None, completion=0)])
    assert kinds(out) == ["message_start", "ping", "message_delta", "message_stop"]
    text, message = final(out)
    assert text == "" and message.content == [] and message.stop_reason == "end_turn"


def test_a_named_call_streams_its_input(final: Final) -> None:
    body = request(tools=[WEATHER], tool_choice={"type": "tool", "name": "get_weather"})
    out = render(body, [delta('{"city": '), delta('"Oslo"}'), finished(None, completion=6)])
    assert kinds(out)[2:] == [
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    block = out[2].model_dump(mode="json")["content_block"]
    assert block["type"] == "tool_use" and block["input"] == {} and block["name"] == "get_weather"
    assert [e.model_dump()["delta"] for e in out[3:5]] == [
        {"type": "input_json_delta", "partial_json": '{"city": '},
        {"type": "input_json_delta", "partial_json": '"Oslo"}'},
    ]
    _, message = final(out)
    (call,) = message.content
    assert call.type == "tool_use" and call.input == {"city": "Oslo"} and message.stop_reason == "tool_use"


def test_an_auto_call_is_one_input_json_delta(final: Final) -> None:
    out = render(
        request(tools=[WEATHER]),
        [delta('{"name": "get_weather", '), delta('"arguments": {"city": "Rome"}}'), finished(None)],
    )
    assert kinds(out)[2:] == [
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    _, message = final(out)
    (call,) = message.content
    assert call.type == "tool_use" and call.name == "get_weather" and call.input == {"city": "Rome"}
    assert message.stop_reason == "tool_use"


def test_auto_text_that_is_not_a_call_streams_as_text(final: Final) -> None:
    out = render(request(tools=[WEATHER]), [delta("{not"), delta(" json"), delta(" at all"), finished(None)])
    text, message = final(out)
    assert text == "{not json at all" and message.stop_reason == "end_turn"


# --- errors ---


def test_error_mapping_in_anthropics_shape() -> None:
    for ours, theirs in [(400, 400), (401, 401), (404, 404), (429, 429), (503, 529)]:
        status, body = errors.anthropic_body(errors.ApiError(ours, "no", "x"), "req_1")
        assert status == theirs
        parsed = anthropic.types.ErrorResponse.model_validate(body)
        assert (parsed.type, parsed.request_id, parsed.error.message) == ("error", "req_1", "no")
    assert errors.anthropic_body(errors.ApiError(429, "slow down", "x"))[1] == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "slow down"},
    }


def test_a_rate_limit_reaches_the_sdk_as_its_exception() -> None:
    response = errors.respond("/v1/messages", errors.ApiError(429, "slow down", "rate_limit_exceeded"))
    request_id = response.headers[errors.REQUEST_ID_HEADER]
    assert request_id.startswith("req_") and json.loads(bytes(response.body))["request_id"] == request_id

    def handle(_: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(429, headers=dict(response.headers), content=bytes(response.body))

    client = anthropic.Anthropic(
        api_key="k",
        base_url="http://t",
        max_retries=0,
        http_client=httpx2.Client(transport=httpx2.MockTransport(handle)),
    )
    with pytest.raises(anthropic.RateLimitError) as info:
        client.messages.create(model="smollm2", max_tokens=4, messages=HI)  # type: ignore[arg-type]
    assert info.value.type == "rate_limit_error" and info.value.request_id == request_id
    client.close()


def test_openai_paths_keep_openais_envelope() -> None:
    response = errors.respond("/v1/chat/completions", errors.ApiError(503, "no", "service_unavailable_error"))
    assert response.status_code == 503 and errors.REQUEST_ID_HEADER not in response.headers
    assert json.loads(bytes(response.body))["error"]["type"] == "service_unavailable_error"


def test_an_error_after_the_start_is_the_last_event() -> None:
    """Through the one SSE layer: the error event ends the stream, without message_stop after it."""
    body = request()
    started = render(body, [delta("Hel")])

    async def frames() -> AsyncIterator[sse.Frame]:
        for event in started:
            yield messages.frame(event)
        raise errors.no_worker("smollm2", 2)

    app = FastAPI()
    app.get("/stream")(lambda: sse.respond(frames(), messages.framing("req_1")))
    with TestClient(app) as http:
        raw = http.get("/stream").content
    names = [line.removeprefix(b"event: ") for line in raw.splitlines() if line.startswith(b"event: ")]
    assert names[-1] == b"error" and b"message_stop" not in names and names[0] == b"message_start"
    error_data = [line for line in raw.splitlines() if line.startswith(b"data: ")][-1].removeprefix(b"data: ")
    assert json.loads(error_data) == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": errors.no_worker("smollm2", 2).message},
        "request_id": "req_1",
    }
    client = sdk_over(raw)
    with pytest.raises(anthropic.APIStatusError) as info:
        list(client.messages.create(model="smollm2", max_tokens=4, messages=HI, stream=True))  # type: ignore[arg-type]
    assert info.value.type == "overloaded_error"
    client.close()


def test_the_ping_is_anthropics_ping_event() -> None:
    ping = messages.framing().ping
    assert ping is not None and ping.event == "ping" and json.loads(ping.data) == {"type": "ping"}
