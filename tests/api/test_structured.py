"""Tools and structured output as the API turns them into neutral jobs, and model text into tool calls."""

from __future__ import annotations

import json
from typing import Any

import pytest

from api.adapters import chat
from api.errors import ApiError
from api.protocol.chat import ChatCompletionRequest
from api.serving import structured

PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Weather", "parameters": PARAMS},
}
TIME = {"type": "function", "function": {"name": "get_time"}}


def request(**kw: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw}
    )


def plan_of(req: ChatCompletionRequest) -> structured.Plan:
    return structured.plan(chat.conversation(req))


def test_no_tools_no_format_is_plain_text() -> None:
    plan = plan_of(request())
    assert plan.mode == "text" and plan.json_schema is None
    assert [m.role for m in plan.messages] == ["user"]
    assert structured.tool_call(plan, '{"name": "get_weather", "arguments": {}}') is None


def test_named_function_constrains_to_its_parameters() -> None:
    plan = plan_of(
        request(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    )
    assert plan.mode == "named" and plan.json_schema == PARAMS
    assert plan.messages[0].role == "system" and "get_weather" in plan.messages[0].content
    call = structured.tool_call(plan, ' {"city": "Oslo"}')
    assert call is not None and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Oslo"}


def test_required_allows_any_tool_as_name_and_arguments() -> None:
    plan = plan_of(request(tools=[WEATHER, TIME], tool_choice="required"))
    assert plan.mode == "required" and plan.json_schema is not None
    branches = plan.json_schema["anyOf"]
    assert [b["properties"]["name"]["const"] for b in branches] == ["get_weather", "get_time"]
    assert branches[1]["properties"]["arguments"] == {"type": "object", "properties": {}}
    call = structured.tool_call(plan, '{"name": "get_time", "arguments": {}}')
    assert call is not None and call.name == "get_time" and call.arguments == "{}"


@pytest.mark.parametrize(
    ("text", "called"),
    [
        ('{"name": "get_weather", "arguments": {"city": "Rome"}}', True),
        ('```json\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n```', True),
        ('<tool_call>{"name": "get_weather", "parameters": {"city": "Rome"}}</tool_call>', True),
        ('{"name": "unknown_tool", "arguments": {}}', False),
        ('{"name": "get_weather", "arguments": "Rome"}', False),
        ("It is sunny in Rome.", False),
        ('{"name": "get_weather", "arguments": {"city": ', False),
    ],
)
def test_auto_calls_only_known_tools_with_object_arguments(text: str, called: bool) -> None:
    plan = plan_of(request(tools=[WEATHER]))
    assert plan.mode == "auto" and plan.json_schema is None
    call = structured.tool_call(plan, text)
    assert (call is not None) == called
    if call is not None:
        assert json.loads(call.arguments) == {"city": "Rome"}


def test_auto_holds_back_only_text_that_may_become_a_call() -> None:
    plan = plan_of(request(tools=[WEATHER]))
    assert plan.may_call("") and plan.may_call("  ") and plan.may_call(' {"na')
    assert plan.may_call("```") and plan.may_call("<tool_call>")
    assert not plan.may_call("Sure")


def test_none_hides_the_tools() -> None:
    plan = plan_of(request(tools=[WEATHER], tool_choice="none"))
    assert plan.mode == "text" and all("get_weather" not in m.content for m in plan.messages)


def test_response_format_json_schema_and_json_object() -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": PARAMS}}
    plan = plan_of(request(response_format=fmt))
    assert plan.mode == "text" and plan.json_schema == PARAMS
    assert plan_of(request(response_format={"type": "json_object"})).json_schema == {"type": "object"}
    assert plan_of(request(response_format={"type": "text"})).json_schema is None


def test_history_with_tool_calls_and_results() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "-3 and snow"},
    ]
    plan = plan_of(request(messages=messages, tools=[WEATHER]))
    roles = [m.role for m in plan.messages]
    assert roles == ["system", "user", "assistant", "tool"]
    assert plan.messages[0].content.startswith("Be brief.") and "get_weather" in plan.messages[0].content
    assert json.loads(plan.messages[2].content) == {"name": "get_weather", "arguments": {"city": "Oslo"}}
    assert plan.messages[3].content == "-3 and snow"


@pytest.mark.parametrize(
    "kw",
    [
        {"tool_choice": "required"},
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
    ],
)
def test_inconsistent_tool_choice_is_a_400_naming_it(kw: dict[str, Any]) -> None:
    with pytest.raises(ApiError) as info:
        plan_of(request(**kw))
    assert info.value.status == 400 and info.value.param == "tool_choice"


def test_json_schema_format_without_its_schema_object_is_a_400() -> None:
    with pytest.raises(ApiError) as info:
        plan_of(request(response_format={"type": "json_schema"}))
    assert info.value.param == "response_format"
