"""Acceptance: with ``tool_choice`` naming a function, every reply is a call of it whose arguments validate
against its schema, whatever the seed (30 seeds, sampled at temperature 1, where the model is loosest)."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest
from openai.types.chat import ChatCompletionMessageFunctionToolCall, ChatCompletionToolParam

from tests.conformance.conftest import MODEL

pytestmark = pytest.mark.e2e

BOOKING: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "description": "Where to stay"},
        "nights": {"type": "integer"},
        "room": {"type": "string", "enum": ["single", "double", "suite"]},
        "breakfast": {"type": "boolean"},
        "guests": {"type": "array", "items": {"type": "string"}},
        "budget": {"type": "number"},
    },
    "required": ["city", "nights", "room", "breakfast", "guests"],
}
TOOLS: list[ChatCompletionToolParam] = [
    {
        "type": "function",
        "function": {"name": "book_hotel", "description": "Book a hotel room", "parameters": BOOKING},
    },
    {
        "type": "function",
        "function": {
            "name": "cancel_booking",
            "parameters": {"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]},
        },
    },
]


def test_named_tool_call_validates_for_30_seeds(sdk: openai.OpenAI) -> None:
    invalid: list[tuple[int, str, str]] = []
    for seed in range(30):
        done = sdk.chat.completions.create(
            model=MODEL,
            messages=[
                {"role": "user", "content": "Book me a room in Lisbon for three nights, with breakfast."}
            ],
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "book_hotel"}},
            temperature=1.0,
            seed=seed,
            max_tokens=400,
        )
        choice = done.choices[0]
        calls = [
            c for c in choice.message.tool_calls or [] if isinstance(c, ChatCompletionMessageFunctionToolCall)
        ]
        if len(calls) != 1 or calls[0].function.name != "book_hotel" or choice.finish_reason != "tool_calls":
            invalid.append((seed, "shape", repr(choice)))
            continue
        arguments = calls[0].function.arguments
        try:
            jsonschema.validate(json.loads(arguments), BOOKING)
        except (ValueError, jsonschema.ValidationError) as exc:
            invalid.append((seed, str(exc)[:200], arguments))
    assert invalid == []
