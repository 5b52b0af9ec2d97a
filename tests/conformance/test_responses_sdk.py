"""The official ``openai`` SDK over the Responses API, against the real fleet with API keys: every object and
event the server sends is validated against the pinned Open Responses schema (read raw, so nothing the SDK
fills in hides a missing field)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.conformance.conftest import ADMIN_KEY, MODEL, USER_KEY
from tests.conformance.openresponses import (
    validate_compact,
    validate_event,
    validate_response,
    validate_ws_error,
)
from tests.fleet import Fleet

pytestmark = pytest.mark.e2e

WEATHER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
}
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": WEATHER_SCHEMA,
}
FORCE = {"type": "function", "name": "get_weather"}
TERMINAL = ("response.completed", "response.incomplete", "response.failed")


class Person(BaseModel):
    name: str
    age: int


def _raw(sdk: openai.OpenAI, **kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = sdk.responses.with_raw_response.create(**kw).http_response.json()
    validate_response(body)
    return body


def _sse(fleet: Fleet, body: dict[str, Any], path: str = "/v1/responses") -> list[dict[str, Any]]:
    """A stream read raw: every event validated, its `event:` line matching its type."""
    events: list[dict[str, Any]] = []
    headers = {"Authorization": f"Bearer {USER_KEY}"}
    with httpx.stream("POST", f"{fleet.base_url}{path}", json=body, headers=headers, timeout=120) as r:
        assert r.status_code == 200, r.read()
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                assert event["type"] == name
                validate_event(event)
                events.append(event)
    return events


@pytest.mark.parametrize("kind", ["text", "items"])
def test_create_with_text_and_with_items(sdk: openai.OpenAI, kind: str) -> None:
    value: Any = (
        "Say hello."
        if kind == "text"
        else [
            {"role": "developer", "content": "Be brief."},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Say hello."}]},
        ]
    )
    body = _raw(sdk, model=MODEL, input=value, max_output_tokens=12, metadata={"k": "v"})
    assert body["id"].startswith("resp_") and body["object"] == "response"
    assert body["status"] in ("completed", "incomplete") and body["metadata"] == {"k": "v"}
    u = body["usage"]
    assert u["total_tokens"] == u["input_tokens"] + u["output_tokens"] and 0 < u["output_tokens"] <= 12
    assert (
        u["input_tokens_details"]["cached_tokens"] >= 0
        and u["output_tokens_details"]["reasoning_tokens"] == 0
    )
    assert body["output"][0]["content"][0]["text"]


def test_stream_event_order_and_joined_text(sdk: openai.OpenAI, conformance_fleet: Fleet) -> None:
    events = _sse(
        conformance_fleet, {"model": MODEL, "input": "Say hello.", "max_output_tokens": 12, "stream": True}
    )
    kinds = [e["type"] for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:-1] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    assert (
        kinds[-1] in ("response.completed", "response.incomplete") and "response.output_text.delta" in kinds
    )
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    joined = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert joined == events[-1]["response"]["output"][0]["content"][0]["text"]
    # The SDK's helper needs `response.completed`: room enough for the model to stop by itself.
    with sdk.responses.stream(
        model=MODEL, input="Say hello.", max_output_tokens=200, temperature=0
    ) as stream:
        deltas = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert deltas == final.output_text


def test_function_tool_round_trip(sdk: openai.OpenAI) -> None:
    first = _raw(
        sdk,
        model=MODEL,
        input="What is the weather in Paris?",
        tools=[WEATHER],
        tool_choice=FORCE,
        max_output_tokens=40,
    )
    call = first["output"][0]
    assert call["type"] == "function_call" and call["name"] == "get_weather" and call["id"].startswith("fc_")
    jsonschema.validate(json.loads(call["arguments"]), WEATHER_SCHEMA)
    output = {"type": "function_call_output", "call_id": call["call_id"], "output": '{"temperature": 21}'}
    answer = _raw(
        sdk,
        model=MODEL,
        previous_response_id=first["id"],
        input=[output],
        tools=[WEATHER],
        tool_choice="none",
        max_output_tokens=16,
    )
    assert answer["previous_response_id"] == first["id"] and answer["output"][0]["type"] == "message"
    items = sdk.responses.input_items.list(answer["id"], order="asc")
    kinds = [i.type for i in items.data]
    assert kinds == ["message", "function_call", "function_call_output"]


def test_streamed_function_call_arguments(conformance_fleet: Fleet) -> None:
    body = {
        "model": MODEL,
        "input": "Weather in Oslo?",
        "tools": [WEATHER],
        "tool_choice": FORCE,
        "stream": True,
        "max_output_tokens": 40,
    }
    events = _sse(conformance_fleet, body)
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert deltas == done["arguments"]
    jsonschema.validate(json.loads(done["arguments"]), WEATHER_SCHEMA)


def test_parse_into_a_pydantic_model(sdk: openai.OpenAI) -> None:
    parsed = sdk.responses.parse(
        model=MODEL, input="Invent a person: a name and an age.", text_format=Person, max_output_tokens=40
    )
    assert isinstance(parsed.output_parsed, Person)


def test_store_false_delete_and_other_keys(sdk: openai.OpenAI, conformance_fleet: Fleet) -> None:
    unstored = sdk.responses.create(model=MODEL, input="hi", store=False, max_output_tokens=4)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(unstored.id)
    stored = sdk.responses.create(model=MODEL, input="hi", max_output_tokens=4)
    validate_response(sdk.responses.with_raw_response.retrieve(stored.id).http_response.json())
    with (
        openai.OpenAI(base_url=f"{conformance_fleet.base_url}/v1", api_key=ADMIN_KEY, max_retries=0) as other,
        pytest.raises(openai.NotFoundError),
    ):
        other.responses.retrieve(stored.id)
    sdk.responses.delete(stored.id)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(stored.id)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.create(model=MODEL, input="hi", previous_response_id=stored.id)


def test_background_cancel_and_resumed_stream(sdk: openai.OpenAI) -> None:
    queued = sdk.responses.create(
        model=MODEL, input="Count to a thousand.", background=True, max_output_tokens=200
    )
    assert queued.status == "queued"
    assert sdk.responses.cancel(queued.id).status == "cancelled"
    assert sdk.responses.retrieve(queued.id).status == "cancelled"
    stream = sdk.responses.create(
        model=MODEL, input="Write a story.", background=True, stream=True, max_output_tokens=24
    )
    first = []
    for event in stream:
        first.append(event.model_dump(mode="json"))
        if len(first) == 6:
            break
    stream.close()
    response_id, last = first[0]["response"]["id"], first[-1]["sequence_number"]
    rest = [
        e.model_dump(mode="json")
        for e in sdk.responses.retrieve(response_id, stream=True, starting_after=last)
    ]
    seqs = [e["sequence_number"] for e in first + rest]
    assert seqs == list(range(len(seqs))) and rest[-1]["type"] in TERMINAL


def test_compact(sdk: openai.OpenAI, conformance_fleet: Fleet) -> None:
    history = [{"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": "Hello Ada!"}]
    r = httpx.post(
        f"{conformance_fleet.base_url}/v1/responses/compact",
        json={"model": MODEL, "input": history},
        headers={"Authorization": f"Bearer {USER_KEY}"},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    validate_compact(body)
    assert [i["type"] for i in body["output"]] == ["message", "compaction"]
    again = _raw(
        sdk, model=MODEL, input=[*body["output"], {"role": "user", "content": "Hi."}], max_output_tokens=4
    )
    assert again["status"] in ("completed", "incomplete")


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input"),
        ({"tools": [{"type": "web_search"}]}, "tools"),
        ({"background": True, "store": False}, "background"),
    ],
)
def test_bad_input_is_a_400_in_openais_envelope(
    sdk: openai.OpenAI, extra: dict[str, Any], param: str
) -> None:
    body: dict[str, Any] = {"model": MODEL, "input": "hi", **extra}
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.responses.create(**body)
    error = caught.value.response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"].startswith(param)


def test_websocket_two_turn_tool_loop(conformance_fleet: Fleet) -> None:
    url = conformance_fleet.base_url.replace("http", "ws") + "/v1/responses"

    def turn(ws: Any, message: dict[str, Any]) -> list[dict[str, Any]]:
        ws.send(json.dumps({"type": "response.create", "model": MODEL, **message}))
        got: list[dict[str, Any]] = []
        while not got or got[-1]["type"] not in TERMINAL:
            got.append(json.loads(ws.recv(timeout=120)))
            validate_event(got[-1])
        return got

    with connect(url, additional_headers={"Authorization": f"Bearer {USER_KEY}"}) as ws:
        first = turn(
            ws,
            {
                "input": "Weather in Rome?",
                "tools": [WEATHER],
                "tool_choice": FORCE,
                "store": False,
                "max_output_tokens": 40,
            },
        )
        call = first[-1]["response"]["output"][0]
        assert call["type"] == "function_call"
        output = {"type": "function_call_output", "call_id": call["call_id"], "output": "sunny"}
        second = turn(
            ws,
            {"input": [output], "previous_response_id": first[-1]["response"]["id"], "max_output_tokens": 12},
        )
        assert second[-1]["response"]["previous_response_id"] == first[-1]["response"]["id"]
        assert second[-1]["response"]["output"][0]["type"] == "message"
        ws.send(json.dumps({"type": "response.create", "model": "no-such-model", "input": "x"}))
        error = json.loads(ws.recv(timeout=30))
        validate_ws_error(error)
        assert error["status"] == 404
    with pytest.raises(InvalidStatus), connect(url, additional_headers={"Authorization": "Bearer wrong"}):
        pass
